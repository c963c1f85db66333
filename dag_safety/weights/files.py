"""Reading safety-weights files: finding the file (local file, directory or Hub repo), reading a safetensors header
or its tensors, and refusing pickled checkpoints (they are never unpickled)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    "DEFAULT_WEIGHT_NAMES",
    "PEFT_ADAPTER_FILE",
    "PEFT_CONFIG_FILE",
    "read_safetensors_header",
    "resolve_weights_file",
]

#: A raw PEFT adapter's files (`PeftModel.save_pretrained`).
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
#: File names tried, in order, when a directory or Hub repo holds several safetensors files and no `weight_name`.
DEFAULT_WEIGHT_NAMES: tuple[str, ...] = (
    "pytorch_lora_weights.safetensors",
    PEFT_ADAPTER_FILE,
    "spf_attn2.safetensors",
    "diffusion_pytorch_model.safetensors",
)
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextlib.contextmanager
def _open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """`safe_open`, with errors that name the file: safetensors says only "Error while deserializing header" for a
    truncated or empty file, or for another format renamed `.safetensors` (a pickle is never unpickled here)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({error}): it is truncated, empty, or a file of another"
            " format renamed to .safetensors. Download it again, or save it again with"
            " `safetensors.torch.save_file`."
        ) from error


def read_safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the `__metadata__` of a safetensors file, without reading the tensors."""
    with _open_safetensors(path) as handle:
        return list(handle.keys()), dict(handle.metadata() or {})


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU, refused if any value is NaN or Inf (it would make every image NaN)."""
    with _open_safetensors(path) as handle:
        tensors = {key: handle.get_tensor(key) for key in list(handle.keys())}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"{key!r} in {path!r} holds NaN or Inf values: the weights are damaged (or their training diverged)"
                " and would turn every image into NaN. Use an intact file."
            )
    return tensors


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _pickle_error(name: str) -> ValueError:
    return ValueError(
        f"{name!r} is a pickled checkpoint; safety weights are only read from safetensors files and never unpickled."
        " Convert it once in a trusted environment, e.g."
        " `safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')`."
    )


def _pick_file(names: list[str], where: str) -> str:
    """One safetensors file out of a listing: the only one, or the first of `DEFAULT_WEIGHT_NAMES` present."""
    safe = sorted(n for n in names if n.endswith(".safetensors"))
    if len(safe) == 1:
        return safe[0]
    for default in DEFAULT_WEIGHT_NAMES:
        if default in safe:
            return default
    if safe:
        raise ValueError(f"{where} holds several safetensors files {safe}; pass `weight_name=` to choose one.")
    pickled = sorted(n for n in names if _is_pickle(n))
    if pickled:
        raise _pickle_error(f"{where}/{pickled[0]}")
    raise ValueError(f"{where} holds no .safetensors file; pass a file, or `weight_name=`.")


def resolve_weights_file(path_or_repo_id: str | os.PathLike, weight_name: str | None = None, **hub_kwargs: Any) -> str:
    r"""
    Finds the safetensors file to read: a local file, a file in a local directory, or one downloaded from the Hub.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): A `.safetensors` file, a directory, or a Hub repo id.
        weight_name (`str`, *optional*): The file's name inside the directory or repo (default: the only
            `.safetensors` file of a directory, else the first of `DEFAULT_WEIGHT_NAMES` found).
        hub_kwargs: Passed to `huggingface_hub.hf_hub_download` (`revision`, `subfolder`, `cache_dir`, `token`,
            `local_files_only`, ...).

    Returns:
        `str`: the local path of the file.
    """
    if weight_name is not None and _is_pickle(weight_name):
        raise _pickle_error(weight_name)
    if weight_name is not None and not weight_name.endswith(".safetensors"):
        raise ValueError(f"`weight_name={weight_name!r}` is not a .safetensors file.")
    path = Path(path_or_repo_id)
    if path.is_file():
        if _is_pickle(path.name):
            raise _pickle_error(str(path))
        if path.suffix != ".safetensors":
            raise ValueError(f"{str(path)!r} is not a .safetensors file.")
        return str(path)
    if path.is_dir():
        folder = path / hub_kwargs["subfolder"] if hub_kwargs.get("subfolder") else path
        if weight_name is not None:
            if not (folder / weight_name).is_file():
                raise ValueError(f"No file {weight_name!r} in {str(folder)!r}.")
            return str(folder / weight_name)
        return str(folder / _pick_file([p.name for p in folder.iterdir() if p.is_file()], str(folder)))
    text = str(path_or_repo_id)
    if _is_pickle(text):
        raise _pickle_error(text)
    if text.endswith(".safetensors") or os.path.isabs(text) or text.startswith(".") or text.count("/") > 1:
        raise ValueError(f"{text!r} is neither an existing file or directory nor a Hub repo id ('owner/name').")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache_only = bool(hub_kwargs.get("local_files_only")) or constants.HF_HUB_OFFLINE
    candidates = [weight_name] if weight_name is not None else list(DEFAULT_WEIGHT_NAMES)
    for candidate in candidates:
        try:
            path = hf_hub_download(text, candidate, **hub_kwargs)
        except LocalEntryNotFoundError:
            # Not in the cache. Offline, the next name may be; online this is a failed connection, and trying the
            # next name could load another kind of weights than the repo holds.
            if weight_name is not None or not cache_only:
                raise
            continue
        except EntryNotFoundError:
            if weight_name is not None:
                raise
            continue
        if candidate == PEFT_ADAPTER_FILE:
            # a peft adapter's LoRA scale (lora_alpha) is in the config next to it; fetch it into the same snapshot
            try:
                hf_hub_download(text, PEFT_CONFIG_FILE, **hub_kwargs)
            except EntryNotFoundError:
                pass
        return path
    where = "The local cache (offline) holds" if cache_only else "The Hub repo holds"
    raise ValueError(f"{where} none of {list(DEFAULT_WEIGHT_NAMES)} for {text!r}; pass `weight_name=`.")
