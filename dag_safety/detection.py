"""Guideline-token cross-attention maps (paper 3.1, Fig. 3).

A guideline embedding `c*` is a `(1+K, D)` tensor in the cross-attention context space (the text encoder's
output space): a start-of-text row, then `K` concept rows. At each selected layer `l` the captured queries
`Q_l` attend to `K_l = to_k(c*)`; the softmax runs over the `1+K` rows only (the start-of-text row is the
"background" a query that matches nothing puts its mass on, as in OVAM), the heads are averaged, the maps are
bilinearly upsampled to the latent size and averaged over layers, the concept rows are averaged and the result
is min-max normalised per image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .attention import CapturedQuery

__all__ = [
    "QueryProjection",
    "attention_probs",
    "combine_concepts",
    "concept_map",
    "concept_presence",
    "concept_share",
    "infer_spatial_size",
    "layer_spatial_size",
    "layer_token_maps",
    "minmax_normalize",
    "project_keys",
    "token_maps",
    "validate_embedding",
]


def validate_embedding(embedding: torch.Tensor, cross_attention_dim: int | None = None) -> None:
    """Checks a guideline embedding: `(1+K, D)` with `K >= 1`, finite values, and `D == cross_attention_dim` when
    given.

    Raises:
        `ValueError`: naming the problem and what is expected.
    """
    if not isinstance(embedding, torch.Tensor):
        raise ValueError(  # noqa: TRY004  # documented and tested as ValueError (tests/test_detection.py)
            f"A guideline embedding must be a torch.Tensor of shape (1+K, D), got {type(embedding).__name__}."
        )
    if embedding.ndim != 2 or embedding.shape[0] < 2:
        raise ValueError(
            f"A guideline embedding must have shape (1+K, D) with a start-of-text row and K >= 1 concept rows,"
            f" got shape {tuple(embedding.shape)}."
        )
    if cross_attention_dim is not None and embedding.shape[1] != cross_attention_dim:
        raise ValueError(
            f"The guideline embedding has width {embedding.shape[1]}, but this UNet's cross-attention width"
            f" (`unet.config.cross_attention_dim`) is {cross_attention_dim}: the embedding was made for another"
            " base model. Use an embedding optimized for this model."
        )
    if not torch.isfinite(embedding).all():
        raise ValueError("The guideline embedding contains NaN or Inf values; re-create or re-download it.")


def project_keys(attn: Attention, embedding: torch.Tensor) -> torch.Tensor:
    """Keys of a guideline embedding at one cross-attention layer, as the layer's processor computes them.

    Args:
        embedding (`torch.Tensor`): `(1+K, D)`.

    Returns:
        `torch.Tensor`: `(heads, 1+K, head_dim)` (differentiable in `embedding`).
    """
    context = embedding[None].to(dtype=attn.to_k.weight.dtype, device=attn.to_k.weight.device)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    head_dim = key.shape[-1] // attn.heads
    key = key.view(1, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key[0]


@dataclass(frozen=True)
class QueryProjection:
    """A frozen copy of one layer's query projection (`to_q`, then the head split and `norm_q`).

    Attributes:
        weight (`torch.Tensor`): `(heads·head_dim, C)`.
        bias (`torch.Tensor | None`): `(heads·head_dim,)`.
        heads (`int`): attention heads.
        scale (`float`): the layer's softmax scale `attn.scale` (`head_dim ** -0.5`).
        norm_q (`torch.nn.Module | None`): the layer's `norm_q`, if any.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    heads: int
    scale: float
    norm_q: torch.nn.Module | None = None

    @classmethod
    def snapshot(cls, attn: Attention) -> QueryProjection:
        """Copies the layer's current effective `to_q`.

        A plain `nn.Linear` is copied as is; any other module (an unfused LoRA layer, say) is probed as the affine
        map it is: `b = to_q(0)`, `Wᵀ = to_q(I) - b`.
        """
        to_q = attn.to_q
        with torch.no_grad():
            if type(to_q) is torch.nn.Linear:
                weight = to_q.weight.detach().clone()
                bias = None if to_q.bias is None else to_q.bias.detach().clone()
            else:
                reference = next(to_q.parameters())
                options = {"dtype": reference.dtype, "device": reference.device}
                bias = to_q(torch.zeros(1, attn.query_dim, **options))[0]
                weight = (to_q(torch.eye(attn.query_dim, **options)) - bias).T.contiguous()
        # a copy, like the weights: loading weights later must not change what the embedding was fitted to
        norm_q = None if attn.norm_q is None else copy.deepcopy(attn.norm_q)
        return cls(weight=weight, bias=bias, heads=attn.heads, scale=attn.scale, norm_q=norm_q)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Queries `(B, heads, N, head_dim)` from captured states `(B, N, C)`."""
        weight = self.weight.to(device=hidden_states.device, dtype=hidden_states.dtype)
        bias = None if self.bias is None else self.bias.to(device=hidden_states.device, dtype=hidden_states.dtype)
        query = F.linear(hidden_states, weight, bias)
        batch, tokens, inner = query.shape
        query = query.view(batch, tokens, self.heads, inner // self.heads).transpose(1, 2)
        return query if self.norm_q is None else self.norm_q(query)


def layer_spatial_size(captured: CapturedQuery, latent_size: tuple[int, int]) -> tuple[int, int]:
    """`(h_l, w_l)` of a captured layer: as captured, or [`infer_spatial_size`] from its query count."""
    if captured.spatial_size is not None:
        return captured.spatial_size
    return infer_spatial_size(captured.hidden_states.shape[1], latent_size)


def infer_spatial_size(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """`(h_l, w_l)` of a layer with `tokens` query pixels in a UNet whose latent is `latent_size`.

    Each of the UNet's down-samplings (a stride-2 convolution with padding 1) maps a side `x` to `ceil(x / 2)`, and the
    up-samplings return to the down path's sizes, so the layers' sizes are the latent's halved with rounding up
    (a 64×45 latent has layers of 32×23, 16×12 and 8×6). The layer is the one of these with `tokens` pixels.
    """
    height, width = latent_size
    while height * width > tokens and (height, width) != (1, 1):
        height, width = -(-height // 2), -(-width // 2)
    if height * width != tokens:
        raise ValueError(f"Cannot infer the spatial size of a layer with {tokens} queries for latent {latent_size}.")
    return height, width


def layer_token_maps(
    captured: CapturedQuery, projection: QueryProjection, keys: torch.Tensor, latent_size: tuple[int, int]
) -> torch.Tensor:
    """Attention of each query pixel over the `1+K` guideline rows at one layer, averaged over heads.

    Args:
        captured (`CapturedQuery`): the layer's query inputs `(B, N, C)`.
        projection (`QueryProjection`): the layer's query projection, as snapshotted.
        keys (`torch.Tensor`): from [`project_keys`], `(heads, 1+K, head_dim)`.
        latent_size (`tuple[int, int]`): `(h, w)` of the latent, to infer `(h_l, w_l)` for 3-D inputs.

    Returns:
        `torch.Tensor`: `(B, 1+K, h_l, w_l)`, each pixel's values summing to 1 over the rows.
    """
    probs = attention_probs(projection(captured.hidden_states), keys, projection.scale)
    height, width = layer_spatial_size(captured, latent_size)
    return probs.transpose(1, 2).reshape(probs.shape[0], -1, height, width)


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over the guideline rows, averaged over heads.

    Args:
        query (`torch.Tensor`): `(B, heads, N, head_dim)`.
        keys (`torch.Tensor`): `(heads, 1+K, head_dim)`.
        scale (`float`): softmax scale (`head_dim ** -0.5`).

    Returns:
        `torch.Tensor`: `(B, N, 1+K)` float32.
    """
    # scores in float32: a float16 q·k before the scale can overflow (inf, then a NaN map read as nothing detected)
    keys = keys.to(device=query.device, dtype=torch.float32)
    scores = torch.matmul(query.float(), keys.transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).mean(dim=1)


def token_maps(
    queries: dict[str, CapturedQuery],
    projections: dict[str, QueryProjection],
    keys: dict[str, torch.Tensor],
    latent_size: tuple[int, int],
) -> torch.Tensor:
    """Layer-averaged token maps: each layer's [`layer_token_maps`] upsampled (bilinear) to the latent size.

    Layers with the same query shape, projection shape, heads and softmax scale (in SD v1.x the two or three
    layers at each resolution) are computed as one batched product and averaged before the upsampling, which is
    linear, so the result equals the per-layer definition up to float rounding. At SD v1.4 shapes this cuts a
    detection from 664 to 239 aten operations, which is what a step costs on a GPU running at its kernel-launch rate.

    Returns:
        `torch.Tensor`: `(B, 1+K, h, w)`, float32.
    """
    if not queries:
        raise RuntimeError("No cross-attention queries were captured in this UNet call.")
    groups: dict[tuple, list[str]] = {}
    for name in sorted(queries):
        projection = projections[name]
        batchable = projection.norm_q is None and projection.bias is None
        key = (
            layer_spatial_size(queries[name], latent_size),
            tuple(queries[name].hidden_states.shape),
            tuple(projection.weight.shape),
            projection.heads,
            projection.scale,
            tuple(keys[name].shape),
        )
        groups.setdefault(key if batchable else (name,), []).append(name)
    total = 0.0
    for names in groups.values():
        if len(names) == 1:
            name = names[0]
            layer_maps = layer_token_maps(queries[name], projections[name], keys[name], latent_size)
        else:
            layer_maps = _group_token_maps(names, queries, projections, keys, latent_size)
        upsampled = F.interpolate(layer_maps, size=latent_size, mode="bilinear", align_corners=False)
        total = total + len(names) * upsampled
    return total / len(queries)


def _group_token_maps(
    names: list[str],
    queries: dict[str, CapturedQuery],
    projections: dict[str, QueryProjection],
    keys: dict[str, torch.Tensor],
    latent_size: tuple[int, int],
) -> torch.Tensor:
    """[`layer_token_maps`] averaged over `L` layers of identical shapes (bias-free `to_q`, no `norm_q`), batched.

    Returns:
        `torch.Tensor`: `(B, 1+K, h_l, w_l)`, float32.
    """
    hidden = torch.stack([queries[name].hidden_states for name in names])  # (L, B, N, C)
    layers, batch, tokens, channels = hidden.shape
    weight = torch.stack([projections[name].weight for name in names]).to(device=hidden.device, dtype=hidden.dtype)
    query = torch.bmm(hidden.view(layers, batch * tokens, channels), weight.transpose(1, 2))  # (L, B·N, inner)
    heads = projections[names[0]].heads
    query = query.view(layers, batch, tokens, heads, -1).transpose(2, 3)  # (L, B, heads, N, head_dim)
    stacked_keys = torch.stack([keys[name] for name in names]).to(device=hidden.device, dtype=torch.float32)
    # float32 scores, as in `attention_probs`
    scores = torch.matmul(query.float(), stacked_keys[:, None].transpose(-1, -2)) * projections[names[0]].scale
    probs = scores.softmax(dim=-1).mean(dim=(0, 2))  # (B, N, 1+K)
    height, width = layer_spatial_size(queries[names[0]], latent_size)
    return probs.transpose(1, 2).reshape(batch, -1, height, width)


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of `(B, h, w)` maps to `[0, 1]`.

    A constant map carries no location and becomes all zeros (nothing detected). "Constant" allows for rounding:
    a span below `1e-5` of the map's magnitude (a uniform attention map after bilinear upsampling, say) is only
    float noise, which min-max would otherwise blow up into a detection.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    span = high - low
    informative = span > 1e-5 * torch.maximum(low.abs(), high.abs())
    return torch.where(
        informative, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps)
    )


def concept_share(layer_averaged: torch.Tensor) -> torch.Tensor:
    """The raw map of one concept: the attention share of its `K` concept rows (start-of-text row dropped), meaned.

    Args:
        layer_averaged (`torch.Tensor`): `(B, 1+K, h, w)` from [`token_maps`].

    Returns:
        `torch.Tensor`: `(B, h, w)`, attention probabilities in `[0, 1]` before any normalisation.
    """
    return layer_averaged[:, 1:].mean(dim=1)


def concept_presence(layer_averaged: torch.Tensor) -> torch.Tensor:
    """The presence evidence of one concept: the summed attention share of its `K` concept rows, `1 -` the
    start-of-text share.

    A sum, not [`concept_share`]'s mean: a mean over `K` rows is capped at `1/K` and reads like an OR of the rows,
    so an absolute threshold on it means something different for every `K`.

    Args:
        layer_averaged (`torch.Tensor`): `(B, 1+K, h, w)` from [`token_maps`].

    Returns:
        `torch.Tensor`: `(B, h, w)` in `[0, 1]`.
    """
    return layer_averaged[:, 1:].sum(dim=1)


def concept_map(layer_averaged: torch.Tensor) -> torch.Tensor:
    """`Â` of one concept: its [`concept_share`] min-max normalised per image, `(B, h, w)` in `[0, 1]`."""
    return minmax_normalize(concept_share(layer_averaged))


def combine_concepts(maps: list[torch.Tensor]) -> torch.Tensor:
    """Several concepts: the element-wise max of their normalised maps, `(B, h, w)` in `[0, 1]` (paper C)."""
    return torch.stack(maps).amax(dim=0)
