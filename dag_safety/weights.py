"""Loaders for fine-tuned safety weights: Focus-N-Fix LoRA adapters and SPF-Portrait cross-attention weights.

Two families of safety fine-tunes combine with inference-time guidance:

- **Focus-N-Fix** (region-aware LoRA, rank 64 on the SD v1.4 UNet) ships LoRA adapters. Every format diffusers'
  [`~loaders.StableDiffusionLoraLoaderMixin.load_lora_weights`] reads is accepted (diffusers, kohya `lora_unet_*`),
  plus a raw PEFT adapter (`adapter_model.safetensors` + `adapter_config.json`, keys `base_model.model.<module>...`).
  They are loaded through diffusers and peft as named adapters, scaled with `set_adapters`, and can be fused.
- **SPF-Portrait** fine-tunes the UNet's cross-attention (`attn2`) projections. Its weights are a safetensors state
  dict keyed like the UNet's (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`), either the full
  fine-tuned tensors or their difference to the base (safetensors metadata `{"format": "delta"}`). They are written
  into the UNet as `W0 + scale * (W - W0)` (or `W0 + scale * delta`), after a CPU copy of every touched tensor is
  kept, so unloading restores the base weights bit for bit.

Only safetensors files are read; pickled checkpoints (`.bin`, `.pt`, ...) are refused, never unpickled. Every file
is checked before anything is written into the pipeline: it must be a readable safetensors file, every tensor must be
finite, and a LoRA's keys and shapes must fit the layers they name. A LoRA load that fails inside diffusers / peft is
undone: the peft layers it injected are taken out again, so the UNet and text encoder are as they were before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging
from safetensors import SafetensorError, safe_open

from ._validation import check_finite_number

__all__ = [
    "LoadedSafetyWeights",
    "SafetyWeightsKind",
    "SafetyWeightsMixin",
    "detect_kind",
    "lora_to_kohya",
    "read_safetensors_header",
    "resolve_weights_file",
]

logger = logging.get_logger(__name__)

#: Prefix of a raw PEFT adapter's keys (`PeftModel.save_pretrained`), and its files.
PEFT_PREFIX = "base_model.model."
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
#: safetensors metadata key (and values) that mark an SPF file as a delta or as full weights.
SPF_FORMAT_KEY = "format"
SPF_FORMATS: tuple[str, ...] = ("full", "delta")
#: `format` values safetensors writers put there for the framework (`save_file(..., metadata={"format": "pt"})` in
#: transformers / diffusers); they say nothing about full vs delta, so they read as full weights.
FRAMEWORK_FORMATS: tuple[str, ...] = ("pt", "tf", "flax", "np", "mlx", "paddle")
DEFAULT_LORA_ADAPTER = "focus_n_fix"
DEFAULT_SPF_NAME = "spf"
#: How errors name the models a LoRA goes into (the pipeline attributes diffusers loads LoRA layers into).
MODEL_LABELS = {"unet": "UNet", "text_encoder": "text encoder"}
#: Attributes peft / diffusers / transformers set on a model that holds adapters; put back as they were after a
#: failed load.
PEFT_ATTRIBUTES: tuple[str, ...] = ("peft_config", "_hf_peft_config_loaded")


class SafetyWeightsKind(str, Enum):
    """What a safety-weights file holds."""

    AUTO = "auto"
    FOCUS_N_FIX = "focus-n-fix"
    SPF = "spf"


@dataclass(frozen=True)
class LoadedSafetyWeights:
    r"""
    A record of one loaded set of safety weights, as [`SafetyWeightsMixin.load_safety_weights`] returns it.

    Args:
        name (`str`): The adapter name (LoRA) or record name (SPF) to pass to `unload_safety_weights`.
        kind (`SafetyWeightsKind`): `FOCUS_N_FIX` (a LoRA adapter) or `SPF` (cross-attention weights).
        path (`str`): The local safetensors file that was read.
        scale (`float`): The strength the weights were applied at.
        detail (`str`): How the kind was decided; for a LoRA the key format (and the loaded adapter holding the same
            tensors, if any), for SPF the format (`"full"` / `"delta"`) and tensor count.
    """

    name: str
    kind: SafetyWeightsKind
    path: str
    scale: float
    detail: str = ""


@dataclass
class _SPFState:
    record: LoadedSafetyWeights
    originals: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _PeftLayout:
    """A model's peft layers (by module name, with their active adapters) and peft attributes before a LoRA load, to
    undo a failed one."""

    tuner_layers: dict[str, list[str]]
    attributes: dict[str, Any]


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


def _check_scale(scale: Any) -> float:
    """A strength must be a finite real number: NaN or Inf turns every image into NaN, a bool or a string is a slip."""
    check_finite_number("scale", scale, " such as 0.8 (0 leaves the output unchanged)")
    return float(scale)


def _lora_layer(model: torch.nn.Module, module_name: str) -> torch.nn.Module | None:
    """The layer a LoRA key names (the base layer, under a peft LoRA layer); `None` if there is no such layer."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def _expected_lora_shape(part: str, layer: torch.nn.Module, rank: int) -> tuple[int, ...] | None:
    """The shape peft gives `part` of a rank-`rank` LoRA on `layer`: `lora_A.weight` `(r, in, *kernel)`,
    `lora_B.weight` `(out, r, 1, ...)`, `lora_B.bias` `(out,)`. `None` where it is not checked (other parts,
    layers other than linear and ungrouped convolutions)."""
    if isinstance(layer, torch.nn.Linear):
        out_features, rest = layer.out_features, (layer.in_features,)
    elif isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and layer.groups == 1:
        out_features, rest = layer.out_channels, (layer.in_channels, *layer.kernel_size)
    else:
        return None
    return {
        "lora_A.weight": (rank, *rest),
        "lora_B.weight": (out_features, rank, *(1,) * (len(rest) - 1)),
        "lora_B.bias": (out_features,),
    }.get(part)


def _same_tensors(loaded: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> bool:
    """Whether two LoRA state dicts hold the same keys and values (`new` cast to `loaded`'s dtype and device)."""
    return loaded.keys() == new.keys() and all(
        torch.equal(value, new[key].to(device=value.device, dtype=value.dtype)) for key, value in loaded.items()
    )


def _peft_layout(model: torch.nn.Module) -> _PeftLayout:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return _PeftLayout(
        {
            name: list(module.active_adapters)
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        },
        {name: vars(model)[name] for name in PEFT_ATTRIBUTES if name in vars(model)},
    )


def _put_back_base_layer(model: torch.nn.Module, module_name: str, module: Any) -> None:
    """Replaces the peft layer `module_name` by the layer it wraps (its parameters get their own names back)."""
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, module.get_base_layer())


def _unwrap_empty_peft_layers(model: torch.nn.Module) -> None:
    """Replaces the peft layers that hold no adapter any more by the layers they wrap: peft's `delete_adapter` leaves
    them in place, with the wrapped parameters renamed `...base_layer.weight` (another UNet fingerprint)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module_name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and not any(getattr(module, n) for n in module.adapter_layer_names):
            _put_back_base_layer(model, module_name, module)


def _undo_adapter_load(model: torch.nn.Module, layout: _PeftLayout, name: str) -> None:
    """Takes adapter `name` out of `model` after a failed load: the peft layers wrapped around layers that had none
    are replaced by the layers they wrap, the peft layers of other adapters lose `name` only and get their active
    adapters back, and the peft attributes are put back (`peft_config` without `name`). Adapters loaded before stay."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module_name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        if module_name in layout.tuner_layers:
            module.set_adapter(layout.tuner_layers[module_name])  # peft activated `name` there
            module.delete_adapter(name)
        else:
            _put_back_base_layer(model, module_name, module)
    config = vars(model).get("peft_config")
    if isinstance(config, dict):
        config.pop(name, None)
    for attribute in PEFT_ATTRIBUTES:
        if attribute in layout.attributes:
            setattr(model, attribute, layout.attributes[attribute])
        elif attribute in vars(model):
            delattr(model, attribute)


def detect_kind(keys: list[str], metadata: dict[str, str]) -> tuple[SafetyWeightsKind, str]:
    """Decides whether a file holds a LoRA or SPF weights from its keys and metadata; returns the kind and why."""
    lora_keys = [k for k in keys if "lora" in k.lower()]
    if lora_keys:
        example = lora_keys[0]
        return SafetyWeightsKind.FOCUS_N_FIX, f"{len(lora_keys)}/{len(keys)} keys contain 'lora' (e.g. {example!r})"
    if "lora_adapter_metadata" in metadata:
        return SafetyWeightsKind.FOCUS_N_FIX, "the metadata holds 'lora_adapter_metadata'"
    if metadata.get(SPF_FORMAT_KEY) in SPF_FORMATS:
        return SafetyWeightsKind.SPF, f"metadata {SPF_FORMAT_KEY}={metadata[SPF_FORMAT_KEY]!r} and no LoRA keys"
    attn2 = [k for k in keys if ".attn2." in k]
    if keys and len(attn2) == len(keys):
        return SafetyWeightsKind.SPF, f"all {len(keys)} keys are attn2 parameters and none is a LoRA key"
    raise ValueError(
        f"Cannot tell what the weights are: no key contains 'lora' and not every key is an attn2 parameter (first"
        f" key {keys[0] if keys else None!r}). Pass `kind='focus-n-fix'` or `kind='spf'`."
    )


def lora_to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    r"""
    Converts a diffusers/PEFT UNet LoRA state dict to kohya-ss keys (SD 1.x, diffusers module names).

    `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight` (`(r, in)`) becomes
    `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight`, `lora_B` becomes
    `lora_up`, and each module gets a scalar `.alpha` (kohya scales the update by `alpha / r`, as peft does with
    `lora_alpha / r`). Keys may carry a `unet.` or `base_model.model.` prefix.

    Args:
        state_dict (`dict[str, torch.Tensor]`): UNet LoRA weights with `lora_A` / `lora_B` keys.
        alpha (`float` or `dict[str, float]`): The LoRA alpha, for every module or per module path.

    Returns:
        `dict[str, torch.Tensor]`: the kohya state dict.
    """
    converted: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(?:unet\.|base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match is None:
            raise ValueError(f"Not a UNet LoRA key with lora_A / lora_B: {key!r}.")
        module = match["module"]
        name = "lora_unet_" + module.replace(".", "_")
        converted[f"{name}.{'lora_down' if match['part'] == 'A' else 'lora_up'}.weight"] = value
        module_alpha = alpha[module] if isinstance(alpha, dict) else alpha
        converted[f"{name}.alpha"] = torch.tensor(float(module_alpha), dtype=value.dtype)
    return converted


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


class SafetyWeightsMixin:
    r"""
    Loads, scales, fuses and unloads fine-tuned safety weights on a [`StableDiffusionPipeline`] subclass.

    - [`load_safety_weights`]: a Focus-N-Fix LoRA (a named peft adapter) or SPF-Portrait `attn2` weights.
    - [`unload_safety_weights`]: removes one or all of them; the UNet and text encoder are bit-identical afterwards.
    - [`set_safety_weights_scale`], [`fuse_safety_weights`] / [`unfuse_safety_weights`] for LoRA adapters.

    Guideline embeddings stay valid: `enable_dag` snapshots the detection layers' `to_q` / `to_k`, so loading weights
    after it changes the generation, not how a hidden state is scored.

    Examples:
        ```py
        >>> from dag_safety import DAGStableDiffusionPipeline

        >>> pipe = DAGStableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4").to("cuda")
        >>> pipe.enable_dag("your-org/nudity-guideline-sd14")  # snapshots to_q / to_k for detection
        >>> pipe.load_safety_weights("your-org/focus-n-fix-sd14", kind="focus-n-fix", scale=0.8)
        >>> image = pipe("a photo of a person on a beach", safety_concept="nudity").images[0]
        >>> pipe.unload_safety_weights()  # the UNet is bit-identical to before

        >>> pipe.load_safety_weights("./spf_attn2.safetensors", kind="spf", scale=0.5)  # W0 + 0.5 (W - W0)
        ```
    """

    _safety_lora: dict[str, LoadedSafetyWeights] | None = None
    _safety_spf: _SPFState | None = None
    _safety_fused: tuple[list[str], dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def safety_weights(self) -> dict[str, LoadedSafetyWeights]:
        """The loaded safety weights by name (LoRA adapters, then the SPF record)."""
        self._forget_removed_adapters()
        records = dict(self._safety_lora or {})
        if self._safety_spf is not None:
            records[self._safety_spf.record.name] = self._safety_spf.record
        return records

    def load_safety_weights(
        self,
        path_or_repo_id: str | os.PathLike,
        kind: str | SafetyWeightsKind = "auto",
        scale: float = 1.0,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        *,
        replace: bool = False,
        allow_non_attn2: bool = False,
        **hub_kwargs: Any,
    ) -> LoadedSafetyWeights:
        r"""
        Loads Focus-N-Fix LoRA weights or SPF-Portrait cross-attention weights into the pipeline.

        Args:
            path_or_repo_id (`str` or `os.PathLike`):
                A `.safetensors` file, a directory holding one, or a Hub repo id (downloaded with
                `huggingface_hub.hf_hub_download` and `hub_kwargs`).
            kind (`str`, *optional*, defaults to `"auto"`):
                `"focus-n-fix"` (a LoRA: diffusers, kohya or PEFT keys), `"spf"` (an `attn2` state dict), or `"auto"`
                (LoRA when a key contains `"lora"`, SPF when the metadata says `format` or every key is an `attn2`
                parameter; the decision is logged and returned in `detail`).
            scale (`float`, *optional*, defaults to 1.0):
                Strength: the LoRA adapter weight, or the SPF interpolation `W0 + scale * (W - W0)`. 0 leaves the
                output unchanged.
            adapter_name (`str`, *optional*):
                The name to load under (defaults to `"focus_n_fix"` for a LoRA, `"spf"` for SPF). Several LoRA
                adapters can be loaded under different names; only one set of SPF weights at a time. A LoRA whose
                tensors equal those of an adapter already loaded (the same file, or a conversion of it) is loaded,
                since stacking copies is a way to apply one LoRA at more than weight 1.0, but a warning says it now
                acts twice and `detail` names the other adapter.
            weight_name (`str`, *optional*):
                The file inside a directory or Hub repo.
            replace (`bool`, *optional*, defaults to `False`):
                Unload what is loaded under the same name (for SPF: the loaded SPF weights) first, instead of
                raising.
            allow_non_attn2 (`bool`, *optional*, defaults to `False`):
                SPF only: accept UNet parameters outside the cross-attention modules.
            hub_kwargs:
                `revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, ... for the Hub download.

        Returns:
            [`LoadedSafetyWeights`]: what was loaded, under which name, and why it was read as that kind.

        Raises:
            `ValueError`: a pickled, missing or unreadable (truncated, empty, not safetensors) file, a NaN or Inf
            tensor, a `scale` that is not a finite number, an undecidable or unknown `kind`, a name already loaded
            without `replace=True`, a LoRA fused at the moment, (LoRA) a key naming no layer of the UNet / text
            encoder or a tensor whose shape does not fit its layer (a LoRA made for another model), or (SPF) an unknown
            key, a non-`attn2` key, a shape mismatch, or an unknown `format` in the metadata. All of these are raised
            before anything is loaded. Should diffusers / peft fail while injecting a LoRA, whatever they injected is
            taken out again (and with `replace=True` the replaced adapter is loaded back) before the error propagates.
        """
        try:
            kind = SafetyWeightsKind(kind)
        except ValueError:
            raise ValueError(
                f"Unknown `kind={kind!r}`; expected one of {[k.value for k in SafetyWeightsKind]}."
            ) from None
        scale = _check_scale(scale)
        if self._safety_fused is not None:
            raise ValueError(
                f"LoRA adapters {self._safety_fused[0]} are fused; call `unfuse_safety_weights()` before loading."
            )
        self._check_nothing_merged()
        path = resolve_weights_file(path_or_repo_id, weight_name, **hub_kwargs)
        keys, metadata = read_safetensors_header(path)
        if kind is SafetyWeightsKind.AUTO:
            kind, reason = detect_kind(keys, metadata)
            logger.info(f"`load_safety_weights`: {path!r} read as {kind.value!r}: {reason}.")
        else:
            reason = f"kind={kind.value!r} given"
        if kind is SafetyWeightsKind.FOCUS_N_FIX:
            return self._load_lora(path, keys, scale, adapter_name or DEFAULT_LORA_ADAPTER, replace, reason)
        return self._load_spf(path, scale, adapter_name or DEFAULT_SPF_NAME, replace, allow_non_attn2, reason)

    def unload_safety_weights(self, adapter_name: str | list[str] | None = None) -> None:
        r"""
        Unloads safety weights and restores the original UNet / text encoder weights bit-identically.

        Args:
            adapter_name (`str` or `list[str]`, *optional*):
                The name(s) given at load time. `None` unloads every safety weight (a fused LoRA is unfused first).
                LoRA adapters loaded with `load_lora_weights` directly are left alone.
        """
        names = (
            list(self.safety_weights)
            if adapter_name is None
            else ([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        )
        unknown = [n for n in names if n not in self.safety_weights]
        if unknown:
            loaded = list(self.safety_weights)
            raise ValueError(f"No safety weights named {unknown[0]!r} are loaded; loaded: {loaded}.")
        spf_name = None if self._safety_spf is None else self._safety_spf.record.name
        if self._safety_fused is not None and any(n in self._safety_fused[0] or n == spf_name for n in names):
            # Unfuse first: the fused copies hold the weights from before fusing, SPF included.
            self.unfuse_safety_weights()
        for name in names:
            if self._safety_spf is not None and name == self._safety_spf.record.name:
                self._restore_spf()
            else:
                self._unload_lora(name)

    def set_safety_weights_scale(self, adapter_name: str, scale: float) -> None:
        r"""
        Changes the strength of a loaded LoRA adapter (SPF weights: unload and load again at the new scale).

        Args:
            adapter_name (`str`): The adapter's name, as [`load_safety_weights`] returned it.
            scale (`float`): The new adapter weight; a finite number, validated as at load time.
        """
        scale = _check_scale(scale)
        self._forget_removed_adapters()
        lora = self._safety_lora or {}
        if adapter_name not in lora:
            raise ValueError(f"No safety LoRA adapter named {adapter_name!r}; loaded: {list(lora)}.")
        if self._safety_fused is not None:
            raise ValueError("Safety LoRA adapters are fused; call `unfuse_safety_weights()` before rescaling.")
        lora[adapter_name] = dataclasses.replace(lora[adapter_name], scale=scale)
        self._apply_lora_scales()

    def fuse_safety_weights(self, adapter_names: list[str] | None = None) -> None:
        r"""
        Fuses safety LoRA adapters into the base weights at their current scales (faster inference).

        The touched base weights are copied to CPU first, so [`unfuse_safety_weights`] (and
        [`unload_safety_weights`]) restore them exactly instead of subtracting the update back.

        Args:
            adapter_names (`list[str]`, *optional*): The adapters to fuse; all safety LoRA adapters by default.
        """
        self._forget_removed_adapters()
        lora = self._safety_lora or {}
        names = list(lora) if adapter_names is None else list(adapter_names)
        if not names or any(n not in lora for n in names):
            raise ValueError(f"Cannot fuse {names}: loaded safety LoRA adapters are {list(lora)}.")
        if self._safety_fused is not None:
            raise ValueError(f"Adapters {self._safety_fused[0]} are already fused; call `unfuse_safety_weights()`.")
        self._check_nothing_merged()
        others = [n for n in self.get_active_adapters() if n not in names]
        if others:
            # peft runs a merged layer as its base layer only: an active adapter left unfused would silently stop
            # acting wherever it shares a layer with the fused ones
            raise ValueError(
                f"Other LoRA adapters {others} are active and would stop acting in the layers the fused adapters share"
                " with them. Fuse them too (`adapter_names=`) if they are safety adapters, or deactivate them first"
                " (`pipe.set_adapters(...)` with the safety adapters only)."
            )
        originals = {}
        for prefix, model in self._lora_models():
            for module_name, module in model.named_modules():
                if hasattr(module, "base_layer") and any(n in getattr(module, "lora_A", {}) for n in names):
                    originals[f"{prefix}.{module_name}"] = module.base_layer.weight.detach().to("cpu", copy=True)
        self.fuse_lora(adapter_names=names)
        self._safety_fused = (names, originals)

    def unfuse_safety_weights(self) -> None:
        """Reverses [`fuse_safety_weights`], restoring the base weights bit-identically from the CPU copies."""
        if self._safety_fused is None:
            raise ValueError("No safety LoRA adapters are fused.")
        _, originals = self._safety_fused
        self.unfuse_lora()
        models = dict(self._lora_models())
        with torch.no_grad():
            for name, original in originals.items():
                prefix, module_name = name.split(".", 1)
                weight = models[prefix].get_submodule(module_name).base_layer.weight
                weight.copy_(original.to(device=weight.device, dtype=weight.dtype))
        self._safety_fused = None

    # ------------------------------------------------------------------ LoRA

    def _lora_models(self) -> list[tuple[str, torch.nn.Module]]:
        return [(n, m) for n in ("unet", "text_encoder") if (m := getattr(self, n, None)) is not None]

    def _check_nothing_merged(self) -> None:
        """Refuses to work on top of adapters fused with `fuse_lora` (peft would unmerge them by subtraction, and SPF
        would overwrite their fused update)."""
        merged = {
            n for _, m in self._lora_models() for mod in m.modules() for n in getattr(mod, "merged_adapters", [])
        }
        if merged:
            raise ValueError(f"LoRA adapters {sorted(merged)} are fused; call `pipe.unfuse_lora()` first.")

    def _loaded_adapters(self) -> set[str]:
        return {name for names in self.get_list_adapters().values() for name in names}

    def _forget_removed_adapters(self) -> None:
        """Drops the records of safety adapters removed behind our back (`unload_lora_weights`, `delete_adapters`)."""
        if self._safety_lora:
            loaded = self._loaded_adapters()
            self._safety_lora = {name: record for name, record in self._safety_lora.items() if name in loaded}

    def _load_lora(
        self, path: str, keys: list[str], scale: float, name: str, replace: bool, reason: str
    ) -> LoadedSafetyWeights:
        self._check_lora_name(path, keys, name, replace)
        tensors = _load_tensors(path)
        peft_format = bool(tensors) and all(key.startswith(PEFT_PREFIX) for key in tensors)
        targets = self._lora_targets(tensors, peft_format)
        self._check_lora_fits(targets, path, {id(value): key for key, value in tensors.items()})
        if peft_format:
            detail = f"{reason}; raw PEFT adapter"
        else:
            fmt = "kohya" if all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors) else "diffusers"
            detail = f"{reason}; {fmt} keys"
        copy_of = self._loaded_copy_of(targets, exclude=name)
        if copy_of is not None:
            logger.warning(
                f"{path!r} holds the same LoRA tensors as the loaded adapter {copy_of!r}: loaded as {name!r} too, the"
                f" same update now acts twice. To change its strength, rescale {copy_of!r} instead"
                f" (`set_safety_weights_scale` / `pipe.set_adapters`); to swap it for this file, pass"
                f" `adapter_name={copy_of!r}, replace=True`, or unload {copy_of!r} first."
            )
            detail = f"{detail}; same tensors as adapter {copy_of!r}"
        replaced = None
        if name in self._loaded_adapters():  # `replace=True`, checked above
            if name in (self._safety_lora or {}):
                replaced = self._safety_lora[name]
                self._unload_lora(name)
            else:
                self.delete_adapters([name])
        # Loading an adapter makes it the only active one; the others active before are re-activated below.
        previously_active = [n for n in self.get_active_adapters() if n != name]
        try:
            self._inject_lora(path, targets if peft_format else None, name)
        except BaseException:
            # a failed replace must not leave the pipeline without the safety weights it had: put them back
            if replaced is not None:
                self.load_safety_weights(replaced.path, kind=replaced.kind, scale=replaced.scale, adapter_name=name)
            raise
        record = LoadedSafetyWeights(name, SafetyWeightsKind.FOCUS_N_FIX, path, scale, detail)
        self._safety_lora = {**(self._safety_lora or {}), name: record}
        self._apply_lora_scales(previously_active)
        return record

    def _check_lora_name(self, path: str, keys: list[str], name: str, replace: bool) -> None:
        """Refuses an adapter name peft cannot hold or that is taken, and a file without LoRA keys."""
        # peft keeps adapters in `nn.ModuleDict`s: a name must be a valid key there.
        if not name.isidentifier() or hasattr(torch.nn.ModuleDict, name):
            raise ValueError(
                f"`adapter_name={name!r}` cannot name a peft adapter: use an identifier (letters, digits, `_`) that"
                " is not an `nn.Module` attribute (such as 'half' or 'train'), e.g. 'focus_n_fix_2'."
            )
        self._forget_removed_adapters()
        if not any("lora" in key.lower() for key in keys):
            raise ValueError(
                f"{path!r} holds no LoRA keys (none contains 'lora'; first key {keys[0] if keys else None!r}); for"
                " cross-attention weights pass `kind='spf'`."
            )
        if self._safety_spf is not None and name == self._safety_spf.record.name:
            raise ValueError(f"The name {name!r} is taken by the loaded SPF weights; choose another `adapter_name`.")
        if name in self._loaded_adapters() and not replace:
            raise ValueError(
                f"A LoRA adapter named {name!r} is already loaded; pass another `adapter_name` to add one, or"
                " `replace=True` to swap it (loading the same weights twice would apply them twice)."
            )

    def _lora_targets(self, tensors: dict[str, torch.Tensor], peft_format: bool) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA tensors by the model they go into (`"unet"`, `"text_encoder"`, or what else a key starts with),
        keyed as peft names them there (`<module>.lora_A.weight`). These are diffusers' own key conversions (kohya,
        older diffusers formats), run on the tensors already read so that they can be checked before loading."""
        from diffusers.utils import (
            convert_state_dict_to_diffusers,
            convert_state_dict_to_peft,
            convert_unet_state_dict_to_peft,
        )

        if peft_format:
            return {"unet": {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}}
        converted, _ = self.lora_state_dict(dict(tensors))
        targets: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in converted.items():
            target, _, rest = key.partition(".")
            targets.setdefault(target, {})[rest] = value
        if "unet" in targets:
            targets["unet"] = convert_unet_state_dict_to_peft(targets["unet"])
        if "text_encoder" in targets:
            encoder = convert_state_dict_to_peft(convert_state_dict_to_diffusers(targets["text_encoder"]))
            if not hasattr(getattr(self, "text_encoder", None), "text_model"):  # transformers 5 flattens CLIPTextModel
                encoder = {key.removeprefix("text_model."): value for key, value in encoder.items()}
            targets["text_encoder"] = encoder
        return targets

    def _check_lora_fits(
        self, targets: dict[str, dict[str, torch.Tensor]], path: str, file_keys: dict[int, str]
    ) -> None:
        """Refuses a LoRA with a key that names no layer of the pipeline, or a tensor whose shape does not fit its
        layer, before peft touches a model (peft would wrap hundreds of layers, then fail on their sizes). Errors quote
        the key as the file spells it (`file_keys`: by tensor identity, which the key conversions keep)."""
        models = dict(self._lora_models())
        for target, tensors in targets.items():
            label = MODEL_LABELS.get(target, repr(target))
            ranks = {
                k.partition(".lora_")[0]: v.shape[0]
                for k, v in tensors.items()
                if k.endswith(".lora_A.weight") and v.ndim
            }
            for key in sorted(tensors):
                value, (module_name, _, part) = tensors[key], key.partition(".lora_")
                shown = file_keys.get(id(value), f"{target}.{key}")
                if not part:
                    raise ValueError(
                        f"{shown!r} in {path!r} is not a LoRA tensor (those are a layer's lora_A / lora_B, or kohya's"
                        " lora_down / lora_up and alpha); save the LoRA tensors alone."
                    )
                layer = _lora_layer(models[target], module_name) if target in models else None
                if layer is None:
                    raise ValueError(
                        f"{shown!r} in {path!r} names no layer of this pipeline's {label} ({module_name!r}): the file"
                        " was made for another model. Load a LoRA trained on this pipeline's base model."
                    )
                rank = ranks.get(module_name, value.shape[1] if value.ndim > 1 else 0)
                expected = _expected_lora_shape(f"lora_{part}", layer, rank)
                if expected is not None and tuple(value.shape) != expected:
                    raise ValueError(
                        f"{shown!r} in {path!r} has shape {tuple(value.shape)}, but the {label} layer {module_name!r}"
                        f" has a weight of shape {tuple(layer.weight.shape)} and takes a LoRA tensor of shape"
                        f" {expected}: the file was made for another model. Load a LoRA trained on this pipeline's"
                        " base model."
                    )

    def _loaded_copy_of(self, targets: dict[str, dict[str, torch.Tensor]], exclude: str) -> str | None:
        """The loaded LoRA adapter (other than `exclude`) that holds exactly these tensors: the same file, or a
        conversion of it (kohya, diffusers, PEFT keys), loaded under another name."""
        from peft import get_peft_model_state_dict

        models = dict(self._lora_models())
        for adapter in sorted(self._loaded_adapters() - {exclude}):
            loaded = {
                target: get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
                for target, model in models.items()
                if adapter in getattr(model, "peft_config", {})
            }
            if loaded.keys() == targets.keys() and all(_same_tensors(loaded[t], targets[t]) for t in targets):
                return adapter
        return None

    def _inject_lora(self, path: str, peft_targets: dict[str, dict[str, torch.Tensor]] | None, name: str) -> None:
        """Loads a checked LoRA file through diffusers (or, for a raw PEFT adapter, its `peft_targets`) as adapter
        `name`. On any failure, whatever peft injected is taken out again before the error propagates: a half-done
        load would leave empty LoRA layers that change the UNet's state dict (its parameter names, its
        fingerprint) and that `unload_safety_weights` cannot see."""
        layouts = {prefix: _peft_layout(model) for prefix, model in self._lora_models()}
        try:
            if peft_targets is not None:
                self._load_peft_adapter(peft_targets["unet"], path, name)
            else:
                folder, file = os.path.split(path)
                self.load_lora_weights(folder, weight_name=file, adapter_name=name, use_safetensors=True)
        except BaseException:
            for prefix, model in self._lora_models():
                _undo_adapter_load(model, layouts[prefix], name)
            raise

    def _load_peft_adapter(self, state_dict: dict[str, torch.Tensor], path: str, name: str) -> None:
        """A `PeftModel.save_pretrained` UNet adapter (keys without `base_model.model.`), its LoRA config in the
        adapter_config.json next to `path`."""
        from peft import LoraConfig

        config_path = Path(path).with_name(PEFT_CONFIG_FILE)
        metadata = None
        if config_path.is_file():
            fields = set(LoraConfig.__dataclass_fields__)
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                config = error
            if not isinstance(config, dict):
                raise ValueError(
                    f"{str(config_path)!r} is not a JSON object ({config}): the PEFT adapter's config is damaged."
                    " Save the adapter again with `PeftModel.save_pretrained`."
                )
            metadata = {k: v for k, v in config.items() if k in fields}
            for key in ("base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode"):
                metadata.pop(key, None)
        else:
            logger.warning(f"No adapter_config.json next to {path!r}: assuming lora_alpha = r.")
        self.unet.load_lora_adapter(state_dict, prefix=None, adapter_name=name, metadata=metadata, _pipeline=self)

    def _apply_lora_scales(self, active: list[str] | None = None) -> None:
        """Activates every safety adapter at its scale, keeping the other active adapters (`active`, default: those
        active now) at 1.0."""
        ours = {name: record.scale for name, record in (self._safety_lora or {}).items()}
        if not ours:
            return
        active = self.get_active_adapters() if active is None else active
        others = [n for n in active if n not in ours]
        if others:
            # diffusers has no getter for adapter weights, so a weight the user set on them cannot be kept: say so
            logger.warning(
                f"Other active LoRA adapters {others} are kept active at weight 1.0; call `pipe.set_adapters(...)`"
                " afterwards to give them other weights (keep the safety adapters' names and scales in the call)."
            )
        names = others + list(ours)
        self.set_adapters(names, [ours.get(n, 1.0) for n in names])

    def _unload_lora(self, name: str) -> None:
        lora = dict(self._safety_lora or {})
        lora.pop(name)
        self._safety_lora = lora
        if self._loaded_adapters() == {name}:
            # The last adapter: take the peft layers out altogether.
            self.unload_lora_weights()
        else:
            # Other adapters stay: delete this one, and take out the peft layers it alone was using.
            self.delete_adapters([name])
            for _, model in self._lora_models():
                _unwrap_empty_peft_layers(model)
            self._apply_lora_scales()

    # ------------------------------------------------------------------ SPF

    def _spf_parameter(self, key: str, allow_non_attn2: bool, shown: str | None = None) -> torch.nn.Parameter:
        """The UNet parameter a key names (the base layer's, under a peft LoRA layer); errors quote `shown` (the key
        as the file spells it)."""
        shown = key if shown is None else shown
        if ".attn2." not in f".{key}" and not allow_non_attn2:
            raise ValueError(
                f"SPF weights may only hold cross-attention (attn2) parameters; {shown!r} is not one. Pass"
                " `allow_non_attn2=True` to load other UNet parameters too."
            )
        module_path, _, param_name = key.rpartition(".")
        try:
            module = self.unet.get_submodule(module_path) if module_path else self.unet
        except AttributeError:
            module = None
        module = getattr(module, "base_layer", module)
        param = getattr(module, param_name, None) if module is not None else None
        if not isinstance(param, torch.nn.Parameter):
            raise ValueError(
                f"{shown!r} is not a parameter of the UNet; expected keys like the UNet's state dict, e.g."
                " 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'."
            )
        return param

    def _load_spf(
        self, path: str, scale: float, name: str, replace: bool, allow_non_attn2: bool, reason: str
    ) -> LoadedSafetyWeights:
        if name in (self._safety_lora or {}):
            raise ValueError(f"The name {name!r} is taken by a loaded LoRA adapter; choose another `adapter_name`.")
        if self._safety_spf is not None and not replace:
            raise ValueError(
                f"SPF weights {self._safety_spf.record.name!r} ({self._safety_spf.record.path!r}) are already loaded;"
                " call `unload_safety_weights()` first, or pass `replace=True`."
            )
        _, metadata = read_safetensors_header(path)
        fmt = metadata.get(SPF_FORMAT_KEY, "full")
        fmt = "full" if fmt in FRAMEWORK_FORMATS else fmt
        if fmt not in SPF_FORMATS:
            raise ValueError(
                f"Unknown SPF {SPF_FORMAT_KEY}={fmt!r} in the metadata of {path!r}; expected one of {SPF_FORMATS}."
            )
        state_dict = _load_tensors(path)
        if not state_dict:
            raise ValueError(f"{path!r} holds no tensors.")
        prefix = "unet." if all(key.startswith("unet.") for key in state_dict) else ""
        state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
        params = {}
        for key in sorted(state_dict):
            param = self._spf_parameter(key, allow_non_attn2, shown=prefix + key)
            value = state_dict[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"{prefix + key!r} has shape {tuple(value.shape)}, the UNet's parameter has {tuple(param.shape)}: the"
                    " weights were fitted to another model."
                )
            params[key] = param
        if self._safety_spf is not None:
            self._restore_spf()
        originals = {}
        with torch.no_grad():
            for key, param in params.items():
                originals[key] = param.detach().to("cpu", copy=True)
                base = param.detach().float()
                value = state_dict[key].to(device=param.device, dtype=torch.float32)
                if fmt == "full":
                    new = value if scale == 1.0 else base + scale * (value - base)
                else:
                    new = base + scale * value
                param.copy_(new.to(param.dtype))
        detail = f"{reason}; {fmt} weights, {len(params)} tensors"
        record = LoadedSafetyWeights(name, SafetyWeightsKind.SPF, path, scale, detail)
        self._safety_spf = _SPFState(record, originals)
        return record

    def _restore_spf(self) -> None:
        state = self._safety_spf
        with torch.no_grad():
            for key, original in state.originals.items():
                param = self._spf_parameter(key, allow_non_attn2=True)
                param.copy_(original.to(device=param.device, dtype=param.dtype))
        self._safety_spf = None
