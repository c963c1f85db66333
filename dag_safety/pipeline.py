"""`DAGStableDiffusionPipeline`: Stable Diffusion with Detect-and-Guide, SLD and SEGA safety guidance."""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import replace_example_docstring

from ._validation import check_finite_number, check_positive_int, concept_list
from .attach import DAGGuidance, SafetyGuidance
from .config import DAGConfig, SEGAConfig, SLDConfig
from .outputs import DAGPipelineOutput
from .state import DAGState, EmbeddingLike
from .weights import SafetyWeightsMixin

__all__ = ["DAGStableDiffusionPipeline"]


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


class DAGStableDiffusionPipeline(SafetyWeightsMixin, StableDiffusionPipeline):
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

    # Per-instance state, set by the enable/disable methods; `__init__` stays StableDiffusionPipeline's so that
    # diffusers' loaders read the same component signature.
    _guidance: DAGGuidance | SafetyGuidance | None = None
    _in_call: bool = False
    # `dag_scale`: DAG's per-pixel scale `S_dag` of the step, `(B, h, w)`, zero where and when nothing is guided
    _callback_tensor_inputs = [*StableDiffusionPipeline._callback_tensor_inputs, "dag_scale"]  # noqa: RUF012  # diffusers' attribute

    # ------------------------------------------------------------------ configuration

    @property
    def dag_config(self) -> DAGConfig | None:
        """The active [`DAGConfig`], or `None` when DAG is disabled."""
        return None if self._dag is None else self._dag.config

    @property
    def safety_guidance_config(self) -> SLDConfig | SEGAConfig | None:
        """The active plain safety guidance (no detection), or `None`."""
        return self._guidance.config if isinstance(self._guidance, SafetyGuidance) else None

    @property
    def _dag(self) -> DAGState | None:
        """What `enable_dag` prepared (embedding, frozen projections, config), or `None`."""
        return self._guidance.state if isinstance(self._guidance, DAGGuidance) else None

    def enable_dag(
        self,
        embedding: EmbeddingLike | list[EmbeddingLike] | None = None,
        guidance: str = "sega",
        *,
        preset: str | None = None,
        check_fingerprint: bool = True,
        **options: Any,
    ) -> None:
        r"""
        Turns on Detect-and-Guide.

        Args:
            embedding (`str`, `os.PathLike`, `GuidelineEmbedding`, `torch.Tensor`, or a list of them):
                A guideline embedding: a Hub repo id or a local directory saved by
                [`GuidelineEmbedding.save_pretrained`] (loaded with [`GuidelineEmbedding.from_pretrained`]; load it
                yourself for `revision=`, `token=`, ...), a loaded [`GuidelineEmbedding`], or a raw `(1+K, D)`
                tensor (a start-of-text row, then `K` concept rows, in the text encoder's output space,
                `D = unet.config.cross_attention_dim`). A list gives several concepts. A saved embedding's
                `layer_fractions` and thresholds are the defaults for the options below. Without one, the
                embeddings shipped with dag-safety that were made for this UNet (matched by fingerprint; today the
                bundled mini model's red star), else a `ValueError` saying how to get one.
            check_fingerprint (`bool`, *optional*, defaults to `True`):
                Refuse a saved embedding whose base-model fingerprint differs from this UNet's (an embedding is tied
                to the `to_q` / `to_k` projections it was optimized against). `False` skips the check.
            guidance (`str`, *optional*, defaults to `"sega"`):
                The base method whose mask and momentum DAG rescales: `"sega"` or `"sld"`.
            preset (`str`, *optional*):
                With `guidance="sld"`: the SLD preset whose threshold and momentum to use (default: SLD's defaults,
                the `"medium"` values).
            options:
                Fields of [`DAGConfig`] (`unsafe_threshold`, `edit_mask_threshold`, `base_scale`, `max_magnitude`,
                `max_edit_area`, `warmup_steps`, `area_scaler`, `magnitude_scaler`, `layer_fractions`) and of the
                base method's config ([`SEGAConfig`] or [`SLDConfig`], e.g. `edit_threshold`).

        Raises:
            `ValueError`: no or malformed embedding (shape, width, NaN/Inf), unknown method, preset or option,
            thresholds outside `(0, 1]`, no cross-attention layer at the chosen resolutions, or plain safety
            guidance already enabled.
        """
        self._refuse_during_call("enable_dag")
        if self.safety_guidance_config is not None:
            raise ValueError("Plain safety guidance is enabled; call `disable_safety_guidance()` before `enable_dag`.")
        dag = DAGGuidance(embedding, guidance, preset=preset, check_fingerprint=check_fingerprint, **options)
        dag.prepare(self.unet, safety_weights=list(self.safety_weights))
        # replaced only now that everything succeeded: a failed call leaves an enabled DAG as it was
        self._guidance = dag

    def disable_dag(self) -> None:
        """Turns DAG off. (DAG is only on the UNet during a call, so nothing is left there.)"""
        self._refuse_during_call("disable_dag")
        if isinstance(self._guidance, DAGGuidance):
            self._guidance = None

    def _refuse_during_call(self, action: str) -> None:
        """Guidance is fixed for the length of a call: a callback that changes it would leave the denoising loop
        half with one setting and half with another (and DAG attached for the old one)."""
        if self._in_call:
            raise RuntimeError(
                f"`{action}()` was called while the pipeline is generating (from a callback?). Guidance settings"
                " cannot change during a call; change them between calls."
            )

    @contextlib.contextmanager
    def _calling(self):
        """Marks the pipeline as generating, for [`_refuse_during_call`] and against re-entrant calls."""
        if self._in_call:
            raise RuntimeError(
                "The pipeline was called from inside one of its own calls (from a callback?); a pipeline runs one"
                " call at a time. Use a second pipeline (`DAGStableDiffusionPipeline.from_pipe(pipe)`) instead."
            )
        self._in_call = True
        try:
            yield
        finally:
            self._in_call = False

    def enable_safety_guidance(self, method: str = "sld", preset: str | None = None, **overrides: Any) -> None:
        r"""
        Turns on plain SLD or SEGA safety guidance (no detection), as diffusers' deprecated pipelines apply it.

        Args:
            method (`str`, *optional*, defaults to `"sld"`): `"sld"` or `"sega"`.
            preset (`str`, *optional*): SLD only, `"weak"`, `"medium"`, `"strong"` or `"max"`.
            overrides: fields of [`SLDConfig`] (`sld_guidance_scale`, ...) or [`SEGAConfig`] (`edit_guidance_scale`,
                ...), in diffusers' names.

        Raises:
            `ValueError`: unknown method, preset or option, invalid values, or DAG already enabled.
        """
        self._refuse_during_call("enable_safety_guidance")
        if self._dag is not None:
            raise ValueError("DAG is enabled; call `disable_dag()` before `enable_safety_guidance`.")
        self._guidance = SafetyGuidance(method, preset, **overrides)

    def disable_safety_guidance(self) -> None:
        """Turns plain safety guidance off."""
        self._refuse_during_call("disable_safety_guidance")
        if isinstance(self._guidance, SafetyGuidance):
            self._guidance = None

    @torch.no_grad()
    def detection_map(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        r"""
        DAG's detection map for noisy latents: one conditional UNet pass, as inside the denoising loop.

        Args:
            latents (`torch.Tensor`): the UNet's input at `timestep`, `(B, C, h, w)`: noisy latents `x_t` as the
                denoising loop holds them, after the scheduler's `scale_model_input` for schedulers that scale
                (Euler, Heun, ...; DDIM and DDPM do not).
            timestep (`int` or `torch.Tensor`): `t` of the latents (a scalar or `(B,)`).
            prompt (`str` or `list[str]`, *optional*): the prompt(s) the UNet is conditioned on.
            prompt_embeds (`torch.Tensor`, *optional*): `(B, L, D)` instead of `prompt`.
            normalize (`bool`, *optional*, defaults to `True`):
                `False` returns the map before min-max normalisation: the concept rows' attention share (the max
                over concepts for several), whose absolute level says how strongly anything matched.

        Returns:
            `torch.Tensor`: `Â`, `(B, h, w)` in `[0, 1]`, float32 (the raw share with `normalize=False`).
        """
        if self._dag is None:
            raise ValueError("`detection_map` needs DAG; call `pipe.enable_dag(embedding)` first.")
        channels = self.unet.config.in_channels
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"`latents` must be a (B, {channels}, h, w) tensor of noisy latents (the UNet's input), got {shape}."
            )
        batch = latents.shape[0]
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("Pass `prompt` or `prompt_embeds`.")
            prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
            if len(prompts) != batch:
                raise ValueError(f"Got {len(prompts)} prompts for {batch} latents.")
            prompt_embeds, _ = self.encode_prompt(prompts, latents.device, 1, False)
        capture = self._dag.capture
        with capture:
            capture.store.arm(slice(None))
            self.unet(latents, timestep, encoder_hidden_states=prompt_embeds)
            capture.store.disarm()
            return self._dag.detect(tuple(latents.shape[-2:]), normalize).to(latents.device)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  # StableDiffusionPipeline's signature
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
        sd_arguments = dict(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **kwargs,
        )
        self._check_call_arguments(sd_arguments, safety_concept, return_dag_maps)
        with self._calling():
            guidance = self._guidance
            if guidance is None:
                output = super().__call__(**sd_arguments)
                if not return_dict:
                    return output
                return DAGPipelineOutput(images=output.images, nsfw_content_detected=output.nsfw_content_detected)
            dag = guidance if isinstance(guidance, DAGGuidance) else None
            sd_arguments.update(self._step_end_callback(dag, callback_on_step_end, callback_on_step_end_tensor_inputs))
            configured = guidance.safety_concept
            guidance.set_safety_concept(safety_concept)  # `None`: the saved embeddings' concepts, else SLD's text
            if dag is not None:
                dag.map_last_timestep = return_dag_maps
            try:
                # DAG's hooks and UNet wrapper sit on the UNet for this call only
                with guidance.attach(self):
                    output = super().__call__(**sd_arguments)
            finally:
                guidance.set_safety_concept(configured)
        images, nsfw = (output.images, output.nsfw_content_detected) if return_dict else output
        unsafe = maps = presence_scores = None
        if dag is not None:
            seen = dag.last_output
            # no step ran (an interrupted call): nothing was detected
            unsafe = seen.unsafe_detected if seen is not None else [False] * len(images)
            maps = seen.dag_maps if seen is not None and return_dag_maps else None
            presence_scores = seen.presence_scores if seen is not None else None
        if not return_dict:
            return images, nsfw, unsafe, maps, presence_scores
        return DAGPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            unsafe_detected=unsafe,
            dag_maps=maps,
            presence_scores=presence_scores,
        )

    def _step_end_callback(
        self,
        dag: DAGGuidance | None,
        callback: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        requested: list[str],
    ) -> dict[str, Any]:
        """`StableDiffusionPipeline`'s callback arguments for a guided call: the user's callback, given `"dag_scale"`
        (the step's `S_dag`, which `StableDiffusionPipeline`'s loop does not hold) when it asks for it, and, with DAG,
        a check that the final latents are finite (an image DAG could not inspect is never reported safe)."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            requested = callback.tensor_inputs
        if dag is None:
            return {}
        inputs = list(dict.fromkeys([*(k for k in requested if k != "dag_scale"), "latents"]))

        def on_step_end(pipe, step: int, timestep, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            outputs = tensors
            if callback is not None:
                given = {key: tensors[key] for key in requested if key != "dag_scale"}
                if "dag_scale" in requested:
                    latents = tensors["latents"]
                    scale = dag.step_scale
                    # read-only: a callback that returns it changes nothing
                    given["dag_scale"] = (
                        scale if scale is not None else latents.new_zeros(len(latents), *latents.shape[-2:])
                    )
                outputs = {**tensors, **callback(pipe, step, timestep, given)}
                outputs.pop("dag_scale", None)
            if step == pipe.num_timesteps - 1 and not torch.isfinite(outputs["latents"]).all():
                raise FloatingPointError(
                    "The latents are not finite (NaN or Inf) after denoising, so DAG could not inspect the images:"
                    " a callback returned non-finite latents, or the scheduler diverged (e.g. `eta=1` with very few"
                    " DDIM steps). Nothing is returned as safe."
                )
            return outputs

        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": inputs}

    def _check_call_arguments(
        self, arguments: dict[str, Any], safety_concept: str | list[str] | None, return_dag_maps: bool
    ) -> None:
        """Refuses, before any work, what `StableDiffusionPipeline.__call__` would let through silently or fail on
        with a raw library error: unknown keywords, sizes and counts that are not positive integers, `height`
        without `width`, non-finite scales, and safety arguments without the guidance they belong to.

        A call that passes is run as `StableDiffusionPipeline.__call__` runs it: these checks only reject.
        """
        known = set(inspect.signature(type(self).__call__).parameters) - {"self", "kwargs"}
        unknown = [key for key in arguments if key not in known and key not in ("callback", "callback_steps")]
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f". Valid arguments: {sorted(known)}."
            raise TypeError(f"`{type(self).__name__}.__call__` got an unexpected keyword argument `{key}`{hint}")

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
