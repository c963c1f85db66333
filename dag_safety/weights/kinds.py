"""What a safety-weights file holds (a Focus-N-Fix LoRA or SPF-Portrait `attn2` weights), how that is decided from
its keys and metadata, and the record of a loaded set of weights."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["SPF_FORMATS", "SPF_FORMAT_KEY", "LoadedSafetyWeights", "SafetyWeightsKind", "detect_kind"]

#: safetensors metadata key (and values) that mark an SPF file as a delta or as full weights.
SPF_FORMAT_KEY = "format"
SPF_FORMATS: tuple[str, ...] = ("full", "delta")


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
