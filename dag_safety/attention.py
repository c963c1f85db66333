"""Cross-attention processors that capture the UNet's query inputs for guideline-token detection.

[`DAGAttnProcessor`] computes cross-attention exactly as diffusers' `AttnProcessor2_0` (SDPA) and, while its
[`QueryStore`] is armed, also keeps the states its `to_q` projects (after `spatial_norm` / `group_norm`) for the
conditional batch entries. Detection projects them with the `to_q` snapshot taken at `enable_dag`, so a guideline
embedding keeps scoring queries with the projections it was fitted to, even after weights are loaded.
[`CrossAttentionCapture`] installs the processor on the selected `attn2` layers of a UNet and restores the
previous processors on removal.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

__all__ = ["CapturedQuery", "CrossAttentionCapture", "DAGAttnProcessor", "QueryStore", "cross_attention_layers"]


class CapturedQuery:
    """Query inputs of one layer for the conditional batch entries.

    Attributes:
        hidden_states (`torch.Tensor`): `(B, N, C)`, the input of `to_q`, `N = h_l·w_l` query pixels.
        spatial_size (`tuple[int, int] | None`): `(h_l, w_l)` when the layer received a 4-D input, else `None`
            (the size then follows from `N` and the latent size).
    """

    __slots__ = ("hidden_states", "spatial_size")

    def __init__(self, hidden_states: torch.Tensor, spatial_size: tuple[int, int] | None):
        self.hidden_states = hidden_states
        self.spatial_size = spatial_size


class QueryStore:
    """Shared by the capture processors of one pipeline; holds the queries of the current UNet call.

    The pipeline arms it with the batch slice of the conditional entries before the UNet call that computes the
    prompt's noise prediction and disarms it afterwards; unarmed, the processors only compute attention.
    """

    def __init__(self):
        self.cond_slice: slice | None = None
        self.queries: dict[str, CapturedQuery] = {}

    @property
    def armed(self) -> bool:
        return self.cond_slice is not None

    def arm(self, cond_slice: slice) -> None:
        self.queries = {}
        self.cond_slice = cond_slice

    def disarm(self) -> None:
        self.cond_slice = None

    def clear(self) -> None:
        self.cond_slice = None
        self.queries = {}

    def add(self, name: str, hidden_states: torch.Tensor, spatial_size: tuple[int, int] | None) -> None:
        self.queries[name] = CapturedQuery(hidden_states[self.cond_slice], spatial_size)


class DAGAttnProcessor:
    """`AttnProcessor2_0` that also stores the conditional query inputs in a [`QueryStore`].

    Args:
        store (`QueryStore`): where queries go while it is armed.
        name (`str`): the processor key of the layer,
            e.g. `"up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"`.
    """

    def __init__(self, store: QueryStore, name: str):
        self.store = store
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        spatial_size = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial_size = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects the mask as (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if self.store.armed:
            # a view, not a copy: capturing adds no work to the attention itself
            self.store.add(self.name, hidden_states, spatial_size)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


def _block_downsampling(unet: UNet2DConditionModel) -> dict[str, int]:
    """Down-sampling factor of the latent at each UNet block: `"down_blocks.i"`, `"mid_block"`, `"up_blocks.j"`."""
    factors: dict[str, int] = {}
    factor = 1
    for index, block in enumerate(unet.down_blocks):
        factors[f"down_blocks.{index}"] = factor
        if getattr(block, "downsamplers", None):
            factor *= 2
    factors["mid_block"] = factor
    for index, block in enumerate(unet.up_blocks):
        factors[f"up_blocks.{index}"] = factor
        if getattr(block, "upsamplers", None):
            factor //= 2
    return factors


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, int]:
    """All `attn2` (cross-attention) processor keys of a UNet with the latent down-sampling factor of each.

    Returns:
        `dict[str, int]`: e.g. `{"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": 2, ...}`.
    """
    factors = _block_downsampling(unet)
    layers = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        parts = name.split(".")
        block = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
        if block in factors:
            layers[name] = factors[block]
    return layers


class CrossAttentionCapture:
    """Installs [`DAGAttnProcessor`] on the cross-attention layers at the selected resolutions of a UNet.

    Use it as a context manager (`with capture: ...`) around the UNet calls to hook: the UNet carries the capture
    processors only inside the block, so pipelines that share the UNet (`from_pipe`) never see them.

    Args:
        unet (`UNet2DConditionModel`): the UNet to hook.
        layer_fractions (`tuple[float, ...]`): query side as a fraction of the latent side, e.g. `(0.25, 0.5)`.

    Raises:
        `ValueError`: the UNet has no cross-attention layer at any of the fractions.
    """

    def __init__(self, unet: UNet2DConditionModel, layer_fractions: tuple[float, ...]):
        # a torch.compile'd UNet: hook the model it wraps (the wrapper prefixes module names with `_orig_mod.`)
        unet = getattr(unet, "_orig_mod", unet)
        layers = cross_attention_layers(unet)
        self.unet = unet
        self.layers = {
            name: factor
            for name, factor in layers.items()
            if any(abs(1.0 / factor - fraction) < 1e-6 for fraction in layer_fractions)
        }
        if not self.layers:
            available = sorted({f"1/{factor}" for factor in layers.values()})
            raise ValueError(
                f"The UNet has no cross-attention layer at {list(layer_fractions)} of the latent side; its"
                f" cross-attention layers are at {available or 'none'}. Pass `layer_fractions` with some of those."
            )
        self.store = QueryStore()
        self._previous: dict | None = None

    @property
    def installed(self) -> bool:
        return self._previous is not None

    def attention_modules(self) -> dict[str, Attention]:
        """The `Attention` module of every selected layer, keyed by processor name."""
        modules = dict(self.unet.named_modules())
        return {name: modules[name.removesuffix(".processor")] for name in self.layers}

    def check_installable(self) -> None:
        """Raises `ValueError` if a selected layer carries a processor other than diffusers' default
        (`AttnProcessor2_0` / `AttnProcessor`), which the capture processor would replace."""
        processors = self.unet.attn_processors
        for name in self.layers:
            if type(processors[name]) not in (AttnProcessor2_0, AttnProcessor):
                raise ValueError(
                    f"Layer {name!r} uses {type(processors[name]).__name__}; DAG detection replaces the default"
                    " attention processor at its detection layers and would drop that one. Restore the default"
                    " processor there (`pipe.unet.set_default_attn_processor()`), or choose other"
                    " `layer_fractions`."
                )

    def install(self) -> None:
        """Swaps the capture processors in, keeping every other layer's processor as it is.

        Raises:
            `ValueError`: already installed, or see [`check_installable`].
        """
        if self.installed:
            raise ValueError("The capture processors are already installed on this UNet.")
        self.check_installable()
        previous = dict(self.unet.attn_processors)
        processors = dict(previous)
        for name in self.layers:
            processors[name] = DAGAttnProcessor(self.store, name)
        self.unet.set_attn_processor(processors)
        self._previous = previous

    def remove(self) -> None:
        """Restores exactly the processors that were set before [`install`]."""
        if self._previous is None:
            return
        # set_attn_processor consumes the dict it gets: hand it a copy
        self.unet.set_attn_processor(dict(self._previous))
        self._previous = None
        self.store.clear()

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
