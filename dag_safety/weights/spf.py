"""SPF-Portrait weights: a safetensors state dict of the UNet's cross-attention (`attn2`) parameters, written into the
UNet as `W0 + scale * (W - W0)` (full weights) or `W0 + scale * delta` (metadata `{"format": "delta"}`), with a CPU
copy of every touched tensor kept so that restoring gives the base weights back bit for bit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .files import _load_tensors, read_safetensors_header
from .kinds import SPF_FORMAT_KEY, SPF_FORMATS, LoadedSafetyWeights, SafetyWeightsKind

if TYPE_CHECKING:
    from .mixin import SafetyWeightsMixin

__all__ = ["DEFAULT_SPF_NAME", "load_spf", "restore_spf"]

#: `format` values safetensors writers put there for the framework (`save_file(..., metadata={"format": "pt"})` in
#: transformers / diffusers); they say nothing about full vs delta, so they read as full weights.
FRAMEWORK_FORMATS: tuple[str, ...] = ("pt", "tf", "flax", "np", "mlx", "paddle")
DEFAULT_SPF_NAME = "spf"


@dataclass
class _SPFState:
    record: LoadedSafetyWeights
    originals: dict[str, torch.Tensor]


def _spf_parameter(
    unet: torch.nn.Module, key: str, allow_non_attn2: bool, shown: str | None = None
) -> torch.nn.Parameter:
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
        module = unet.get_submodule(module_path) if module_path else unet
    except AttributeError:
        module = None
    module = getattr(module, "base_layer", module)
    param = getattr(module, param_name, None) if module is not None else None
    if not isinstance(param, torch.nn.Parameter):
        # a key of the file that names no parameter: the file's content is wrong, not an argument's type
        raise ValueError(  # noqa: TRY004
            f"{shown!r} is not a parameter of the UNet; expected keys like the UNet's state dict, e.g."
            " 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'."
        )
    return param


def load_spf(
    pipe: SafetyWeightsMixin, path: str, scale: float, name: str, replace: bool, allow_non_attn2: bool, reason: str
) -> LoadedSafetyWeights:
    """Checks the SPF file at `path` (names, `format` metadata, keys, shapes) against `pipe`'s UNet, then writes it
    in at `scale`, replacing (restoring first) the SPF weights loaded before if `replace`."""
    if name in (pipe._safety_lora or {}):
        raise ValueError(f"The name {name!r} is taken by a loaded LoRA adapter; choose another `adapter_name`.")
    if pipe._safety_spf is not None and not replace:
        raise ValueError(
            f"SPF weights {pipe._safety_spf.record.name!r} ({pipe._safety_spf.record.path!r}) are already loaded;"
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
        param = _spf_parameter(pipe.unet, key, allow_non_attn2, shown=prefix + key)
        value = state_dict[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{prefix + key!r} has shape {tuple(value.shape)}, the UNet's parameter has {tuple(param.shape)}: the"
                " weights were fitted to another model."
            )
        params[key] = param
    if pipe._safety_spf is not None:
        restore_spf(pipe)
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
    pipe._safety_spf = _SPFState(record, originals)
    return record


def restore_spf(pipe: SafetyWeightsMixin) -> None:
    """Writes the kept CPU copies back into `pipe`'s UNet and forgets the loaded SPF weights."""
    state = pipe._safety_spf
    with torch.no_grad():
        for key, original in state.originals.items():
            param = _spf_parameter(pipe.unet, key, allow_non_attn2=True)
            param.copy_(original.to(device=param.device, dtype=param.dtype))
    pipe._safety_spf = None
