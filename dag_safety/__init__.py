"""Detect-and-Guide (DAG) safety guidance for diffusers text-to-image pipelines."""

from typing import TYPE_CHECKING

from .config import SLD_PRESETS, SLD_SAFETY_CONCEPT, DAGConfig, SEGAConfig, SLDConfig
from .outputs import DAGPipelineOutput

if TYPE_CHECKING:
    from .attach import DAGGuidance, DAGGuidanceOutput, SafetyGuidance
    from .pipeline import DAGStableDiffusionPipeline
    from .pipeline_xl import DAGStableDiffusionXLPipeline

__all__ = [
    "SLD_PRESETS",
    "SLD_SAFETY_CONCEPT",
    "DAGConfig",
    "DAGGuidance",
    "DAGGuidanceOutput",
    "DAGPipelineOutput",
    "DAGStableDiffusionPipeline",
    "DAGStableDiffusionXLPipeline",
    "SEGAConfig",
    "SLDConfig",
    "SafetyGuidance",
]
__version__ = "0.1.0"

# The pipelines import transformers, whose import-time notices (and cost) the CLI's argument checks and `--help`
# should not pay for: they are loaded on first use, as diffusers loads its pipelines.
_LAZY = {
    "DAGStableDiffusionPipeline": "pipeline",
    "DAGStableDiffusionXLPipeline": "pipeline_xl",
    "DAGGuidance": "attach",
    "DAGGuidanceOutput": "attach",
    "SafetyGuidance": "attach",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
