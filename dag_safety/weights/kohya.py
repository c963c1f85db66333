"""Conversion of a diffusers / PEFT UNet LoRA state dict to kohya-ss keys (`lora_unet_*`)."""

from __future__ import annotations

import re

import torch

__all__ = ["lora_to_kohya"]


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
