"""`DAGStableDiffusionXLPipeline`: SDXL with Detect-and-Guide, SLD or SEGA, as a thin layer over the attach API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from .attach import DAGGuidance, SafetyGuidance
from .config import DAGConfig, SEGAConfig, SLDConfig
from .state import EmbeddingLike

__all__ = ["DAGStableDiffusionXLPipeline", "DAGStableDiffusionXLPipelineOutput"]


@dataclass
class DAGStableDiffusionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """Output of [`DAGStableDiffusionXLPipeline`]: `images`, and with DAG enabled `unsafe_detected` (per image),
    `dag_maps` (`(B, h, w)`, the last detection map, when `return_dag_maps=True`) and `presence_scores` (under
    `detection="presence"`), as in `DAGPipelineOutput`."""

    unsafe_detected: list[bool] | None = None
    dag_maps: torch.Tensor | None = None
    presence_scores: list[float] | None = None


class DAGStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    r"""
    [`StableDiffusionXLPipeline`] with DAG, SLD or SEGA safety guidance, enabled as on `DAGStableDiffusionPipeline`:
    `enable_dag(embedding, guidance="sega", **options)` / `disable_dag()`, `enable_safety_guidance(method, preset,
    **overrides)` / `disable_safety_guidance()`, and `pipe(prompt, safety_concept=..., return_dag_maps=...)`.

    Each call attaches the enabled [`DAGGuidance`] or [`SafetyGuidance`] to this pipeline for its length, so
    between calls the UNet is the stock one and pipelines sharing it (`from_pipe`) are unaffected. With nothing
    enabled the pipeline is `StableDiffusionXLPipeline`, output for output. The guideline embedding must be in
    SDXL's context space (`unet.config.cross_attention_dim`, 2048 for SDXL base).
    """

    _guidance: DAGGuidance | SafetyGuidance | None = None

    @property
    def dag_config(self) -> DAGConfig | None:
        """The active [`DAGConfig`], or `None` when DAG is disabled."""
        return self._guidance.config if isinstance(self._guidance, DAGGuidance) else None

    @property
    def safety_guidance_config(self) -> SLDConfig | SEGAConfig | None:
        """The active plain safety guidance (no detection), or `None`."""
        return self._guidance.config if isinstance(self._guidance, SafetyGuidance) else None

    def enable_dag(
        self,
        embedding: EmbeddingLike | list[EmbeddingLike] | None = None,
        guidance: str = "sega",
        *,
        preset: str | None = None,
        check_fingerprint: bool = True,
        **options: Any,
    ) -> None:
        """Turns on Detect-and-Guide; arguments as `DAGStableDiffusionPipeline.enable_dag`. The embedding is
        checked against this UNet now, and its projections frozen.

        Raises:
            `ValueError`: see `DAGStableDiffusionPipeline.enable_dag`.
        """
        if self.safety_guidance_config is not None:
            raise ValueError("Plain safety guidance is enabled; call `disable_safety_guidance()` before `enable_dag`.")
        dag = DAGGuidance(embedding, guidance, preset=preset, check_fingerprint=check_fingerprint, **options)
        dag.prepare(self.unet)  # may raise: the guidance enabled before stays
        self._guidance = dag

    def disable_dag(self) -> None:
        """Turns DAG off."""
        if isinstance(self._guidance, DAGGuidance):
            self._guidance = None

    def enable_safety_guidance(self, method: str = "sld", preset: str | None = None, **overrides: Any) -> None:
        """Turns on plain SLD or SEGA; arguments as `DAGStableDiffusionPipeline.enable_safety_guidance`.

        Raises:
            `ValueError`: unknown method, preset or option, invalid values, or DAG already enabled.
        """
        if self.dag_config is not None:
            raise ValueError("DAG is enabled; call `disable_dag()` before `enable_safety_guidance`.")
        self._guidance = SafetyGuidance(method, preset, **overrides)

    def disable_safety_guidance(self) -> None:
        """Turns plain safety guidance off."""
        if isinstance(self._guidance, SafetyGuidance):
            self._guidance = None

    @torch.no_grad()
    def __call__(
        self,
        *args,
        safety_concept: str | list[str] | None = None,
        return_dag_maps: bool = False,
        **kwargs,
    ) -> DAGStableDiffusionXLPipelineOutput | tuple:
        r"""
        Generates images; every argument of `StableDiffusionXLPipeline.__call__` works as there.

        Args:
            safety_concept (`str` or `list[str]`, *optional*): the text(s) to steer away from; defaults to what
                the saved embeddings name, else SLD's concept text.
            return_dag_maps (`bool`, *optional*, defaults to `False`): with DAG, also return the last detection map.

        Returns:
            [`DAGStableDiffusionXLPipelineOutput`], or with `return_dict=False` `(images,)` without guidance and
            `(images, unsafe_detected, dag_maps, presence_scores)` with DAG.

        Raises:
            `ValueError`: `safety_concept` or `return_dag_maps` without the guidance they need, or safety guidance
            without classifier-free guidance.
        """
        guidance = self._guidance
        if guidance is None:
            if safety_concept is not None or return_dag_maps:
                # ignoring them would generate unprotected images while the caller believes them guided
                raise ValueError(
                    "`safety_concept` / `return_dag_maps` need safety guidance, and none is enabled: call"
                    " `pipe.enable_dag(embedding)` or `pipe.enable_safety_guidance('sega' | 'sld')` first."
                )
            output = super().__call__(*args, **kwargs)
            return (
                DAGStableDiffusionXLPipelineOutput(images=output.images) if kwargs.get("return_dict", True) else output
            )
        if return_dag_maps and not isinstance(guidance, DAGGuidance):
            raise ValueError("`return_dag_maps=True` needs DAG; call `pipe.enable_dag(embedding)` first.")
        configured = guidance.safety_concept
        if safety_concept is not None:
            guidance.set_safety_concept(safety_concept)
        try:
            with guidance.attach(self):
                output = super().__call__(*args, **kwargs)
        finally:
            guidance.safety_concept = configured
        images = output.images if kwargs.get("return_dict", True) else output[0]
        seen = guidance.last_output if isinstance(guidance, DAGGuidance) else None
        unsafe = maps = presence = None
        if seen is not None:
            unsafe, presence = seen.unsafe_detected, seen.presence_scores
            maps = seen.dag_maps if return_dag_maps else None
        if not kwargs.get("return_dict", True):
            return (images,) if seen is None else (images, unsafe, maps, presence)
        return DAGStableDiffusionXLPipelineOutput(
            images=images, unsafe_detected=unsafe, dag_maps=maps, presence_scores=presence
        )
