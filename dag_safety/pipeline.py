"""`DAGStableDiffusionPipeline`: Stable Diffusion with Detect-and-Guide, SLD and SEGA safety guidance."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import replace_example_docstring

from ._validation import check_finite_number, check_positive_int, concept_list
from .guidance_mixin import SafetyGuidanceMixin
from .outputs import DAGPipelineOutput
from .weights import SafetyWeightsMixin

__all__ = ["DAGStableDiffusionPipeline"]

#: the arguments this pipeline passes through, by name, with their defaults
_SD_CALL = inspect.signature(StableDiffusionPipeline.__call__)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dag_safety import DAGStableDiffusionPipeline

        >>> pipe = DAGStableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
        >>> pipe.enable_dag(guideline_embedding, guidance="sega")  # a (1+K, 768) tensor
        >>> out = pipe("a prompt", safety_concept="nudity", generator=torch.manual_seed(0))
        >>> out.images[0], out.unsafe_detected
        ```
"""


class DAGStableDiffusionPipeline(SafetyGuidanceMixin, SafetyWeightsMixin, StableDiffusionPipeline):
    r"""
    [`StableDiffusionPipeline`] with inference-time safety guidance: Detect-and-Guide (DAG, Li et al., CVPR 2025)
    and the baselines it builds on, Safe Latent Diffusion (SLD) and semantic guidance (SEGA).

    DAG detects the unsafe region at every step from the UNet's cross-attention queries and an optimized
    guideline-token embedding, and applies the SEGA or SLD safety direction only there, scaled per pixel by the
    paper's AreaScaler and MagnitudeScaler. With neither DAG nor safety guidance enabled the pipeline is
    `StableDiffusionPipeline`, output for output.

    The enabled guidance is a [`~dag_safety.DAGGuidance`] or [`~dag_safety.SafetyGuidance`], attached to this
    pipeline for the length of each call: the denoising loop is `StableDiffusionPipeline`'s own, and between calls
    the UNet is the stock one (pipelines sharing it through `from_pipe` never see DAG).

    Fine-tuned safety weights (Focus-N-Fix LoRA, SPF-Portrait cross-attention) load with
    [`~SafetyWeightsMixin.load_safety_weights`], alone or together with DAG.

    The constructor is `StableDiffusionPipeline`'s, so `from_pretrained(...)` and `from_pipe(pipe)` work as usual.
    """

    # `dag_scale`: DAG's per-pixel scale `S_dag` of the step, `(B, h, w)`, zero where and when nothing is guided
    _callback_tensor_inputs = [*StableDiffusionPipeline._callback_tensor_inputs, "dag_scale"]  # noqa: RUF012  # diffusers' attribute

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        *args,
        safety_concept: str | list[str] | None = None,
        return_dag_maps: bool = False,
        **kwargs,
    ) -> DAGPipelineOutput | tuple:
        r"""
        Generates images; every argument of `StableDiffusionPipeline.__call__` works as there.

        Args:
            safety_concept (`str` or `list[str]`, *optional*):
                The text of the concept to steer away from (`e_s`). Several concepts need SEGA (or DAG + SEGA).
                Defaults to the safety concepts the saved guideline embeddings given to `enable_dag` name in their
                metadata, and otherwise to SLD's concept text.
            return_dag_maps (`bool`, *optional*, defaults to `False`):
                With DAG enabled, also return the last step's detection map per image as `dag_maps`.

        With DAG enabled, `callback_on_step_end_tensor_inputs` may also name `"dag_scale"`: the step's `S_dag`,
        `(B, h, w)` on the latents' device, zero where the step guides nothing (warm-up included), to see where DAG
        guides at each step. It is read-only: a callback that returns it changes nothing.

        Returns:
            [`DAGPipelineOutput`] or `tuple`: with `return_dict=False`, `(images, nsfw_content_detected)` when no
            safety guidance is enabled (as `StableDiffusionPipeline`), else `(images, nsfw_content_detected,
            unsafe_detected, dag_maps, presence_scores)`.

        Raises:
            `ValueError`: safety guidance without classifier-free guidance (`guidance_scale <= 1`),
            `return_dag_maps`, a `"dag_scale"` callback input or `safety_concept` without the guidance it needs, a
            bad `safety_concept`, steps / sizes / counts that are not positive integers, `height` without `width`,
            non-finite scales (all checked before any work, see `_check_call_arguments`).
            `TypeError`: an unknown keyword argument (the message names the closest valid one).
            `RuntimeError`: a call from inside this pipeline's own call (a callback).
            `FloatingPointError`: with DAG, latents that became NaN or Inf: an image DAG could not inspect is never
            reported as safe.

        Examples:
        """
        sd_arguments = self._sd_arguments(args, kwargs)
        return_dict = sd_arguments["return_dict"]
        self._check_call_arguments(sd_arguments, safety_concept, return_dag_maps)
        with self._calling():
            if self._guidance is None:
                output = super().__call__(**sd_arguments)
                if not return_dict:
                    return output
                return DAGPipelineOutput(images=output.images, nsfw_content_detected=output.nsfw_content_detected)
            output, seen = self._run_guided(super().__call__, sd_arguments, safety_concept, return_dag_maps)
        images, nsfw = (output.images, output.nsfw_content_detected) if return_dict else output
        unsafe, maps, presence_scores = self._dag_outputs(seen, len(images), return_dag_maps)
        if not return_dict:
            return images, nsfw, unsafe, maps, presence_scores
        return DAGPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            unsafe_detected=unsafe,
            dag_maps=maps,
            presence_scores=presence_scores,
        )

    def _sd_arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by `StableDiffusionPipeline.__call__`'s names, its defaults filled in; keywords it does
        not know are refused with the closest valid name (its own `**kwargs` only takes the deprecated `callback` /
        `callback_steps`)."""
        try:
            bound = _SD_CALL.bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"`{type(self).__name__}.__call__`: {error}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        extra = arguments.pop("kwargs", {})
        known = [*arguments, "safety_concept", "return_dag_maps"]
        for key in extra:
            if key not in ("callback", "callback_steps"):
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean `{close[0]}`?" if close else f". Valid arguments: {sorted(known)}."
                raise TypeError(f"`{type(self).__name__}.__call__` got an unexpected keyword argument `{key}`{hint}")
        return {**arguments, **extra}

    def _check_call_arguments(
        self, arguments: dict[str, Any], safety_concept: str | list[str] | None, return_dag_maps: bool
    ) -> None:
        """Refuses, before any work, what `StableDiffusionPipeline.__call__` would let through silently or fail on
        with a raw library error: unknown keywords, sizes and counts that are not positive integers, `height`
        without `width`, non-finite scales, and safety arguments without the guidance they belong to.

        A call that passes is run as `StableDiffusionPipeline.__call__` runs it: these checks only reject.
        """
        if arguments["timesteps"] is None and arguments["sigmas"] is None:
            check_positive_int("num_inference_steps", arguments["num_inference_steps"])
        if arguments["num_images_per_prompt"] is not None:
            check_positive_int("num_images_per_prompt", arguments["num_images_per_prompt"])
        height, width = arguments["height"], arguments["width"]
        if (height is None) != (width is None):
            # StableDiffusionPipeline would silently fall back to the default size for both
            raise ValueError(
                f"Pass both `height` and `width`, or neither for the model's default size; got height={height!r},"
                f" width={width!r}."
            )
        for name in ("height", "width"):
            if arguments[name] is not None:
                check_positive_int(name, arguments[name])
        for name in ("guidance_scale", "eta", "guidance_rescale"):
            check_finite_number(name, arguments[name])
        generator = arguments["generator"]
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(
                f"`generator` must be a torch.Generator or a list of them (e.g. `torch.Generator().manual_seed(0)`),"
                f" got {generator!r}."
            )

        callback = arguments["callback_on_step_end"]
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            requested = callback.tensor_inputs
        else:
            requested = arguments["callback_on_step_end_tensor_inputs"]
            if requested is None or isinstance(requested, str):
                raise ValueError(
                    "`callback_on_step_end_tensor_inputs` must be a list of tensor names such as ['latents'], got"
                    f" {requested!r}."
                )
        if self._dag is None:
            if return_dag_maps:
                raise ValueError("`return_dag_maps=True` needs DAG; call `pipe.enable_dag(embedding)` first.")
            if "dag_scale" in requested:
                raise ValueError(
                    "The callback tensor input 'dag_scale' needs DAG; call `pipe.enable_dag(embedding)` first."
                )
            if safety_concept is not None and self._guidance is None:
                # ignoring it would generate unprotected images while the caller believes them guided
                raise ValueError(
                    f"`safety_concept={safety_concept!r}` needs safety guidance, and none is enabled: call"
                    " `pipe.enable_dag(embedding)` or `pipe.enable_safety_guidance('sega' | 'sld')` first."
                )
        if self._guidance is not None and not (
            arguments["guidance_scale"] > 1 and self.unet.config.time_cond_proj_dim is None
        ):
            raise ValueError(
                f"Safety guidance works on top of classifier-free guidance, which is off (guidance_scale="
                f"{arguments['guidance_scale']}, unet time_cond_proj_dim={self.unet.config.time_cond_proj_dim}). Use"
                " `guidance_scale > 1` or disable safety guidance."
            )
        if safety_concept is not None:
            concept_list(safety_concept)
