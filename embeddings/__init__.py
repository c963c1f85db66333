"""Guideline embeddings shipped with dag-safety (the repo's `embeddings/` folder, installed as
`dag_safety.embeddings`). Each sub-folder is a `GuidelineEmbedding.save_pretrained` directory."""

from pathlib import Path

#: The red-star guideline embedding of the bundled mini model (`dag_safety.mini.MODEL_PATH`).
RED_STAR = str(Path(__file__).resolve().parent / "red-star")

__all__ = ["RED_STAR"]
