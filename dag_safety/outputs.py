"""Output dataclass of [`DAGStableDiffusionPipeline`]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

__all__ = ["DAGPipelineOutput"]


@dataclass
class DAGPipelineOutput(StableDiffusionPipelineOutput):
    """Output of [`DAGStableDiffusionPipeline`].

    Args:
        images (`list[PIL.Image.Image]` or `np.ndarray` or `torch.Tensor`):
            The generated images, as `StableDiffusionPipelineOutput.images`.
        nsfw_content_detected (`list[bool]` or `None`):
            The safety checker's verdicts, as in `StableDiffusionPipelineOutput`.
        unsafe_detected (`list[bool]` or `None`):
            One per image with DAG enabled: `True` when an unsafe component was detected (and guided) at any
            guided step. `None` when DAG is not enabled (nothing was detected).
        dag_maps (`torch.Tensor` or `None`):
            The last step's detection map `Â` per image, `(B, h, w)` at latent resolution in `[0, 1]`, float32
            on the CPU, when `return_dag_maps=True`.
        presence_scores (`list[float]` or `None`):
            One per image under DAG's selective rules (`detection="presence"` or `"head"`, where the score is the
            presence head's probability): the highest presence score any unsafe component reached at any guided
            step (0 if none formed); with `confirm_steps=k`, the `k`-th highest of the steps' highest scores. An
            image is guided once its score
            reaches `presence_threshold`, so the score says how close a benign image came to being guided and,
            on unguided generations, which threshold would have guided it (what `dag-safety calibrate` uses).
            `None` under the paper's rule or without DAG.
    """

    unsafe_detected: list[bool] | None = None
    dag_maps: torch.Tensor | None = None
    presence_scores: list[float] | None = None
