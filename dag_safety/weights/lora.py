"""Focus-N-Fix LoRA adapters: loading one as a named peft adapter (diffusers, kohya or raw PEFT keys) after checking
that its keys and shapes fit the pipeline's layers, undoing a load that fails inside diffusers / peft, scaling, fusing
with CPU copies of the base weights, and unloading.

The functions take the pipeline (a [`SafetyWeightsMixin`] on a diffusers pipeline with LoRA support) and keep their
state on it: `_safety_lora` (the records by adapter name) and `_safety_fused` (the fused adapters and the base weights
from before fusing)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import logging

from .files import PEFT_CONFIG_FILE, _load_tensors
from .kinds import LoadedSafetyWeights, SafetyWeightsKind

if TYPE_CHECKING:
    from .mixin import SafetyWeightsMixin

__all__ = [
    "DEFAULT_LORA_ADAPTER",
    "apply_lora_scales",
    "check_nothing_merged",
    "forget_removed_adapters",
    "fuse_lora_adapters",
    "load_lora",
    "set_lora_scale",
    "unfuse_lora_adapters",
    "unload_lora",
]

logger = logging.get_logger(__name__)

#: Prefix of a raw PEFT adapter's keys (`PeftModel.save_pretrained`).
PEFT_PREFIX = "base_model.model."
DEFAULT_LORA_ADAPTER = "focus_n_fix"
#: How errors name the models a LoRA goes into (the pipeline attributes diffusers loads LoRA layers into).
MODEL_LABELS = {"unet": "UNet", "text_encoder": "text encoder"}
#: Attributes peft / diffusers / transformers set on a model that holds adapters; put back as they were after a
#: failed load.
PEFT_ATTRIBUTES: tuple[str, ...] = ("peft_config", "_hf_peft_config_loaded")


@dataclass(frozen=True)
class _PeftLayout:
    """A model's peft layers (by module name, with their active adapters) and peft attributes before a LoRA load, to
    undo a failed one."""

    tuner_layers: dict[str, list[str]]
    attributes: dict[str, Any]


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


# ---------------------------------------------------------------------------------------------- on the pipeline


def lora_models(pipe: SafetyWeightsMixin) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's models that take LoRA layers, by attribute name (`"unet"`, `"text_encoder"`)."""
    return [(n, m) for n in ("unet", "text_encoder") if (m := getattr(pipe, n, None)) is not None]


def check_nothing_merged(pipe: SafetyWeightsMixin) -> None:
    """Refuses to work on top of adapters fused with `fuse_lora` (peft would unmerge them by subtraction, and SPF
    would overwrite their fused update)."""
    merged = {n for _, m in lora_models(pipe) for mod in m.modules() for n in getattr(mod, "merged_adapters", [])}
    if merged:
        raise ValueError(f"LoRA adapters {sorted(merged)} are fused; call `pipe.unfuse_lora()` first.")


def loaded_adapters(pipe: SafetyWeightsMixin) -> set[str]:
    """The names of every LoRA adapter loaded into the pipeline, safety adapters or not."""
    return {name for names in pipe.get_list_adapters().values() for name in names}


def forget_removed_adapters(pipe: SafetyWeightsMixin) -> None:
    """Drops the records of safety adapters removed behind our back (`unload_lora_weights`, `delete_adapters`)."""
    if pipe._safety_lora:
        loaded = loaded_adapters(pipe)
        pipe._safety_lora = {name: record for name, record in pipe._safety_lora.items() if name in loaded}


def load_lora(
    pipe: SafetyWeightsMixin, path: str, keys: list[str], scale: float, name: str, replace: bool, reason: str
) -> LoadedSafetyWeights:
    """Checks the LoRA file at `path` (`keys`: its tensor names) against the pipeline, then loads it as adapter `name`
    at `scale`; with `replace`, the adapter loaded under `name` is unloaded first (and loaded back should this fail)."""
    _check_lora_name(pipe, path, keys, name, replace)
    tensors = _load_tensors(path)
    peft_format = bool(tensors) and all(key.startswith(PEFT_PREFIX) for key in tensors)
    targets = _lora_targets(pipe, tensors, peft_format)
    _check_lora_fits(pipe, targets, path, {id(value): key for key, value in tensors.items()})
    if peft_format:
        detail = f"{reason}; raw PEFT adapter"
    else:
        fmt = "kohya" if all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors) else "diffusers"
        detail = f"{reason}; {fmt} keys"
    copy_of = _loaded_copy_of(pipe, targets, exclude=name)
    if copy_of is not None:
        logger.warning(
            f"{path!r} holds the same LoRA tensors as the loaded adapter {copy_of!r}: loaded as {name!r} too, the"
            f" same update now acts twice. To change its strength, rescale {copy_of!r} instead"
            f" (`set_safety_weights_scale` / `pipe.set_adapters`); to swap it for this file, pass"
            f" `adapter_name={copy_of!r}, replace=True`, or unload {copy_of!r} first."
        )
        detail = f"{detail}; same tensors as adapter {copy_of!r}"
    replaced = None
    if name in loaded_adapters(pipe):  # `replace=True`, checked above
        if name in (pipe._safety_lora or {}):
            replaced = pipe._safety_lora[name]
            unload_lora(pipe, name)
        else:
            pipe.delete_adapters([name])
    # Loading an adapter makes it the only active one; the others active before are re-activated below.
    previously_active = [n for n in pipe.get_active_adapters() if n != name]
    try:
        _inject_lora(pipe, path, targets if peft_format else None, name)
    except BaseException:
        # a failed replace must not leave the pipeline without the safety weights it had: put them back
        if replaced is not None:
            pipe.load_safety_weights(replaced.path, kind=replaced.kind, scale=replaced.scale, adapter_name=name)
        raise
    record = LoadedSafetyWeights(name, SafetyWeightsKind.FOCUS_N_FIX, path, scale, detail)
    pipe._safety_lora = {**(pipe._safety_lora or {}), name: record}
    apply_lora_scales(pipe, previously_active)
    return record


def _check_lora_name(pipe: SafetyWeightsMixin, path: str, keys: list[str], name: str, replace: bool) -> None:
    """Refuses an adapter name peft cannot hold or that is taken, and a file without LoRA keys."""
    # peft keeps adapters in `nn.ModuleDict`s: a name must be a valid key there.
    if not name.isidentifier() or hasattr(torch.nn.ModuleDict, name):
        raise ValueError(
            f"`adapter_name={name!r}` cannot name a peft adapter: use an identifier (letters, digits, `_`) that"
            " is not an `nn.Module` attribute (such as 'half' or 'train'), e.g. 'focus_n_fix_2'."
        )
    forget_removed_adapters(pipe)
    if not any("lora" in key.lower() for key in keys):
        raise ValueError(
            f"{path!r} holds no LoRA keys (none contains 'lora'; first key {keys[0] if keys else None!r}); for"
            " cross-attention weights pass `kind='spf'`."
        )
    if pipe._safety_spf is not None and name == pipe._safety_spf.record.name:
        raise ValueError(f"The name {name!r} is taken by the loaded SPF weights; choose another `adapter_name`.")
    if name in loaded_adapters(pipe) and not replace:
        raise ValueError(
            f"A LoRA adapter named {name!r} is already loaded; pass another `adapter_name` to add one, or"
            " `replace=True` to swap it (loading the same weights twice would apply them twice)."
        )


def _lora_targets(
    pipe: SafetyWeightsMixin, tensors: dict[str, torch.Tensor], peft_format: bool
) -> dict[str, dict[str, torch.Tensor]]:
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
    converted, _ = pipe.lora_state_dict(dict(tensors))
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in converted.items():
        target, _, rest = key.partition(".")
        targets.setdefault(target, {})[rest] = value
    if "unet" in targets:
        targets["unet"] = convert_unet_state_dict_to_peft(targets["unet"])
    if "text_encoder" in targets:
        encoder = convert_state_dict_to_peft(convert_state_dict_to_diffusers(targets["text_encoder"]))
        if not hasattr(getattr(pipe, "text_encoder", None), "text_model"):  # transformers 5 flattens CLIPTextModel
            encoder = {key.removeprefix("text_model."): value for key, value in encoder.items()}
        targets["text_encoder"] = encoder
    return targets


def _check_lora_fits(
    pipe: SafetyWeightsMixin, targets: dict[str, dict[str, torch.Tensor]], path: str, file_keys: dict[int, str]
) -> None:
    """Refuses a LoRA with a key that names no layer of the pipeline, or a tensor whose shape does not fit its
    layer, before peft touches a model (peft would wrap hundreds of layers, then fail on their sizes). Errors quote
    the key as the file spells it (`file_keys`: by tensor identity, which the key conversions keep)."""
    models = dict(lora_models(pipe))
    for target, tensors in targets.items():
        label = MODEL_LABELS.get(target, repr(target))
        ranks = {
            k.partition(".lora_")[0]: v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight") and v.ndim
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


def _loaded_copy_of(pipe: SafetyWeightsMixin, targets: dict[str, dict[str, torch.Tensor]], exclude: str) -> str | None:
    """The loaded LoRA adapter (other than `exclude`) that holds exactly these tensors: the same file, or a
    conversion of it (kohya, diffusers, PEFT keys), loaded under another name."""
    from peft import get_peft_model_state_dict

    models = dict(lora_models(pipe))
    for adapter in sorted(loaded_adapters(pipe) - {exclude}):
        loaded = {
            target: get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
            for target, model in models.items()
            if adapter in getattr(model, "peft_config", {})
        }
        if loaded.keys() == targets.keys() and all(_same_tensors(loaded[t], targets[t]) for t in targets):
            return adapter
    return None


def _inject_lora(
    pipe: SafetyWeightsMixin, path: str, peft_targets: dict[str, dict[str, torch.Tensor]] | None, name: str
) -> None:
    """Loads a checked LoRA file through diffusers (or, for a raw PEFT adapter, its `peft_targets`) as adapter
    `name`. On any failure, whatever peft injected is taken out again before the error propagates: a half-done
    load would leave empty LoRA layers that change the UNet's state dict (its parameter names, its
    fingerprint) and that `unload_safety_weights` cannot see."""
    layouts = {prefix: _peft_layout(model) for prefix, model in lora_models(pipe)}
    try:
        if peft_targets is not None:
            _load_peft_adapter(pipe, peft_targets["unet"], path, name)
        else:
            folder, file = os.path.split(path)
            pipe.load_lora_weights(folder, weight_name=file, adapter_name=name, use_safetensors=True)
    except BaseException:
        for prefix, model in lora_models(pipe):
            _undo_adapter_load(model, layouts[prefix], name)
        raise


def _load_peft_adapter(pipe: SafetyWeightsMixin, state_dict: dict[str, torch.Tensor], path: str, name: str) -> None:
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
    pipe.unet.load_lora_adapter(state_dict, prefix=None, adapter_name=name, metadata=metadata, _pipeline=pipe)


def apply_lora_scales(pipe: SafetyWeightsMixin, active: list[str] | None = None) -> None:
    """Activates every safety adapter at its scale, keeping the other active adapters (`active`, default: those
    active now) at 1.0."""
    ours = {name: record.scale for name, record in (pipe._safety_lora or {}).items()}
    if not ours:
        return
    active = pipe.get_active_adapters() if active is None else active
    others = [n for n in active if n not in ours]
    if others:
        # diffusers has no getter for adapter weights, so a weight the user set on them cannot be kept: say so
        logger.warning(
            f"Other active LoRA adapters {others} are kept active at weight 1.0; call `pipe.set_adapters(...)`"
            " afterwards to give them other weights (keep the safety adapters' names and scales in the call)."
        )
    names = others + list(ours)
    pipe.set_adapters(names, [ours.get(n, 1.0) for n in names])


def set_lora_scale(pipe: SafetyWeightsMixin, adapter_name: str, scale: float) -> None:
    """Sets the safety adapter `adapter_name` to `scale` (already checked to be a finite number)."""
    forget_removed_adapters(pipe)
    lora = pipe._safety_lora or {}
    if adapter_name not in lora:
        raise ValueError(f"No safety LoRA adapter named {adapter_name!r}; loaded: {list(lora)}.")
    if pipe._safety_fused is not None:
        raise ValueError("Safety LoRA adapters are fused; call `unfuse_safety_weights()` before rescaling.")
    lora[adapter_name] = dataclasses.replace(lora[adapter_name], scale=scale)
    apply_lora_scales(pipe)


def fuse_lora_adapters(pipe: SafetyWeightsMixin, adapter_names: list[str] | None = None) -> None:
    """Fuses the safety adapters `adapter_names` (default: all) after copying the base weights they touch to CPU."""
    forget_removed_adapters(pipe)
    lora = pipe._safety_lora or {}
    names = list(lora) if adapter_names is None else list(adapter_names)
    if not names or any(n not in lora for n in names):
        raise ValueError(f"Cannot fuse {names}: loaded safety LoRA adapters are {list(lora)}.")
    if pipe._safety_fused is not None:
        raise ValueError(f"Adapters {pipe._safety_fused[0]} are already fused; call `unfuse_safety_weights()`.")
    check_nothing_merged(pipe)
    others = [n for n in pipe.get_active_adapters() if n not in names]
    if others:
        # peft runs a merged layer as its base layer only: an active adapter left unfused would silently stop
        # acting wherever it shares a layer with the fused ones
        raise ValueError(
            f"Other LoRA adapters {others} are active and would stop acting in the layers the fused adapters share"
            " with them. Fuse them too (`adapter_names=`) if they are safety adapters, or deactivate them first"
            " (`pipe.set_adapters(...)` with the safety adapters only)."
        )
    originals = {}
    for prefix, model in lora_models(pipe):
        for module_name, module in model.named_modules():
            if hasattr(module, "base_layer") and any(n in getattr(module, "lora_A", {}) for n in names):
                originals[f"{prefix}.{module_name}"] = module.base_layer.weight.detach().to("cpu", copy=True)
    pipe.fuse_lora(adapter_names=names)
    pipe._safety_fused = (names, originals)


def unfuse_lora_adapters(pipe: SafetyWeightsMixin) -> None:
    """Unfuses the fused safety adapters and writes the CPU copies of the base weights back."""
    if pipe._safety_fused is None:
        raise ValueError("No safety LoRA adapters are fused.")
    _, originals = pipe._safety_fused
    pipe.unfuse_lora()
    models = dict(lora_models(pipe))
    with torch.no_grad():
        for name, original in originals.items():
            prefix, module_name = name.split(".", 1)
            weight = models[prefix].get_submodule(module_name).base_layer.weight
            weight.copy_(original.to(device=weight.device, dtype=weight.dtype))
    pipe._safety_fused = None


def unload_lora(pipe: SafetyWeightsMixin, name: str) -> None:
    """Unloads the safety adapter `name`, taking out the peft layers no other adapter uses."""
    lora = dict(pipe._safety_lora or {})
    lora.pop(name)
    pipe._safety_lora = lora
    if loaded_adapters(pipe) == {name}:
        # The last adapter: take the peft layers out altogether.
        pipe.unload_lora_weights()
    else:
        # Other adapters stay: delete this one, and take out the peft layers it alone was using.
        pipe.delete_adapters([name])
        for _, model in lora_models(pipe):
            _unwrap_empty_peft_layers(model)
        apply_lora_scales(pipe)
