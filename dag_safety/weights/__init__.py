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

The package reads one concern per module: `files` (finding and reading safetensors files, refusing pickles), `kinds`
(what a file holds, the record of a load), `lora` (Focus-N-Fix adapters through diffusers / peft), `spf` (SPF-Portrait
`attn2` weights), `kohya` (LoRA key conversion) and `mixin` ([`SafetyWeightsMixin`], the public methods).
"""

from .files import read_safetensors_header, resolve_weights_file
from .kinds import LoadedSafetyWeights, SafetyWeightsKind, detect_kind
from .kohya import lora_to_kohya
from .mixin import SafetyWeightsMixin

__all__ = [
    "LoadedSafetyWeights",
    "SafetyWeightsKind",
    "SafetyWeightsMixin",
    "detect_kind",
    "lora_to_kohya",
    "read_safetensors_header",
    "resolve_weights_file",
]
