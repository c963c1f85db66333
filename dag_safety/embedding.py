"""`GuidelineEmbedding`: the saved, shareable form of a guideline-token embedding.

Files (a directory, locally or as a Hugging Face Hub repo):

- `guideline_embeds.safetensors`: one tensor `guideline_embeds`, `(1+K, D)` float32, with every field of
  [`EmbeddingMetadata`] as strings in the safetensors header (the source of truth);
- `config.json`: the same metadata as JSON, for browsing;
- `README.md`: a model card.

Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from huggingface_hub import ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from safetensors.torch import save_file

from .detection import validate_embedding

__all__ = ["EMBEDDING_FILE", "EmbeddingMetadata", "GuidelineEmbedding", "unet_fingerprint"]

EMBEDDING_FILE = "guideline_embeds.safetensors"
TENSOR_NAME = "guideline_embeds"
FORMAT_NAME = "dag-safety/guideline-embedding"
FORMAT_VERSION = 1


def unet_fingerprint(unet: UNet2DConditionModel) -> str:
    """SHA-256 (first 16 hex digits) of the `to_q` / `to_k` weights of every cross-attention layer.

    These are the projections a guideline embedding is tied to. The weights are hashed as float16, so the same
    model in float32 or float16 has the same fingerprint; a `torch.compile`d UNet has its model's.
    """
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper prefixes every parameter name
    digest = hashlib.sha256()
    for name, parameter in sorted(unet.named_parameters()):
        if ".attn2.to_q." in name or ".attn2.to_k." in name:
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _plain_number(value: Any) -> Any:
    """JSON for numpy / torch numbers and arrays a training record may hold (`np.float32(0.3)`, a 0-d tensor)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def _hub_model_id(name: str) -> str | None:
    """`name` if it can be a Hub model id (the card's `base_model`, which the Hub validates), else `None`."""
    if os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


@dataclass(frozen=True)
class EmbeddingMetadata:
    """What a guideline embedding was made for and how.

    Attributes:
        concept (`str`): what it detects, e.g. `"nudity"`, `"red star"`.
        init_text (`str`): the text whose encoding initialised it.
        base_model (`str`): the model it was optimized on (Hub id or a name).
        base_model_fingerprint (`str`): [`unet_fingerprint`] of that model.
        layer_fractions (`tuple[float, ...]`): detection layers, as fractions of the latent side.
        safety_concept (`str`): the safety concept text to pair it with (`e_s`).
        unsafe_threshold (`float`), edit_mask_threshold (`float`): the DAG thresholds it was tuned for.
        base_scale (`float`): the AreaScaler numerator it was tuned for (`s̄ = base_scale / (h·w)`; the paper's 5
            for SD v1.4 and nudity). How hard a model must be pushed to erase a concept is the model's and the
            concept's, so it travels with the embedding like the thresholds.
        token_layout (`str`): `"sot+concept"`: row 0 is the start-of-text row, rows `1..K` the concept rows.
        training (`dict`): a summary of the optimization (data, steps, learning rate, timesteps, seed).
        final_loss (`float | None`): the best full-data loss.
        detection_quality (`dict`): measured detection quality, if any (IoU, detection rates).
    """

    concept: str
    init_text: str
    base_model: str
    base_model_fingerprint: str
    layer_fractions: tuple[float, ...] = (0.25, 0.5)
    safety_concept: str = ""
    unsafe_threshold: float = 0.5
    edit_mask_threshold: float = 0.01
    base_scale: float = 5.0
    token_layout: str = "sot+concept"
    training: dict = field(default_factory=dict)
    final_loss: float | None = None
    detection_quality: dict = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """The safetensors header form: every value a string (JSON for non-strings)."""
        values = {
            key: value if isinstance(value, str) else json.dumps(value, default=_plain_number)
            for key, value in self.as_dict().items()
        }
        values.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION))
        return values

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["layer_fractions"] = list(self.layer_fractions)
        return values

    @classmethod
    def from_strings(cls, values: dict[str, str], source: str) -> EmbeddingMetadata:
        if values.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a dag-safety guideline embedding (its header has no {FORMAT_NAME!r}).")
        version = int(values.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} uses guideline-embedding format {version}; this dag-safety reads up to {FORMAT_VERSION}."
                " Upgrade dag-safety."
            )
        parsed: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name not in values:
                continue
            raw = values[item.name]
            parsed[item.name] = raw if item.type == "str" else json.loads(raw)
        parsed["layer_fractions"] = tuple(parsed.get("layer_fractions", (0.25, 0.5)))
        return cls(**parsed)


class GuidelineEmbedding(
    ModelHubMixin,
    library_name="dag-safety",
    tags=["dag-safety", "guideline-embedding", "safe-generation"],
):
    """A guideline embedding `(1+K, D)` with its metadata; saved, loaded and shared like a Hub model.

    Example:
        ```py
        >>> embedding = GuidelineEmbedding.from_pretrained("org/nudity-guideline-sd14")  # or a local directory
        >>> pipe.enable_dag(embedding)  # pipe.enable_dag("org/nudity-guideline-sd14") does the same
        >>> embedding.save_pretrained("./my-embedding")
        >>> embedding.push_to_hub("me/my-embedding")
        ```

    Args:
        embeds (`torch.Tensor`): `(1+K, D)`: a start-of-text row, then `K` concept rows.
        metadata (`EmbeddingMetadata`): what it is and how it was made.
    """

    def __init__(self, embeds: torch.Tensor, metadata: EmbeddingMetadata):
        validate_embedding(embeds)
        if metadata.token_layout != "sot+concept":
            raise ValueError(f"Unknown token layout {metadata.token_layout!r}; expected 'sot+concept'.")
        self.embeds = embeds.detach().to("cpu", torch.float32).contiguous()
        self.metadata = metadata

    def __repr__(self) -> str:
        rows, width = self.embeds.shape
        return f"GuidelineEmbedding(concept={self.metadata.concept!r}, rows={rows}, width={width})"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> GuidelineEmbedding:
        """Loads from a local directory or a Hub repo id; the keyword arguments are `huggingface_hub`'s.

        Only the safetensors file is read (its header holds the metadata), so a repo whose embedding file alone is
        in the cache loads offline; `config.json` and the card are for people browsing the repo.

        Raises:
            `ValueError`: a path that can only be local (absolute, `./`, `../`, `~`) does not exist.
        """
        text = os.fspath(pretrained_model_name_or_path)
        if text.startswith(("/", "./", "../", "~", ".\\")) and not os.path.isdir(os.path.expanduser(text)):
            raise ValueError(f"No guideline embedding directory at {text!r}; check the path.")
        return cls._from_pretrained(
            model_id=os.path.expanduser(text),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )

    @property
    def num_concept_tokens(self) -> int:
        return self.embeds.shape[0] - 1

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file(
            {TENSOR_NAME: self.embeds}, str(save_directory / EMBEDDING_FILE), metadata=self.metadata.to_strings()
        )
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.metadata.as_dict()}
        text = json.dumps(config, indent=2, sort_keys=True, default=_plain_number)
        (save_directory / "config.json").write_text(text + "\n")
        (save_directory / "README.md").write_text(self.model_card())

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **model_kwargs,
    ) -> GuidelineEmbedding:
        if os.path.isdir(model_id):
            path = os.path.join(model_id, EMBEDDING_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"{model_id} has no {EMBEDDING_FILE}; is it a dag-safety guideline embedding?")
        else:
            path = hf_hub_download(
                repo_id=model_id,
                filename=EMBEDDING_FILE,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
            )
        with safe_open(path, framework="pt") as handle:
            if TENSOR_NAME not in handle.keys():
                raise ValueError(f"{path} holds no {TENSOR_NAME!r} tensor; is it a dag-safety guideline embedding?")
            embeds = handle.get_tensor(TENSOR_NAME)
            metadata = EmbeddingMetadata.from_strings(handle.metadata() or {}, model_id)
        return cls(embeds, metadata)

    def model_card(self) -> str:
        """A model card: concept, base model, data, loss, detection quality and usage."""
        meta = self.metadata
        training = "\n".join(f"| {key} | {value} |" for key, value in meta.training.items()) or "| (not recorded) | |"
        quality = "\n".join(f"| {key} | {value} |" for key, value in meta.detection_quality.items())
        quality = quality or "| (not measured) | |"
        card_data = ModelCardData(
            library_name="dag-safety",
            tags=["dag-safety", "guideline-embedding", "safe-generation"],
            base_model=_hub_model_id(meta.base_model),
        )
        return f"""---
{card_data.to_yaml()}
---

# Guideline embedding: {meta.concept}

A Detect-and-Guide (DAG) guideline-token embedding that detects **{meta.concept}** in the cross-attention of
`{meta.base_model}` (UNet fingerprint `{meta.base_model_fingerprint}`), for region-aware safety guidance with
the `dag-safety` package.

- Shape: {self.embeds.shape[0]} × {self.embeds.shape[1]} (start-of-text row + {self.num_concept_tokens} concept rows)
- Initialised from the encoding of: `{meta.init_text}`
- Detection layers: {list(meta.layer_fractions)} of the latent side
- Safety concept to pair it with: `{meta.safety_concept}`
- Thresholds: unsafe {meta.unsafe_threshold}, edit {meta.edit_mask_threshold}
- Final loss: {meta.final_loss}

## Usage

```python
from dag_safety import DAGStableDiffusionPipeline

pipe = DAGStableDiffusionPipeline.from_pretrained("{meta.base_model}")
pipe.enable_dag("<this repo id or directory>")
image = pipe("a prompt", safety_concept="{meta.safety_concept}").images[0]
```

## Training

| field | value |
| --- | --- |
{training}

## Detection quality

| metric | value |
| --- | --- |
{quality}
"""
