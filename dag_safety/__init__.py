"""Detect-and-Guide (DAG) safety guidance for diffusers text-to-image pipelines."""

from .pipeline import DAGStableDiffusionPipeline

__all__ = ["DAGStableDiffusionPipeline"]
__version__ = "0.1.0"
