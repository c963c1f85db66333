"""DAGStableDiffusionPipeline (work in progress: plain StableDiffusionPipeline behaviour for now)."""

from diffusers import StableDiffusionPipeline


class DAGStableDiffusionPipeline(StableDiffusionPipeline):
    pass
