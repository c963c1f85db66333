"""Detect-and-Guide (DAG) safety guidance for diffusers text-to-image pipelines."""

from .config import SLD_PRESETS, SLD_SAFETY_CONCEPT, DAGConfig, SEGAConfig, SLDConfig
from .outputs import DAGPipelineOutput
from .pipeline import DAGStableDiffusionPipeline

__all__ = [
    "DAGConfig",
    "DAGPipelineOutput",
    "DAGStableDiffusionPipeline",
    "SEGAConfig",
    "SLDConfig",
    "SLD_PRESETS",
    "SLD_SAFETY_CONCEPT",
]
__version__ = "0.1.0"
