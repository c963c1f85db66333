"""`GuidelineEmbedding`: the saved, shareable form of a guideline-token embedding.

Files (a directory, locally or as a Hugging Face Hub repo):

- `guideline_embeds.safetensors`: one tensor `guideline_embeds`, `(1+K, D)` float32, with every field of
  [`EmbeddingMetadata`] as strings in the safetensors header (the source of truth);
- `config.json`: the same metadata as JSON, for browsing;
- `README.md`: a model card.

Loading never unpickles anything. Every header field is parsed and checked against the type [`EmbeddingMetadata`]
declares for it; a damaged file or header is a `ValueError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from huggingface_hub import ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._validation import is_real
from .config import COMPONENT_RULES, DETECTION_RULES, ERASE_MODES, FILL_REGIONS, PAPER_ERASE_SETTINGS
from .detection import validate_embedding
from .presence_head import HEAD_PREFIX, PresenceHead

__all__ = ["EMBEDDING_FILE", "EmbeddingMetadata", "GuidelineEmbedding", "unet_fingerprint"]

EMBEDDING_FILE = "guideline_embeds.safetensors"
TENSOR_NAME = "guideline_embeds"
FORMAT_NAME = "dag-safety/guideline-embedding"
FORMAT_VERSION = 1
CARD_TAGS = ["dag-safety", "guideline-embedding", "safe-generation"]
SAVED_FILES = (EMBEDDING_FILE, "config.json", "README.md")


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


def _header_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        raise ValueError("not JSON") from None


def _header_text(raw: str) -> str:
    if not isinstance(raw, str):
        raise TypeError("not a string")
    return raw


def _header_version(raw: str) -> int:
    value = _header_json(raw)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("not a positive integer")
    return value


def _header_finite(raw: str) -> float:
    value = _header_json(raw)
    if not is_real(value) or not math.isfinite(value):
        raise ValueError("not a finite number")
    return float(value)


def _header_optional_number(raw: str) -> float | None:
    value = _header_json(raw)
    if value is not None and not is_real(value):
        raise ValueError("neither a number nor null")
    return None if value is None else float(value)


def _header_fractions(raw: str) -> tuple[float, ...]:
    value = _header_json(raw)
    if not isinstance(value, list) or not value or not all(is_real(v) and math.isfinite(v) for v in value):
        raise ValueError("not a non-empty list of finite numbers")
    return tuple(float(v) for v in value)


def _header_names(raw: str) -> tuple[str, ...] | None:
    value = _header_json(raw)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("neither null nor a non-empty list of names")
    return tuple(value)


def _header_bool(raw: str) -> bool:
    value = _header_json(raw)
    if not isinstance(value, bool):
        raise TypeError("not true or false")
    return value


def _header_object(raw: str) -> dict:
    value = _header_json(raw)
    if not isinstance(value, dict):
        raise TypeError("not a JSON object")
    return value


# How each declared type of an `EmbeddingMetadata` field (and the header's `format_version`) is read from its
# header string, and what a valid value looks like.
_HEADER_TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "str": (_header_text, "a string"),
    "int": (_header_version, "a positive integer such as '1'"),
    "float": (_header_finite, "a finite number in JSON, such as '0.5'"),
    "float | None": (_header_optional_number, "a number or 'null'"),
    "tuple[float, ...]": (_header_fractions, "a JSON list of finite numbers, such as '[0.25, 0.5]'"),
    "tuple[str, ...] | None": (_header_names, "'null' or a JSON list of layer names, such as '[\"up_blocks.2\"]'"),
    "dict": (_header_object, "a JSON object, such as '{}'"),
    "bool": (_header_bool, "'true' or 'false'"),
}


def _parse_header_field(source: str, name: str, raw: Any, declared: str) -> Any:
    """Reads one safetensors header value (a string) as the type `declared` for its field.

    Raises:
        `ValueError`: naming `source` (the file), the field, the value found and what was expected.
    """
    parse, expected = _HEADER_TYPES[declared]
    try:
        return parse(raw)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{source}: the header field {name!r} is {raw!r} ({error}); expected {expected}. The file is damaged or"
            " was not written by dag-safety; re-save or re-download the embedding."
        ) from None


@dataclass(frozen=True)
class EmbeddingMetadata:
    """What a guideline embedding was made for and how.

    Attributes:
        concept (`str`): what it detects, e.g. `"nudity"`, `"red star"`.
        init_text (`str`): the text whose encoding initialised it.
        base_model (`str`): the model it was optimized on (Hub id or a name).
        base_model_fingerprint (`str`): [`unet_fingerprint`] of that model.
        layer_fractions (`tuple[float, ...]`): detection layers, as fractions of the latent side.
        layers (`tuple[str, ...] | None`): detection layers by name, overriding `layer_fractions` (see
            [`DAGConfig`]); `None` for layers chosen by fraction.
        safety_concept (`str`): the safety concept text to pair it with (`e_s`).
        unsafe_threshold (`float`), edit_mask_threshold (`float`): the DAG thresholds it was tuned for.
        base_scale (`float`): the AreaScaler numerator it was tuned for (`s̄ = base_scale / (h·w)`; the paper's 5
            for SD v1.4 and nudity). How hard a model must be pushed to erase a concept is the model's and the
            concept's, so it travels with the embedding like the thresholds.
        detection (`str`): the detection rule `enable_dag` uses with it by default: `"paper"`, `"presence"` or
            `"head"` (see [`DAGConfig`]; `"presence"` and `"head"` need `presence_threshold`, `"head"` a presence
            head in the file).
        presence_threshold (`float | None`): the calibrated threshold of DAG's selective rule
            (`detection="presence"`, or the head's probability under `"head"`); `None` for an embedding never
            calibrated.
        presence_smoothing (`float`): the evidence smoothing the threshold was calibrated with.
        hold_detection (`bool`), fill_region (`str`), erase_mode (`str`), components (`str`), confirm_steps
            (`int`): how DAG forms the candidates the default rule judges, when it trusts a detection and how it
            erases what it finds (see [`DAGConfig`]), as tuned with that rule; `enable_dag` uses them only with the
            embedding's default rule, so choosing another `detection` (the paper's, say) starts from the paper's
            own settings (`False`, `"nearest"`, `"guidance"`, `"threshold"`, 1). Beyond the paper unless those. An
            embedding saved before `components` or `confirm_steps` existed reads as `"threshold"` and 1, which it
            was made with.
        calibration (`dict`): how the threshold was chosen: the target and measured false-detection rates, the
            detection rate on the unsafe validation images, the number of images, the sampler steps, and per group
            of safe images (`groups`) their number and false-detection rate.
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
    layers: tuple[str, ...] | None = None
    safety_concept: str = ""
    unsafe_threshold: float = 0.5
    edit_mask_threshold: float = 0.01
    base_scale: float = 5.0
    detection: str = "paper"
    presence_threshold: float | None = None
    presence_smoothing: float = 0.5
    hold_detection: bool = False
    fill_region: str = "nearest"
    erase_mode: str = "guidance"
    components: str = "threshold"
    confirm_steps: int = 1
    calibration: dict = field(default_factory=dict)
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
        values["layers"] = None if self.layers is None else list(self.layers)
        return values

    @classmethod
    def from_strings(cls, values: dict[str, str], source: str) -> EmbeddingMetadata:
        """The metadata from a safetensors header ([`to_strings`]'s form); every field goes through
        [`_parse_header_field`] with its declared type, and fields without a default are required.

        Raises:
            `ValueError`: not a guideline embedding's header, a newer format, a required field missing, or a value
            that does not parse as its field's type; the message names `source` and the field.
        """
        if values.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a dag-safety guideline embedding (its header has no {FORMAT_NAME!r}).")
        fields = [("format_version", "int", True)]
        fields += [
            (item.name, item.type, item.default is MISSING and item.default_factory is MISSING)
            for item in dataclasses.fields(cls)
        ]
        missing = [
            f"{name!r} ({_HEADER_TYPES[declared][1]})"
            for name, declared, required in fields
            if required and name not in values
        ]
        if missing:
            raise ValueError(
                f"{source}: the header lacks the required field{'s' if len(missing) > 1 else ''}"
                f" {', '.join(missing)}. The file is damaged or was not written by dag-safety; re-save or"
                " re-download the embedding."
            )
        parsed = {
            name: _parse_header_field(source, name, values[name], declared)
            for name, declared, _ in fields
            if name in values
        }
        version = parsed.pop("format_version")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} uses guideline-embedding format {version}; this dag-safety reads up to {FORMAT_VERSION}."
                " Upgrade dag-safety."
            )
        return cls(**parsed)


def _check_erase_defaults(metadata: EmbeddingMetadata) -> None:
    """The default rule and erase settings a metadata names are ones `enable_dag` can use.

    Raises:
        `ValueError`: an unknown value, or erase settings beyond the paper's with the paper's rule (they apply only
        with the embedding's default rule, and the paper's rule is the paper's method whole).
    """
    for name, choices in (
        ("detection", DETECTION_RULES),
        ("fill_region", FILL_REGIONS),
        ("erase_mode", ERASE_MODES),
        ("components", COMPONENT_RULES),
    ):
        if getattr(metadata, name) not in choices:
            raise ValueError(
                f"The metadata's {name!r} is {getattr(metadata, name)!r}; expected one of {list(choices)}. The file"
                " is damaged or was written by a newer dag-safety."
            )
    beyond = {
        name: getattr(metadata, name)
        for name, value in PAPER_ERASE_SETTINGS.items()
        if getattr(metadata, name) != value
    }
    if metadata.detection == "paper" and beyond:
        raise ValueError(
            f"The metadata names the paper's detection rule as the default with erase settings beyond the paper"
            f" ({beyond}); they are tuned for a selective rule and used only with it. Calibrate the embedding with"
            " `--default-detection presence` or `head`, or drop them."
        )


def _download_embedding_file(model_id: str, **hub_kwargs) -> str:
    """`hf_hub_download` of a repo's embedding file, its errors said in terms of a name that is no local directory.

    Raises:
        `ValueError`: the repo, the revision or the file is not on the Hub, or (offline) not in the cache.
        `ConnectionError`: the Hub could not be reached and the file is not in the cache.
    """
    try:
        return hf_hub_download(repo_id=model_id, filename=EMBEDDING_FILE, **hub_kwargs)
    except GatedRepoError:
        raise  # huggingface_hub's message says how to request access
    except RepositoryNotFoundError:
        raise ValueError(
            f"No local directory {model_id!r} exists, and the Hugging Face Hub has no repo {model_id!r} (or it is"
            " private: log in with `hf auth login` or pass token=). Check the name, or pass a local directory."
        ) from None
    except RevisionNotFoundError:
        raise ValueError(
            f"The Hub repo {model_id!r} has no revision {hub_kwargs.get('revision')!r} (and no local directory"
            f" {model_id!r} exists)."
        ) from None
    except RemoteEntryNotFoundError:
        raise ValueError(
            f"The Hub repo {model_id!r} has no {EMBEDDING_FILE}: it is not a dag-safety guideline embedding (and no"
            f" local directory {model_id!r} exists)."
        ) from None
    except LocalEntryNotFoundError as error:
        fix = f"pass a local directory, or download it first: `hf download {model_id} {EMBEDDING_FILE}`"
        if hub_kwargs.get("local_files_only"):
            raise ValueError(
                f"No local directory {model_id!r} exists, and the Hub repo {model_id!r} is not in the local cache"
                f" (local_files_only=True: no cached {EMBEDDING_FILE}). Drop local_files_only, or {fix}."
            ) from None
        if _caused_by(error, OfflineModeIsEnabled):
            raise ValueError(
                f"No local directory {model_id!r} exists, and the Hub repo {model_id!r} is not in the offline cache"
                f" (HF_HUB_OFFLINE=1: no cached {EMBEDDING_FILE}). Go online (unset HF_HUB_OFFLINE), or {fix}."
            ) from None
        cause = error.__cause__ or error
        raise ConnectionError(
            f"Could not reach the Hugging Face Hub to fetch {model_id!r} ({type(cause).__name__}: {cause}), and its"
            f" {EMBEDDING_FILE} is not in the local cache; no local directory {model_id!r} exists either. Check your"
            " connection, or pass a local directory."
        ) from error


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _is_saved_embedding(path: Path) -> bool:
    """Whether `path` (one of [`SAVED_FILES`]) is a guideline embedding's own: its header, config or card says so."""
    try:
        if path.name == EMBEDDING_FILE:
            with safe_open(str(path), framework="pt") as handle:
                return (handle.metadata() or {}).get("format") == FORMAT_NAME
        if path.name == "config.json":
            config = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(config, dict) and config.get("format") == FORMAT_NAME
        card = metadata_load(path) or {}
        return "guideline-embedding" in (card.get("tags") or [])
    except (OSError, ValueError, SafetensorError):  # unreadable: not something we know to be ours
        return False


def _foreign_entries(directory: Path) -> list[str]:
    """What in `directory` is not a saved guideline embedding's (hidden entries aside); `[]` when it is missing."""
    if not directory.is_dir():
        return []
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name not in SAVED_FILES or not entry.is_file():
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
        elif not _is_saved_embedding(entry):
            foreign.append(f"{entry.name} (not a guideline embedding's)")
    return foreign


class GuidelineEmbedding(
    ModelHubMixin,
    library_name="dag-safety",
    tags=CARD_TAGS,
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
        head ([`PresenceHead`], *optional*): a presence head for `detection="head"`, saved in the same
            safetensors file (`presence_head.*` entries).
    """

    def __init__(self, embeds: torch.Tensor, metadata: EmbeddingMetadata, head: PresenceHead | None = None):
        validate_embedding(embeds)
        if metadata.token_layout != "sot+concept":
            raise ValueError(f"Unknown token layout {metadata.token_layout!r}; expected 'sot+concept'.")
        if metadata.detection == "head" and head is None:
            raise ValueError(
                'The metadata names `detection="head"` as the default rule, but the embedding has no presence head.'
            )
        _check_erase_defaults(metadata)
        self.embeds = embeds.detach().to("cpu", torch.float32).contiguous()
        self.metadata = metadata
        self.head = head

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

        An existing local directory of that name always wins; any other name must be a Hub repo id (`name` or
        `namespace/name`). Only the safetensors file is read (its header holds the metadata), so a repo whose
        embedding file alone is in the cache loads offline; `config.json` and the card are for people browsing the
        repo.

        Raises:
            `ValueError`: no local directory of that name exists and the name is not a valid Hub repo id, or the
                Hub (or, offline, the cache) has no such repo or no embedding file in it; the file is not a
                readable safetensors file; or its header is not a valid guideline embedding's (the message names
                the file and the field).
            `ConnectionError`: the Hub could not be reached and the file is not in the cache.
        """
        text = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        if not os.path.isdir(text):
            if os.path.exists(text):
                raise ValueError(
                    f"{text!r} is a file, not a directory; pass the directory that holds {EMBEDDING_FILE}."
                )
            if text.startswith(("/", "./", "../", ".\\")) or os.path.isabs(text):
                raise ValueError(f"No guideline embedding directory exists at {text!r}; check the path.")
            try:
                validate_repo_id(text)
            except HFValidationError:
                raise ValueError(
                    f"No local directory {text!r} exists, and {text!r} is not a valid Hub repo id ('name' or"
                    " 'namespace/name' of letters, digits, '-', '_' and '.'); check the path or the repo id."
                ) from None
        return cls._from_pretrained(
            model_id=text,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False, **kwargs) -> str | None:
        """Saves `guideline_embeds.safetensors`, `config.json` and the model card `README.md` into `save_directory`
        (created if missing); the other keyword arguments are `huggingface_hub`'s (`push_to_hub=`, `repo_id=`, ...).

        Nothing but a guideline embedding is ever replaced without asking: the directory may be missing, empty, or
        hold a guideline embedding saved before (its three files are replaced, as `save_pretrained` does
        everywhere). A directory holding anything else (a model's `model_index.json` or weights, another
        `README.md` or `config.json`, any other file) is refused unless `overwrite=True`, which replaces the three
        files and leaves the rest as is. Hidden entries (`.git`, `.gitattributes`, `.cache`) are ignored.

        Args:
            save_directory (`str` or `Path`): the directory.
            overwrite (`bool`, *optional*, defaults to `False`): write into a directory that holds other content.

        Raises:
            `ValueError`: `save_directory` is a file, or holds other content and `overwrite` is `False`.
        """
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(
                f"Cannot save a guideline embedding to {str(directory)!r}: it is a file, not a directory."
            )
        if not overwrite:
            foreign = _foreign_entries(directory)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ValueError(
                    f"{str(directory)!r} holds content that is not a dag-safety guideline embedding ({shown}), and"
                    f" saving would replace any {', '.join(SAVED_FILES)} there. Choose a new or empty directory,"
                    " or pass overwrite=True."
                )
        return super().save_pretrained(directory, **kwargs)

    @property
    def num_concept_tokens(self) -> int:
        return self.embeds.shape[0] - 1

    def _save_pretrained(self, save_directory: Path) -> None:
        tensors = {TENSOR_NAME: self.embeds, **({} if self.head is None else self.head.to_tensors())}
        save_file(tensors, str(save_directory / EMBEDDING_FILE), metadata=self.metadata.to_strings())
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
            path = _download_embedding_file(
                model_id,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
            )
        try:
            with safe_open(path, framework="pt") as handle:
                if TENSOR_NAME not in handle.keys():  # noqa: SIM118  # a safe_open handle has keys(), not `in`
                    raise ValueError(
                        f"{path} holds no {TENSOR_NAME!r} tensor; is it a dag-safety guideline embedding?"
                    )
                # copies in torch's own memory: a tensor read in place sits wherever the file's header put it, and
                # the CPU kernels' last bits depend on that alignment (measured: 7e-7 on an image, which sampling
                # can grow into another image), so the same rows would generate differently from two files
                embeds = handle.get_tensor(TENSOR_NAME).clone()
                names = [key for key in handle.keys() if key.startswith(HEAD_PREFIX)]  # noqa: SIM118  # as above
                head_entries = {key: handle.get_tensor(key).clone() for key in names}
                header = handle.metadata() or {}
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not a readable safetensors file ({error}): it is truncated, damaged or another kind of"
                " file. Re-save or re-download the embedding."
            ) from error
        metadata = EmbeddingMetadata.from_strings(header, path)
        head = PresenceHead.from_tensors(head_entries, path)
        try:
            return cls(embeds, metadata, head)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def model_card(self) -> str:
        """A model card: concept, base model, data, loss, detection quality and usage."""
        meta = self.metadata
        training = "\n".join(f"| {key} | {value} |" for key, value in meta.training.items()) or "| (not recorded) | |"
        quality = "\n".join(f"| {key} | {value} |" for key, value in meta.detection_quality.items())
        quality = quality or "| (not measured) | |"
        layers = f"{list(meta.layer_fractions)} of the latent side" if meta.layers is None else list(meta.layers)
        detection = f"`{meta.detection}` by default"
        if meta.presence_threshold is None:
            detection += " (not calibrated for the selective `presence` rule)"
        else:
            calibration = ", ".join(
                f"{key} {value}" for key, value in meta.calibration.items() if not isinstance(value, dict)
            )
            for group, rates in meta.calibration.get("groups", {}).items():
                calibration += f"; {group or '(no group)'}: " + ", ".join(f"{k} {v}" for k, v in rates.items())
            rule = "its presence head's probability" if self.head is not None else "its presence score"
            detection += (
                f"; with `detection={'head' if self.head is not None else 'presence'!r}` a region is guided when"
                f" {rule} reaches {meta.presence_threshold:.4g} (smoothing {meta.presence_smoothing})"
                + (
                    f", once the image has reached it at {meta.confirm_steps} guided steps"
                    if meta.confirm_steps > 1
                    else ""
                )
                + f"; calibration: {calibration}"
            )
        if any(getattr(meta, name) != value for name, value in PAPER_ERASE_SETTINGS.items()):
            detection += (
                f". Under its default rule DAG erases with `hold_detection={meta.hold_detection}`,"
                f" `fill_region={meta.fill_region!r}`, `erase_mode={meta.erase_mode!r}`,"
                f" `components={meta.components!r}`, `confirm_steps={meta.confirm_steps}` (another rule: the paper's"
                " settings)"
            )
        if self.head is not None:
            fit = meta.calibration.get("presence_head", {})
            summary = ", ".join(f"{key} {value}" for key, value in fit.items() if key != "layers")
            detection += f". Presence head (`detection='head'`) on {', '.join(self.head.layers)}" + (
                f"; fitted on {summary}" if summary else ""
            )
        card_data = ModelCardData(
            library_name="dag-safety",
            tags=CARD_TAGS,
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
- Detection layers: {layers}
- Safety concept to pair it with: `{meta.safety_concept}`
- Thresholds: unsafe {meta.unsafe_threshold}, edit {meta.edit_mask_threshold}
- Detection rule: {detection}
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
