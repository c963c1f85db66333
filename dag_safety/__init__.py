"""Detect-and-Guide (DAG) safety guidance for diffusers text-to-image pipelines."""

from typing import TYPE_CHECKING

from .config import SLD_PRESETS, SLD_SAFETY_CONCEPT, DAGConfig, SEGAConfig, SLDConfig
from .outputs import DAGPipelineOutput

if TYPE_CHECKING:
    from .attach import DAGGuidance, DAGGuidanceOutput, SafetyGuidance
    from .pipeline import DAGStableDiffusionPipeline

__all__ = [
    "SLD_PRESETS",
    "SLD_SAFETY_CONCEPT",
    "DAGConfig",
    "DAGGuidance",
    "DAGGuidanceOutput",
    "DAGPipelineOutput",
    "DAGStableDiffusionPipeline",
    "SEGAConfig",
    "SLDConfig",
    "SafetyGuidance",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline imports transformers, whose import-time notices (and cost) the CLI's argument checks and
    # `--help` should not pay for: it is loaded on first use, as diffusers loads its pipelines.
    if name == "DAGStableDiffusionPipeline":
        from .pipeline import DAGStableDiffusionPipeline

        return DAGStableDiffusionPipeline
    if name in ("DAGGuidance", "DAGGuidanceOutput", "SafetyGuidance"):
        from . import attach

        return getattr(attach, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
