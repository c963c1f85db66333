"""`SafetyGuidanceMixin`: `enable_dag` / `enable_safety_guidance` for a diffusers pipeline, over the attach API.

The enabled guidance is a [`DAGGuidance`] or [`SafetyGuidance`]; a guided call attaches it to the pipeline for its
length and runs the pipeline's own `__call__`. `DAGStableDiffusionPipeline` and `DAGStableDiffusionXLPipeline` are
this mixin on diffusers' pipelines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .attach import DAGGuidance, DAGGuidanceOutput, SafetyGuidance
from .conditioning import added_conditioning, unet_conditioning
from .config import DAGConfig, SEGAConfig, SLDConfig
from .state import DAGState, EmbeddingLike

__all__ = ["SafetyGuidanceMixin"]


class SafetyGuidanceMixin:
    """DAG, SLD and SEGA switched on and off on a pipeline with a `unet`; see `DAGStableDiffusionPipeline`."""

    # Per-instance state, set by the enable/disable methods; the pipelines' `__init__` stays diffusers' so that its
    # loaders read the same component signature.
    _guidance: DAGGuidance | SafetyGuidance | None = None
    _in_call: bool = False

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
                `layer_fractions`, thresholds and default `detection` rule are the defaults for the options below,
                and so are its erase settings (`hold_detection`, `fill_region`, `erase_mode`, `components`) under
                that rule: choosing another rule, e.g. `detection="paper"`, starts from the paper's own settings.
                Without one, the embeddings shipped with dag-safety that were made for this UNet (matched by
                fingerprint; today the bundled mini model's red star), else a `ValueError` saying how to get one.
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
        dag.prepare(self.unet, safety_weights=list(getattr(self, "safety_weights", None) or []))
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
                f" call at a time. Use a second pipeline (`{type(self).__name__}.from_pipe(pipe)`) instead."
            )
        self._in_call = True
        try:
            yield
        finally:
            self._in_call = False

    def enable_safety_guidance(self, guidance: str = "sld", preset: str | None = None, **overrides: Any) -> None:
        r"""
        Turns on plain SLD or SEGA safety guidance (no detection), as diffusers' deprecated pipelines apply it.

        Args:
            guidance (`str`, *optional*, defaults to `"sld"`): `"sld"` or `"sega"`.
            preset (`str`, *optional*): SLD only, `"weak"`, `"medium"`, `"strong"` or `"max"`.
            overrides: fields of [`SLDConfig`] (`sld_guidance_scale`, ...) or [`SEGAConfig`] (`edit_guidance_scale`,
                ...), in diffusers' names.

        Raises:
            `ValueError`: unknown method, preset or option, invalid values, or DAG already enabled.
        """
        self._refuse_during_call("enable_safety_guidance")
        if self._dag is not None:
            raise ValueError("DAG is enabled; call `disable_dag()` before `enable_safety_guidance`.")
        self._guidance = SafetyGuidance(guidance, preset, **overrides)

    def disable_safety_guidance(self) -> None:
        """Turns plain safety guidance off."""
        self._refuse_during_call("disable_safety_guidance")
        if isinstance(self._guidance, SafetyGuidance):
            self._guidance = None

    @torch.no_grad()
    def dag_map(
        self,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        normalize: bool = True,
        pooled_prompt_embeds: torch.Tensor | None = None,
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
            pooled_prompt_embeds (`torch.Tensor`, *optional*): SDXL only, `(B, P)`, with `prompt_embeds`. SDXL's
                time ids are those of an image the latents' size, uncropped.

        Returns:
            `torch.Tensor`: `Â`, `(B, h, w)` in `[0, 1]`, float32 (the raw share with `normalize=False`).
        """
        if self._dag is None:
            raise ValueError("`dag_map` needs DAG; call `pipe.enable_dag(embedding)` first.")
        channels = self.unet.config.in_channels
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"`latents` must be a (B, {channels}, h, w) tensor of noisy latents (the UNet's input), got {shape}."
            )
        batch = latents.shape[0]
        size = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
        sdxl = self.unet.config.addition_embed_type == "text_time"
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("Pass `prompt` or `prompt_embeds`.")
            prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
            if len(prompts) != batch:
                raise ValueError(f"Got {len(prompts)} prompts for {batch} latents.")
            prompt_embeds, added = unet_conditioning(self, prompts, latents.device, 1, size)
        elif sdxl:
            if pooled_prompt_embeds is None:
                raise ValueError("An SDXL UNet needs `pooled_prompt_embeds` with `prompt_embeds`; or pass `prompt`.")
            added = added_conditioning(self, pooled_prompt_embeds, size)
        else:
            added = None
        capture = self._dag.capture
        with capture:
            capture.store.arm(slice(None))
            self.unet(latents, timestep, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added)
            capture.store.disarm()
            return self._dag.detect(tuple(latents.shape[-2:]), normalize).to(latents.device)

    def _run_guided(
        self,
        run: Callable[..., Any],
        arguments: dict[str, Any],
        safety_concept: str | list[str] | None,
        return_dag_maps: bool,
        args: tuple = (),
    ) -> tuple[Any, DAGGuidanceOutput | None]:
        """Runs `run(*args, **arguments)` (the pipeline's own `__call__`) with the enabled guidance attached.

        Returns:
            `(output, seen)`: the call's output, and what DAG detected (`None` without DAG or if no step ran).
        """
        guidance = self._guidance
        dag = guidance if isinstance(guidance, DAGGuidance) else None
        arguments = {
            **arguments,
            **self._step_end_callback(
                dag,
                arguments.get("callback_on_step_end"),
                arguments.get("callback_on_step_end_tensor_inputs", ["latents"]),
            ),
        }
        configured = guidance.safety_concept
        guidance.set_safety_concept(safety_concept)  # `None`: the saved embeddings' concepts, else SLD's text
        if dag is not None:
            dag.map_last_timestep = return_dag_maps
        try:
            # DAG's hooks and UNet wrapper sit on the UNet for this call only
            with guidance.attach(self):
                output = run(*args, **arguments)
        finally:
            guidance.set_safety_concept(configured)
        return output, None if dag is None else dag.last_output

    def _dag_outputs(
        self, seen: DAGGuidanceOutput | None, num_images: int, return_dag_maps: bool
    ) -> tuple[list[bool] | None, torch.Tensor | None, list[float] | None]:
        """`(unsafe_detected, dag_maps, presence_scores)` of a call's output; all `None` without DAG."""
        if self._dag is None:
            return None, None, None
        if seen is None:  # no step ran (an interrupted call): nothing was detected
            return [False] * num_images, None, None
        return seen.unsafe_detected, seen.dag_maps if return_dag_maps else None, seen.presence_scores

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
