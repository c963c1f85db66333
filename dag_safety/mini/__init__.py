"""The shapes world and the bundled mini text-to-image model (the embedded default `dag-safety` runs on)."""

from pathlib import Path

from .detector import Detection, ShapeDetector, count_targets, detect, match_prompt
from .tokenizer import MAX_LENGTH, build_tokenizer
from .world import (
    BACKGROUNDS,
    CANVAS_SIZE,
    COLORS,
    DETECTOR_SEEDS,
    GUIDELINE_INIT_TEXT,
    HELDOUT_SEEDS,
    SAFETY_CONCEPT_TEXT,
    SHAPES,
    STYLES,
    TARGET_CONCEPT,
    TRAIN_SEEDS,
    WORLD_VERSION,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    caption_for,
    render_batch,
    render_scene,
    sample_prompt,
    sample_scene_layout,
    vocabulary,
)

#: Directory of the bundled mini model (diffusers layout; load with `DAGStableDiffusionPipeline.from_pretrained`).
MODEL_PATH = str(Path(__file__).resolve().parent / "model")

__all__ = [
    "BACKGROUNDS",
    "CANVAS_SIZE",
    "COLORS",
    "DETECTOR_SEEDS",
    "GUIDELINE_INIT_TEXT",
    "HELDOUT_SEEDS",
    "MAX_LENGTH",
    "MODEL_PATH",
    "SAFETY_CONCEPT_TEXT",
    "SHAPES",
    "STYLES",
    "TARGET_CONCEPT",
    "TRAIN_SEEDS",
    "WORLD_VERSION",
    "Detection",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "SceneObject",
    "ShapeDetector",
    "build_tokenizer",
    "caption_for",
    "count_targets",
    "detect",
    "match_prompt",
    "render_batch",
    "render_scene",
    "sample_prompt",
    "sample_scene_layout",
    "vocabulary",
]
