"""Safety guidance as a component that attaches to a stock diffusers pipeline: [`DAGGuidance`], [`SafetyGuidance`].

`attach(pipe)` wraps the forward of the pipeline's `UNet2DConditionModel`. The host pipeline runs its own loop and
classifier-free guidance; at each UNet call the wrapper appends the safety-concept rows to the CFG batch when the
guider asks for them (DAG: only while it detects something), combines `e_u`, `e_p` and `e_s` with the guider into
the guided prediction `e`, and returns `[e, e]`: the host's own line `e_u + s_g (e_c - e_u)` then yields `e`
exactly, so the guided steps equal `DAGStableDiffusionPipeline`'s (a `guidance_rescale` is applied to `e` against
`e_p` by the wrapper, as that pipeline does; the host's own rescale of `[e, e]` changes nothing). A step DAG does not
guide returns the UNet's output untouched, so an attached pipeline that detects nothing is the stock pipeline, bit
for bit.
DAG's queries come from forward pre-hooks on the detection layers' `attn2`, so whichever attention processor the
user set keeps running.

This works for any pipeline whose denoiser is a `UNet2DConditionModel` called once per step on the
`[uncond, cond]` batch: Stable Diffusion 1.x / 2.x and SDXL, their image-to-image and inpainting pipelines, and
ControlNet. Per-row inputs of the UNet call (added conditioning, IP-Adapter image embeds, ControlNet residuals)
follow the prompt's row into the safety rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ._validation import concept_list
from .config import SLD_SAFETY_CONCEPT, DAGConfig, SLDConfig, build_config, split_dag_options
from .guiders import DAGGuider, PlainSafetyGuider, SafetyGuider
from .state import DAGState, EmbeddingLike, prepare_dag

__all__ = ["DAGGuidance", "DAGGuidanceOutput", "SafetyGuidance"]


@dataclass
class DAGGuidanceOutput:
    """What DAG saw in the last call of the pipeline it is attached to.

    Args:
        unsafe_detected (`list[bool]`): per image, whether an unsafe component was detected (and guided) at any
            guided step.
        dag_maps (`torch.Tensor` or `None`): the last detection map `Â`, `(B, h, w)` at latent resolution, float32 on
            the CPU (`None` if no step got past warm-up).
        presence_scores (`list[float]` or `None`): under `detection="presence"` or `"head"`, per image the highest
            component presence score of any guided step (with `confirm_steps=k`, the `k`-th highest of the steps'
            highest); `None` under the paper's rule.
    """

    unsafe_detected: list[bool]
    dag_maps: torch.Tensor | None = None
    presence_scores: list[float] | None = None


def _rows(value: Any, batch: int, select: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Applies `select` to every tensor in `value` (nested in lists, tuples and dicts) whose first dimension is the
    CFG batch `2 * batch`; everything else (scalars, shared tensors, options) is returned as is."""
    if isinstance(value, torch.Tensor):
        return select(value) if value.ndim > 0 and value.shape[0] == 2 * batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, batch, select) for item in value)
    if isinstance(value, dict):
        return {key: _rows(item, batch, select) for key, item in value.items()}
    return value


class _AttachedGuidance:
    """Attach / detach and the UNet wrapper shared by [`DAGGuidance`] and [`SafetyGuidance`]."""

    def __init__(self):
        self.safety_concept: list[str] | None = None
        self._pipe = None
        self._unet: UNet2DConditionModel | None = None
        self._forward = None
        self._guider: SafetyGuider | None = None
        self._call_timesteps: torch.Tensor | None = None
        self._step = 0
        self._safety_embeds: list[torch.Tensor] = []

    # ------------------------------------------------------------------ attach / detach

    def set_safety_concept(self, safety_concept: str | list[str] | None) -> None:
        """The text(s) to steer away from from the next call on (`None`: the default, see the class)."""
        self.safety_concept = None if safety_concept is None else concept_list(safety_concept)

    @property
    def attached(self) -> bool:
        return self._pipe is not None

    def attach(self, pipe) -> Self:
        """Guides `pipe`'s denoising from its next call on; returns `self`, so `with guidance.attach(pipe): ...`
        detaches on exit.

        Args:
            pipe: a diffusers pipeline with a `unet` (`UNet2DConditionModel`), a `scheduler` and `encode_prompt`,
                that runs classifier-free guidance.

        Raises:
            `TypeError`: no `UNet2DConditionModel` as `pipe.unet`.
            `ValueError`: this guidance attached elsewhere, or other safety guidance already on the pipeline; for
                DAG, see `DAGStableDiffusionPipeline.enable_dag`.
        """
        # a torch.compile'd UNet: wrap the model it compiles, whose forward the compiled module calls
        unet = getattr(pipe, "unet", None)
        unet = getattr(unet, "_orig_mod", unet)
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(
                f"{type(self).__name__} attaches to pipelines whose denoiser is a `UNet2DConditionModel` (Stable"
                f" Diffusion 1.x / 2.x, SDXL and their img2img / inpainting / ControlNet pipelines); got a"
                f" {type(unet).__name__} as `pipe.unet`."
            )
        if self.attached:
            raise ValueError(f"This {type(self).__name__} is already attached to a pipeline; `detach()` it first.")
        other = getattr(unet, "_dag_safety_guidance", None)
        if other is not None:
            raise ValueError(
                f"The pipeline's UNet already has {type(other).__name__} attached; detach it first (one safety"
                " guidance at a time)."
            )
        enabled = (
            getattr(pipe, "dag_config", None) is not None or getattr(pipe, "safety_guidance_config", None) is not None
        )
        if enabled and getattr(pipe, "_guidance", None) is not self:  # a DAG pipeline attaches its own per call
            raise ValueError(
                "The pipeline has safety guidance enabled (`enable_dag` / `enable_safety_guidance`); call"
                " `disable_dag()` / `disable_safety_guidance()` before attaching another."
            )
        self.prepare(unet, safety_weights=getattr(pipe, "safety_weights", None))  # may raise: nothing attached yet
        self._install(unet)
        original = unet.__dict__.get("forward")
        unet.forward = self._guided_forward
        unet._dag_safety_guidance = self
        self._pipe, self._unet, self._forward = pipe, unet, original
        self._call_timesteps, self._guider = None, None
        return self

    def detach(self) -> None:
        """Restores the stock UNet: its own forward and no hooks. Does nothing when not attached."""
        unet = self._unet
        if unet is None:
            return
        if self._forward is None:
            del unet.forward
        else:
            unet.forward = self._forward
        del unet._dag_safety_guidance
        self._uninstall()
        self._pipe = self._unet = self._forward = None

    def __enter__(self) -> Self:
        if not self.attached:
            raise ValueError(f"Use `with {type(self).__name__}(...).attach(pipe):`.")
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    # ------------------------------------------------------------------ per method

    def prepare(self, unet: UNet2DConditionModel, safety_weights: list[str] | None = None) -> None:
        """Checks what the method needs from `unet` ([`attach`] calls it; call it first to get the errors at
        setup). For DAG: loads and checks the embedding and freezes the detection layers' projections.

        Args:
            unet (`UNet2DConditionModel`): the UNet to be guided.
            safety_weights (`list[str]`, *optional*): the names of safety weights loaded on it, for a clearer
                fingerprint error.
        """

    def _install(self, unet: UNet2DConditionModel) -> None:
        """Hooks the method needs on the UNet."""

    def _uninstall(self) -> None:
        """Removes what [`_install`] put on the UNet."""

    def _default_concepts(self) -> list[str]:
        return [SLD_SAFETY_CONCEPT]

    def _new_guider(self, guidance_scale: float, num_concepts: int, device: torch.device) -> SafetyGuider:
        raise NotImplementedError

    # ------------------------------------------------------------------ the UNet wrapper

    def _original_forward(self) -> Callable:
        if self._forward is not None:
            return self._forward
        return UNet2DConditionModel.forward.__get__(self._unet)

    def _begin_call(self, device: torch.device) -> None:
        """A new pipeline call (the scheduler's timesteps were set anew): a fresh guider and the safety concepts
        encoded with the host's own text encoder (its LoRA scale and `clip_skip` included)."""
        pipe = self._pipe
        if not getattr(pipe, "do_classifier_free_guidance", False):
            raise ValueError(
                f"{type(self).__name__} works on top of classifier-free guidance, which this call does not run"
                f" (guidance_scale={getattr(pipe, 'guidance_scale', None)}). Use `guidance_scale > 1`, or detach the"
                " safety guidance."
            )
        concepts = self.safety_concept or self._default_concepts()
        if len(concepts) > 1 and self._is_sld():
            raise ValueError(f"SLD guides away from one safety concept; got {len(concepts)}. Use SEGA for several.")
        attention_kwargs = getattr(pipe, "cross_attention_kwargs", None) or {}
        # one text-encoder call for all concepts, as diffusers' SEGA does
        encoded = pipe.encode_prompt(
            prompt=concepts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            lora_scale=attention_kwargs.get("scale"),
            clip_skip=getattr(pipe, "clip_skip", None),
        )[0]
        self._safety_embeds = list(encoded[:, None])
        self._guider = self._new_guider(pipe.guidance_scale, len(concepts), device)
        self._step = 0

    def _is_sld(self) -> bool:
        return False

    def _guided_forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        timesteps = getattr(self._pipe.scheduler, "timesteps", None)
        if self._guider is None or timesteps is not self._call_timesteps:
            self._begin_call(sample.device)
            self._call_timesteps = timesteps
        forward = self._original_forward()
        return_dict = kwargs.pop("return_dict", True)
        if sample.shape[0] % 2:
            raise ValueError(
                f"{type(self).__name__} expects the UNet batch `[uncond, cond]` of classifier-free guidance, got an"
                f" odd batch of {sample.shape[0]}."
            )
        batch = sample.shape[0] // 2
        guider, step = self._guider, self._step
        self._step += 1
        rows = guider.safety_rows(step)

        def extended(value: Any, count: int) -> Any:
            """The CFG batch's per-row inputs with the prompt's rows repeated for `count` safety rows (as they are,
            not copied, for none)."""
            if count == 0:
                return value
            return _rows(value, batch, lambda x: torch.cat([x] + [x[batch:]] * count))

        def run(sample_, timestep_, states, args_, kwargs_) -> torch.Tensor:
            return forward(sample_, timestep_, states, *args_, **kwargs_, return_dict=False)[0]

        safety = [embeds.to(encoder_hidden_states.dtype).expand(batch, -1, -1) for embeds in self._safety_embeds]
        with guider.capturing(step, batch):
            output = run(
                extended(sample, rows),
                extended(timestep, rows),
                torch.cat([encoder_hidden_states, *safety[:rows]]) if rows else encoder_hidden_states,
                extended(args, rows),
                extended(kwargs, rows),
            )
        noise_pred_uncond, noise_pred_text, *noise_preds_safety = output.chunk(2 + rows)

        def run_safety() -> list[torch.Tensor]:
            def half(value: Any) -> Any:
                return _rows(value, batch, lambda x: x[batch:])

            return [run(half(sample), half(timestep), states, half(args), half(kwargs)) for states in safety]

        noise_pred = guider.guide(
            step, noise_pred_uncond, noise_pred_text, noise_preds_safety, run_safety, sample, timestep
        )
        if isinstance(guider, DAGGuider) and not guider.modified:
            # nothing guided: the CFG rows as the UNet gave them, for the host's own CFG line
            output = output[: 2 * batch]
        else:
            rescale = getattr(self._pipe, "guidance_rescale", 0.0)
            if rescale > 0:
                # against `e_p`, as the host would rescale its own CFG prediction
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=rescale)
            # `[e, e]`: the host's `e_u + s_g (e_c - e_u)` is `e` exactly, and its rescale (`std(e) / std(e)`) a no-op
            output = torch.cat([noise_pred, noise_pred])
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)


class SafetyGuidance(_AttachedGuidance):
    r"""
    SLD or SEGA safety guidance (no detection) attached to a stock diffusers pipeline, as diffusers' deprecated
    `StableDiffusionPipelineSafe` / `SemanticStableDiffusionPipeline` apply it, on any UNet pipeline.

    Args:
        guidance (`str`, *optional*, defaults to `"sld"`): `"sld"` or `"sega"`.
        preset (`str`, *optional*): SLD only, `"weak"`, `"medium"`, `"strong"` or `"max"`.
        safety_concept (`str` or `list[str]`, *optional*): the text(s) to steer away from; defaults to SLD's
            concept text. Several need SEGA.
        overrides: fields of [`SLDConfig`] or [`SEGAConfig`], in diffusers' names.

    Example:
        ```py
        >>> guidance = SafetyGuidance("sega", safety_concept="a red star").attach(pipe)
        >>> image = pipe("a red star and a blue circle").images[0]
        >>> guidance.detach()
        ```

    Steps are counted per UNet call, so warm-up steps are UNet evaluations (the same for first-order schedulers).
    """

    def __init__(
        self,
        guidance: str = "sld",
        preset: str | None = None,
        *,
        safety_concept: str | list[str] | None = None,
        **overrides: Any,
    ):
        super().__init__()
        self.set_safety_concept(safety_concept)
        self.config = build_config(guidance, preset, **overrides)
        if isinstance(self.config, SLDConfig) and self.config.sld_guidance_scale <= 1:
            # StableDiffusionPipelineSafe turns SLD off at this scale; guiding anyway would not be SLD, and generating
            # unguided would be a silent fallback
            raise ValueError(
                f"sld_guidance_scale={self.config.sld_guidance_scale} turns SLD off (diffusers applies it only above"
                " 1). Use a scale above 1, or no safety guidance for unguided generation (`disable_safety_guidance()`"
                " on a DAG pipeline)."
            )

    def _is_sld(self) -> bool:
        return isinstance(self.config, SLDConfig)

    def _new_guider(self, guidance_scale: float, num_concepts: int, device: torch.device) -> SafetyGuider:
        return PlainSafetyGuider(self.config, guidance_scale, num_concepts)


class DAGGuidance(_AttachedGuidance):
    r"""
    Detect-and-Guide attached to a stock diffusers pipeline: at every step DAG detects the unsafe region from the
    UNet's cross-attention queries and a guideline embedding, and applies the SEGA or SLD safety direction only
    there, scaled per pixel by the paper's AreaScaler and MagnitudeScaler.

    Args:
        embedding: a guideline embedding, as for `DAGStableDiffusionPipeline.enable_dag` (Hub id, directory,
            [`GuidelineEmbedding`], `(1+K, D)` tensor, or a list). It is loaded and checked against the UNet at
            the first `attach` to it, which also freezes the detection layers' projections (weights loaded later do
            not change what the embedding scores, as with `enable_dag`). `None`: the embeddings shipped with dag-safety that were made for the UNet (matched by
            fingerprint; today the bundled mini model's red star), else an error saying how to get one.
        guidance (`str`, *optional*, defaults to `"sega"`): the base method, `"sega"` or `"sld"`.
        safety_concept (`str` or `list[str]`, *optional*): the text(s) to steer away from (`e_s`); defaults to what
            the saved embeddings name, else SLD's concept text.
        preset (`str`, *optional*): with `guidance="sld"`, the SLD preset.
        check_fingerprint (`bool`, *optional*, defaults to `True`): refuse an embedding made for another UNet.
        options: fields of [`DAGConfig`] and of the base method's config, as for `enable_dag`.

    Example:
        ```py
        >>> dag = DAGGuidance("embeddings/red-star")
        >>> with dag.attach(pipe):
        ...     image = pipe("a red star and a blue circle").images[0]
        >>> dag.last_output.unsafe_detected
        ```

    Steps are counted per UNet call, so warm-up steps are UNet evaluations (the same for first-order schedulers).
    """

    def __init__(
        self,
        embedding: EmbeddingLike | list[EmbeddingLike] | None = None,
        guidance: str = "sega",
        *,
        safety_concept: str | list[str] | None = None,
        preset: str | None = None,
        check_fingerprint: bool = True,
        **options: Any,
    ):
        super().__init__()
        self.set_safety_concept(safety_concept)
        #: also detect at the scheduler's last timestep when it falls in the warm-up (for `return_dag_maps`)
        self.map_last_timestep = False
        self._embedding = embedding
        self._options = {"guidance": guidance, "preset": preset, "check_fingerprint": check_fingerprint, **options}
        # the base method and its options are checked now; the embedding and DAG's options against the UNet at
        # `attach`
        build_config(guidance, preset, **split_dag_options(options)[1])
        self.state: DAGState | None = None

    def prepare(self, unet: UNet2DConditionModel, safety_weights: list[str] | None = None) -> None:
        # once per UNet: the embedding stays tied to the projections it was first attached with, as `enable_dag`
        # freezes them, and attaching per call costs nothing
        if self.state is None or self.state.capture.unet is not getattr(unet, "_orig_mod", unet):
            self.state = prepare_dag(unet, self._embedding, safety_weights=safety_weights, **self._options)

    def _install(self, unet: UNet2DConditionModel) -> None:
        self.state.capture.install()

    def _uninstall(self) -> None:
        self.state.capture.remove()

    def _is_sld(self) -> bool:
        return isinstance(self.state.config.base, SLDConfig)

    def _default_concepts(self) -> list[str]:
        return self.state.safety_concepts or [SLD_SAFETY_CONCEPT]

    def _new_guider(self, guidance_scale: float, num_concepts: int, device: torch.device) -> SafetyGuider:
        # where the UNet runs this call (with model offload, not where its weights rest between calls)
        self.state.follow(device, self._unet.dtype)
        map_step = len(self._pipe.scheduler.timesteps) - 1 if self.map_last_timestep else None
        return DAGGuider(self.state, guidance_scale, num_concepts, map_step=map_step, scheduler=self._pipe.scheduler)

    @property
    def config(self) -> DAGConfig | None:
        """The active [`DAGConfig`] (available once attached)."""
        return None if self.state is None else self.state.config

    @property
    def step_scale(self) -> torch.Tensor | None:
        """`S_dag` of the last UNet call, `(B, h, w)` on the latents' device; `None` where it guided nothing."""
        return self._guider.scale if isinstance(self._guider, DAGGuider) else None

    @property
    def last_output(self) -> DAGGuidanceOutput | None:
        """What DAG detected in the last (or current) call; `None` before the first UNet call."""
        guider = self._guider
        if not isinstance(guider, DAGGuider) or guider.unsafe_detected is None:
            return None
        return DAGGuidanceOutput(
            unsafe_detected=guider.unsafe_detected.tolist(),
            dag_maps=guider.dag_map,
            presence_scores=None if guider.presence_peak is None else guider.presence_peak.tolist(),
        )
