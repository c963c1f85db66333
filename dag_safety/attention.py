"""Forward pre-hooks that capture the UNet's cross-attention query inputs for guideline-token detection.

While its [`QueryStore`] is armed, each hook keeps the states the layer's `to_q` projects, for the conditional batch
entries. Detection projects them with the `to_q` snapshot taken at `enable_dag`, so a guideline embedding keeps
scoring queries with the projections it was fitted to, even after weights are loaded. [`CrossAttentionCapture`]
registers the hooks on the selected `attn2` layers of a UNet and removes them again; the layers' attention
processors are never replaced, so any processor the user set keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Self

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

__all__ = [
    "CapturedQuery",
    "CrossAttentionCapture",
    "QueryStore",
    "attention_blocks",
    "cross_attention_layers",
    "select_layers",
]


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
    """Shared by the capture hooks of one UNet; holds the queries of the current UNet call.

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


class _QueryHook:
    """Forward pre-hook of one `attn2` module: hands its query input to a [`QueryStore`] while the store is armed.

    A hook, not an attention processor, so whatever processor the layer runs (SDPA, xformers, IP-Adapter, a
    user's own) keeps running unchanged: the module's output is never touched.
    """

    def __init__(self, store: QueryStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, module: Attention, args: tuple, kwargs: dict) -> None:
        if not self.store.armed:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        spatial_size = None
        if hidden_states.ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial_size = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        # a view, not a copy: capturing adds no work to the attention itself
        self.store.add(self.name, hidden_states, spatial_size)


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


def attention_blocks(layers: Iterable[str]) -> tuple[str, ...]:
    """The UNet modules (`DAGConfig.layers` names, e.g. `"up_blocks.2.attentions.0"`) that hold the cross-attention
    processors `layers` (names as in [`cross_attention_layers`]), sorted."""
    return tuple(sorted({name.split(".transformer_blocks")[0] for name in layers}))


def select_layers(available: dict[str, int], names: tuple[str, ...]) -> dict[str, int]:
    """The cross-attention layers of `available` ([`cross_attention_layers`]) under the UNet modules `names`: each
    name selects the `attn2` layers whose module path is the name or starts with it, e.g.
    `"up_blocks.2.attentions.0"` or `"up_blocks.2"`.

    Raises:
        `ValueError`: a name selects no layer; the message lists the UNet's cross-attention blocks.
    """
    selected = {}
    for name in names:
        found = {
            key: factor
            for key, factor in available.items()
            if key.removesuffix(".processor") == name or key.startswith(name.rstrip(".") + ".")
        }
        if not found:
            raise ValueError(
                f"The layer name {name!r} selects no cross-attention layer of this UNet; its cross-attention"
                f" blocks are {list(attention_blocks(available))}. Pass `layers` with some of those."
            )
        selected.update(found)
    return selected


class CrossAttentionCapture:
    """Registers query-capturing forward pre-hooks on the cross-attention layers at the selected resolutions of a
    UNet.

    Use it as a context manager (`with capture: ...`) around the UNet calls to hook, or [`install`] / [`remove`]
    for longer. The hooks only read the layers' inputs; while the store is disarmed they do nothing at all.

    Args:
        unet (`UNet2DConditionModel`): the UNet to hook.
        layer_fractions (`tuple[float, ...]`): query side as a fraction of the latent side, e.g. `(0.25, 0.5)`.
        layers (`tuple[str, ...]`, *optional*): the layers by name instead (see [`select_layers`]).

    Raises:
        `ValueError`: the UNet has no cross-attention layer at any of the fractions, a name selects no layer, or a
            selected layer normalises
            its queries before `to_q` (`group_norm` / `spatial_norm`, which SD and SDXL cross-attention do not have).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        layer_fractions: tuple[float, ...],
        layers: tuple[str, ...] | None = None,
    ):
        # a torch.compile'd UNet: hook the model it wraps (the wrapper prefixes module names with `_orig_mod.`)
        unet = getattr(unet, "_orig_mod", unet)
        available = cross_attention_layers(unet)
        self.unet = unet
        if layers is not None:
            self.layers = select_layers(available, layers)
        else:
            self.layers = {
                name: factor
                for name, factor in available.items()
                if any(abs(1.0 / factor - fraction) < 1e-6 for fraction in layer_fractions)
            }
        if not self.layers:
            sides = sorted({f"1/{factor}" for factor in available.values()})
            raise ValueError(
                f"The UNet has no cross-attention layer at {list(layer_fractions)} of the latent side; its"
                f" cross-attention layers are at {sides or 'none'}. Pass `layer_fractions` with some of those."
            )
        for name, attn in self.attention_modules().items():
            if attn.group_norm is not None or attn.spatial_norm is not None:
                # the hook sees the layer's input, and `to_q` would see it normalised: the captured queries would
                # not be the layer's
                raise ValueError(
                    f"Layer {name!r} normalises its input before `to_q` (group_norm / spatial_norm), which DAG's"
                    " query capture does not follow. Choose other `layer_fractions`."
                )
        self.store = QueryStore()
        self._handles: list | None = None

    @property
    def installed(self) -> bool:
        return self._handles is not None

    def attention_modules(self) -> dict[str, Attention]:
        """The `Attention` module of every selected layer, keyed by processor name."""
        modules = dict(self.unet.named_modules())
        return {name: modules[name.removesuffix(".processor")] for name in self.layers}

    def install(self) -> None:
        """Registers the hooks.

        Raises:
            `ValueError`: already installed.
        """
        if self.installed:
            raise ValueError("The query-capture hooks are already installed on this UNet.")
        self._handles = [
            attn.register_forward_pre_hook(_QueryHook(self.store, name), with_kwargs=True)
            for name, attn in self.attention_modules().items()
        ]

    def remove(self) -> None:
        """Removes the hooks and forgets any captured queries."""
        for handle in self._handles or []:
            handle.remove()
        self._handles = None
        self.store.clear()

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
