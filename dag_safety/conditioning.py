"""The conditional UNet inputs of a prompt for a UNet pass outside the pipeline's loop (embedding optimization,
calibration): text-encoder states and, for SDXL-type UNets, their added conditioning."""

from __future__ import annotations

import torch

__all__ = ["added_conditioning", "unet_conditioning"]


def unet_conditioning(
    pipe, prompt: str | list[str], device: torch.device, copies: int = 1, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """`(encoder_hidden_states, added_cond_kwargs)` of `prompt`, without classifier-free guidance.

    Args:
        pipe: a Stable Diffusion or SDXL pipeline (anything with their `encode_prompt`).
        prompt (`str` or `list[str]`): the caption(s).
        device (`torch.device`): where the states go.
        copies (`int`, *optional*, defaults to 1): rows per prompt.
        size (`tuple[int, int]`, *optional*): the image size in pixels, for SDXL's time ids (original and target
            size, no crop); defaults to the UNet's.

    Returns:
        `(B, L, D)` states, and for a UNet with SDXL's `text_time` added conditioning `{"text_embeds": (B, P),
        "time_ids": (B, 6)}` (else `None`), `B = len(prompts) * copies`.
    """
    encoded = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=copies, do_classifier_free_guidance=False
    )
    states = encoded[0]
    if pipe.unet.config.addition_embed_type != "text_time":
        return states, None
    return states, added_conditioning(pipe, encoded[2], size)


def added_conditioning(pipe, pooled: torch.Tensor, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """SDXL's added conditioning `{"text_embeds": (B, P), "time_ids": (B, 6)}` of pooled text embeddings `pooled`
    (`(B, P)`) at image `size` in pixels (original and target size, no crop; defaults to the
    UNet's)."""
    if size is None:
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        size = (side, side)
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1])
    time_ids = pipe._get_add_time_ids(tuple(size), (0, 0), tuple(size), pooled.dtype, projection_dim)
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device).repeat(len(pooled), 1)}
