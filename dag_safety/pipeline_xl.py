"""`DAGStableDiffusionXLPipeline`: SDXL with Detect-and-Guide, SLD or SEGA safety guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from .guidance_mixin import SafetyGuidanceMixin

__all__ = ["DAGStableDiffusionXLPipeline", "DAGStableDiffusionXLPipelineOutput"]


@dataclass
class DAGStableDiffusionXLPipelineOutput(StableDiffusionXLPipelineOutput):
    """Output of [`DAGStableDiffusionXLPipeline`]: `images`, and with DAG enabled `unsafe_detected` (per image),
    `dag_maps` (`(B, h, w)`, the last detection map, when `return_dag_maps=True`) and `presence_scores` (under
    `detection="presence"`), as in `DAGPipelineOutput`."""

    unsafe_detected: list[bool] | None = None
    dag_maps: torch.Tensor | None = None
    presence_scores: list[float] | None = None


class DAGStableDiffusionXLPipeline(SafetyGuidanceMixin, StableDiffusionXLPipeline):
    r"""
    [`StableDiffusionXLPipeline`] with DAG, SLD or SEGA safety guidance, enabled as on `DAGStableDiffusionPipeline`:
    `enable_dag(embedding, guidance="sega", **options)` / `disable_dag()`, `enable_safety_guidance(guidance, preset,
    **overrides)` / `disable_safety_guidance()`, and `pipe(prompt, safety_concept=..., return_dag_maps=...)`.

    Each call attaches the enabled [`DAGGuidance`] or [`SafetyGuidance`] to this pipeline for its length, so
    between calls the UNet is the stock one and pipelines sharing it (`from_pipe`) are unaffected. With nothing
    enabled the pipeline is `StableDiffusionXLPipeline`, output for output. The guideline embedding must be in
    SDXL's context space (`unet.config.cross_attention_dim`, 2048 for SDXL base).
    """

    # `dag_scale`: DAG's per-pixel scale `S_dag` of the step, `(B, h, w)`, zero where and when nothing is guided
    _callback_tensor_inputs = [*StableDiffusionXLPipeline._callback_tensor_inputs, "dag_scale"]  # noqa: RUF012  # diffusers' attribute

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
            [`DAGStableDiffusionXLPipelineOutput`], or with `return_dict=False` `(images,)` without DAG and
            `(images, unsafe_detected, dag_maps, presence_scores)` with it.

        Raises:
            `ValueError`: `safety_concept`, `return_dag_maps` or a `"dag_scale"` callback input without the guidance
            it needs, or safety guidance without classifier-free guidance.
        """
        return_dict = kwargs.get("return_dict", True)
        if self._dag is None and (
            return_dag_maps or "dag_scale" in kwargs.get("callback_on_step_end_tensor_inputs", ())
        ):
            raise ValueError(
                "`return_dag_maps` and the 'dag_scale' callback input need DAG; call `pipe.enable_dag(embedding)` first."
            )
        if self._guidance is None and safety_concept is not None:
            # ignoring it would generate unprotected images while the caller believes them guided
            raise ValueError(
                f"`safety_concept={safety_concept!r}` needs safety guidance, and none is enabled: call"
                " `pipe.enable_dag(embedding)` or `pipe.enable_safety_guidance('sega' | 'sld')` first."
            )
        with self._calling():
            if self._guidance is None:
                output = super().__call__(*args, **kwargs)
                return DAGStableDiffusionXLPipelineOutput(images=output.images) if return_dict else output
            output, seen = self._run_guided(super().__call__, kwargs, safety_concept, return_dag_maps, args)
        images = output.images if return_dict else output[0]
        unsafe, maps, presence = self._dag_outputs(seen, len(images), return_dag_maps)
        if not return_dict:
            return (images,) if self._dag is None else (images, unsafe, maps, presence)
        return DAGStableDiffusionXLPipelineOutput(
            images=images, unsafe_detected=unsafe, dag_maps=maps, presence_scores=presence
        )
