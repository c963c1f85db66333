"""A presence head on the components DAG forms (`detection="head"`, README "Beyond the paper").

The guideline rows find *where* a concept may be; on a model whose attention does not separate the concept from
its look-alikes (the mini model's red star from a red circle or a blue star), they cannot say *whether* it is
there. The cross-attention layers' inputs can, once read over a whole object: `benchmarks/probe.py` finds a read-out
of them averaged over an object separates what a per-pixel one cannot. The head is that read-out, applied to the
components DAG itself forms: a component's feature is a pooling over its pixels of the chosen layers' inputs
(upsampled to the latent, concatenated, smoothed over the guided steps as DAG's evidence is): their mean, and by
default also their maximum and standard deviation, which say how the object varies inside the component (a star's
points against a circle's even body) where the mean alone confuses look-alikes (`benchmarks/RESULTS.md`). Its
score is the head's probability on it, linear (`σ(b + w·x)`) or with one hidden layer (`σ(b + v·GELU(Wx + c))`: a
conjunction such as "red *and* star" is no half-space of the features, and a linear head on the mini model
leaves most red stars unguided at a 5 % false-detection rate; `benchmarks/RESULTS.md`). It is fitted
([`fit_presence_head`]) on the components DAG forms on annotated training images along the guided steps, labelled
by whether they overlap an unsafe image's mask. The UNet runs with each training image's caption, so a head fitted
on matching captions alone learns the caption's words as much as the image: [`swap_captions`] adds images again
under a caption of the other class, so that the head has to read what is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from .attention import CapturedQuery
from .config import HEAD_CAPTION_SWAPS, HEAD_POOLINGS
from .detection import concept_presence, layer_spatial_size, minmax_normalize
from .guidance import Components, unsafe_components

__all__ = [
    "HEAD_BIAS",
    "HEAD_HIDDEN_BIAS",
    "HEAD_OUTPUT",
    "HEAD_POOLING",
    "HEAD_PREFIX",
    "HeadFit",
    "PresenceHead",
    "component_features",
    "fit_logistic",
    "fit_mlp",
    "fit_presence_head",
    "roc_auc",
    "swap_captions",
]

HEAD_PREFIX = "presence_head."
HEAD_BIAS = HEAD_PREFIX + "bias"
HEAD_HIDDEN_BIAS = HEAD_PREFIX + "hidden_bias"
HEAD_OUTPUT = HEAD_PREFIX + "output"
HEAD_POOLING = HEAD_PREFIX + "pooling"


@dataclass(frozen=True)
class PresenceHead:
    """A read-out of cross-attention layer inputs that scores DAG's components by their pooled feature `x`: per
    layer `l` (in [`layers`] order), the layer's inputs upsampled to the latent and pooled over the component's
    pixels by each of [`pooling`] in turn, `x_l = [pool_1(l), pool_2(l), …]` (`P·C_l` values).

    Linear (`output is None`): `logit = b + Σ_l w_l · x_l`. With a hidden layer of `H` units:
    `logit = b + v · GELU(Σ_l W_l x_l + c)`, which can read a conjunction ("red" *and* "star") that no half-space
    of the features holds.

    Attributes:
        weights (`dict[str, torch.Tensor]`): per layer (processor name, as `CrossAttentionCapture.layers`), float32
            weights on its pooled input channels: `(P·C_l,)` for a linear head, `(H, P·C_l)` with a hidden layer,
            the `P` blocks of `C_l` in [`pooling`]'s order.
        bias (`float`): the output bias `b`.
        hidden_bias (`torch.Tensor`, *optional*): `c`, `(H,)`; with a hidden layer only.
        output (`torch.Tensor`, *optional*): `v`, `(H,)`; with a hidden layer only.
        pooling (`tuple[str, ...]`): the statistics over a component's pixels, distinct names from [`HEAD_POOLINGS`]:
            `"mean"`, `"max"` (per channel) and `"std"` (per channel, over the pixels; 0 for one pixel). A head
            saved without them pools by the mean alone.
    """

    weights: dict[str, torch.Tensor]
    bias: float
    hidden_bias: torch.Tensor | None = None
    output: torch.Tensor | None = None
    pooling: tuple[str, ...] = ("mean",)

    def __post_init__(self):
        if not self.weights:
            raise ValueError("A presence head needs the weights of at least one layer.")
        if (
            not self.pooling
            or len(set(self.pooling)) != len(self.pooling)
            or not set(self.pooling) <= set(HEAD_POOLINGS)
        ):
            raise ValueError(
                f"A presence head's pooling must be distinct names from {HEAD_POOLINGS}, got {list(self.pooling)}."
            )
        hidden = self.output is not None
        if hidden != (self.hidden_bias is not None):
            raise ValueError("A presence head's hidden layer needs both its bias and its output weights.")
        units = None if not hidden else self.output.shape
        for name, vector in (("hidden_bias", self.hidden_bias), ("output", self.output)):
            if vector is not None and (vector.ndim != 1 or vector.shape != units or not torch.isfinite(vector).all()):
                raise ValueError(f"The presence head's {name} must be a finite (H,) tensor like its output weights.")
        for name, weight in self.weights.items():
            shape_ok = isinstance(weight, torch.Tensor) and (
                weight.ndim == 2 and (weight.shape[0],) == units if hidden else weight.ndim == 1
            )
            shape_ok = shape_ok and weight.shape[-1] % len(self.pooling) == 0
            if not shape_ok or not torch.isfinite(weight).all():
                shape = "(H, P·C) with H its hidden units" if hidden else "(P·C,)"
                shape += f", P = {len(self.pooling)} poolings"
                raise ValueError(f"The presence head's weights for {name!r} must be a finite {shape} tensor.")
        if not math.isfinite(self.bias):
            raise ValueError(f"The presence head's bias must be finite, got {self.bias!r}.")

    @property
    def layers(self) -> tuple[str, ...]:
        """The processor names of the layers it reads, sorted."""
        return tuple(sorted(self.weights))

    @property
    def widths(self) -> tuple[int, ...]:
        """The input width `C_l` of each of [`layers`]."""
        return tuple(self.weights[name].shape[-1] // len(self.pooling) for name in self.layers)

    def check_layers(self, widths: dict[str, int], source: str = "The presence head") -> None:
        """Checks every layer exists in a UNet whose cross-attention layers have input widths `widths` (processor
        name → `attn.query_dim`).

        Raises:
            `ValueError`: a layer is missing or has another width; the message names it.
        """
        for name, width in zip(self.layers, self.widths):
            if name not in widths:
                raise ValueError(
                    f"{source} reads the layer {name!r}, which this UNet does not have: it was fitted on another"
                    " model. Fit a head for this model (`dag-safety calibrate --presence-head`)."
                )
            if widths[name] != width:
                raise ValueError(
                    f"{source} reads {width} input channels of {name!r}, whose input width here is"
                    f" {widths[name]}: it was fitted on another model. Fit a head for this model."
                )

    @cached_property
    def _weight(self) -> torch.Tensor:
        """The layers' weights side by side, `(P·ΣC_l,)` or `(H, P·ΣC_l)`: concatenated once, not at every step."""
        return torch.cat([self.weights[name] for name in self.layers], dim=-1)

    def component_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits `(n,)` of `n` components from their pooled features `(n, P·ΣC_l)` ([`component_features`]'
        order)."""
        weight = self._weight.to(features)
        if self.output is None:
            return features @ weight + self.bias
        hidden = F.gelu(features @ weight.T + self.hidden_bias.to(features))
        return hidden @ self.output.to(features) + self.bias

    def features(self, queries: dict[str, CapturedQuery], latent_size: tuple[int, int]) -> torch.Tensor:
        """The head's features from one UNet call's captured inputs (which must include its layers), upsampled
        (bilinear) to the latent size and concatenated in [`layers`] order: `(B, h·w, ΣC_l)` float32."""
        parts = []
        for name in self.layers:
            captured = queries[name]
            height, width = layer_spatial_size(captured, latent_size)
            batch = captured.hidden_states.shape[0]
            layer = captured.hidden_states.float().transpose(1, 2).reshape(batch, -1, height, width)
            if (height, width) != tuple(latent_size):
                layer = F.interpolate(layer, size=latent_size, mode="bilinear", align_corners=False)
            parts.append(layer.flatten(2).transpose(1, 2))
        return torch.cat(parts, dim=2)

    def paint(
        self,
        dag_maps: torch.Tensor,
        features: torch.Tensor,
        unsafe_threshold: float,
        edit_mask_threshold: float,
        max_edit_area: float,
        components: str = "threshold",
        basin_floor: float = 0.25,
        found: Components | None = None,
    ) -> torch.Tensor:
        """Each unsafe component of `Â` filled with its logit (the head on its pooled feature), 0 elsewhere:
        `(B, h, w)` float32 on the CPU. A component's mean over this map is its logit, which is how
        `guidance.area_scaler` reads it (the components found again from the same `Â`, thresholds and
        `components` rule, [`guidance.unsafe_components`]).

        Args:
            dag_maps (`torch.Tensor`): `Â`, `(B, h, w)`.
            features (`torch.Tensor`): [`features`] (smoothed over the steps, in DAG), `(B, h·w, ΣC_l)`.
            found (*optional*): the components of `dag_maps` under the same thresholds and rule, already found
                (`guidance.find_components`); found here if `None`.
        """
        if found is None:
            rule = (unsafe_threshold, edit_mask_threshold, max_edit_area, components, basin_floor)
            found = [unsafe_components(m, *rule) for m in dag_maps.detach().float().cpu().numpy()]
        features = features.detach().float().cpu()
        painted = torch.zeros(dag_maps.shape, dtype=torch.float32)
        for index, (labels, count) in enumerate(found):
            if count == 0:
                continue
            pooled = component_features(features[index], labels, count, self.pooling, self.widths)
            logits = torch.cat([torch.zeros(1), self.component_logits(pooled)])
            painted[index] = logits[torch.from_numpy(labels).long()]
        return painted

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors entries: `presence_head.<layer>` (`(P·C_l,)` or `(H, P·C_l)`), `presence_head.bias`
        `(1,)`, `presence_head.pooling` (int64 `(P,)`, indices into [`HEAD_POOLINGS`]), and with a hidden layer
        `presence_head.hidden_bias` and `presence_head.output` `(H,)`."""
        tensors = {HEAD_PREFIX + name: weight.contiguous() for name, weight in self.weights.items()}
        tensors[HEAD_BIAS] = torch.tensor([self.bias], dtype=torch.float32)
        tensors[HEAD_POOLING] = torch.tensor([HEAD_POOLINGS.index(name) for name in self.pooling], dtype=torch.int64)
        if self.output is not None:
            tensors[HEAD_HIDDEN_BIAS] = self.hidden_bias.contiguous()
            tensors[HEAD_OUTPUT] = self.output.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], source: str) -> PresenceHead | None:
        """The head in a safetensors file's entries ([`to_tensors`]' form), `None` if it holds none.

        Raises:
            `ValueError`: head entries without a bias, a bias that is not one number, or weights of the wrong
                shape or not finite; the message names `source`.
        """
        entries = {name: value for name, value in tensors.items() if name.startswith(HEAD_PREFIX)}
        if not entries:
            return None
        bias = entries.pop(HEAD_BIAS, None)
        hidden_bias, output = entries.pop(HEAD_HIDDEN_BIAS, None), entries.pop(HEAD_OUTPUT, None)
        pooling = entries.pop(HEAD_POOLING, None)
        if pooling is None:
            pooling = ("mean",)  # saved before heads could pool by more than the mean
        else:
            codes = pooling.reshape(-1).tolist()
            if pooling.dtype.is_floating_point or not all(0 <= code < len(HEAD_POOLINGS) for code in codes):
                raise ValueError(
                    f"{source}: its presence head's {HEAD_POOLING!r} must hold indices into {HEAD_POOLINGS}, got"
                    f" {codes}. The file is damaged; re-save or re-download the embedding."
                )
            pooling = tuple(HEAD_POOLINGS[code] for code in codes)
        if bias is None or bias.numel() != 1 or not entries:
            raise ValueError(
                f"{source}: its presence head is incomplete (it needs {HEAD_BIAS!r} holding one number and at"
                " least one layer's weights). The file is damaged; re-save or re-download the embedding."
            )
        try:
            return cls(
                {name.removeprefix(HEAD_PREFIX): value.float() for name, value in entries.items()},
                float(bias.reshape(())),
                None if hidden_bias is None else hidden_bias.float(),
                None if output is None else output.float(),
                pooling,
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error} The file is damaged; re-save or re-download it.") from None


def component_features(
    features: torch.Tensor,
    labels: np.ndarray,
    count: int,
    pooling: tuple[str, ...] = ("mean",),
    widths: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Pooled feature of each of `count` labelled components (`labels` `(h, w)` from `ndimage.label`, 0 outside
    them) in one image's `features` `(h·w, C)`: `(count, P·C)`, per layer (`widths`, the `C_l` summing to `C`; one
    layer of `C` by default) the `P` statistics of [`PresenceHead`]'s layout in `pooling`'s order."""
    flat = torch.from_numpy(labels.reshape(-1)).long()
    sizes = torch.bincount(flat, minlength=count + 1).clamp_min(1)[:, None]
    mean = torch.zeros(count + 1, features.shape[1]).index_add_(0, flat, features) / sizes
    stats = {}
    for name in pooling:
        if name == "mean":
            stats[name] = mean
        elif name == "max":
            start = torch.full((count + 1, features.shape[1]), -torch.inf)
            index = flat[:, None].expand_as(features)
            stats[name] = start.scatter_reduce(0, index, features, reduce="amax", include_self=True)
        else:  # "std": about the component's own mean, which no rounding of E[x²] − E[x]² can make negative
            squares = (features - mean[flat]).pow(2)
            stats[name] = (torch.zeros_like(mean).index_add_(0, flat, squares) / sizes).sqrt()
    widths = widths or (features.shape[1],)
    parts = {name: stat[1:].split(list(widths), dim=1) for name, stat in stats.items()}
    return torch.cat([parts[name][layer] for layer in range(len(widths)) for name in pooling], dim=1)


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression by L-BFGS: `(weight (C,), bias (1,))` on `features` `(N, C)` (already
    standardised) and `labels` `(N,)` in `{0, 1}`. Positives are weighted by `negatives / positives`, so that
    a rare concept is not fitted away; `l2` is the ridge penalty on the weights."""
    features, labels = features.float(), labels.float()
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    pos_weight = (1 - labels).sum() / labels.sum().clamp_min(1)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ weight + bias, labels, pos_weight=pos_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@dataclass(frozen=True)
class HeadFit:
    """A fitted [`PresenceHead`] and what it was fitted on.

    Attributes:
        head (`PresenceHead`): the head, standardisation folded into its weights and bias.
        components (`int`), positives (`int`): the training components (one per component per guided step), and
            those overlapping an unsafe image's mask.
        images (`int`): the training images.
        swapped_captions (`str`): which of them were also fitted under a caption of the other class
            ([`HEAD_CAPTION_SWAPS`]).
        train_auc (`float`): ROC AUC of the head's component scores on its own training components.
    """

    head: PresenceHead
    components: int
    positives: int
    images: int
    train_auc: float
    swapped_captions: str = "none"

    def as_metadata(self) -> dict:
        """The summary stored in the embedding's `calibration` metadata (`presence_head`)."""
        return {
            "layers": list(self.head.layers),
            "hidden_units": 0 if self.head.output is None else int(self.head.output.shape[0]),
            "pooling": list(self.head.pooling),
            "training_images": self.images,
            "swapped_captions": self.swapped_captions,
            "training_components": self.components,
            "positive_components": self.positives,
            "train_auc": round(self.train_auc, 4),
        }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney ROC AUC of `scores` `(N,)` for the boolean labels `positive`, ties counted half; NaN without
    both classes."""
    ranks = rankdata(scores)
    count = int(positive.sum())
    others = len(scores) - count
    if count == 0 or others == 0:
        return float("nan")
    return float((ranks[positive].sum() - count * (count + 1) / 2) / (count * others))


def fit_mlp(
    features: torch.Tensor, labels: torch.Tensor, hidden: int, weight_decay: float = 1e-3, epochs: int = 400
) -> torch.nn.Sequential:
    """A one-hidden-layer GELU network `(N, C) -> (N,)` logits, fitted by full-batch AdamW (lr 3e-3) on
    `features` (already standardised) with the class-balanced loss of [`fit_logistic`]; seeded, so a fit is
    reproducible."""
    features, labels = features.float(), labels.float()
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(features.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            bound = 1 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=weight_decay)
    pos_weight = (1 - labels).sum() / labels.sum().clamp_min(1)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(net(features)[:, 0], labels, pos_weight=pos_weight)
            loss.backward()
            optimizer.step()
    return net


def swap_captions(images: list, seed: int = 0) -> list:
    """Each of `images` again, captioned as an image of the other class: an unsafe image with the caption of a safe
    one, a safe image with the caption of an unsafe one (drawn with `seed`, uniformly, with replacement).

    The masks stay: an unsafe image under a safe caption is the concept drawn where the prompt does not name it
    (an adversarial or unprompted one, which DAG must still catch), a safe image under an unsafe caption is the
    concept named where it is not drawn. Fitted on both, a presence head cannot tell the classes by the caption.

    Args:
        images (`list[AnnotatedImage]`): safe and unsafe images.

    Returns:
        `list[AnnotatedImage]`: as many images as `images`, in their order.

    Raises:
        `ValueError`: no safe or no unsafe image (nothing to swap with).
    """
    unsafe = [item.caption for item in images if item.unsafe]
    safe = [item.caption for item in images if not item.unsafe]
    if not unsafe or not safe:
        raise ValueError("Swapping captions needs safe and unsafe images; got only one kind.")
    generator = np.random.default_rng(seed)
    return [replace(item, caption=str(generator.choice(safe if item.unsafe else unsafe))) for item in images]


@torch.no_grad()
def fit_presence_head(
    pipe,
    images: list,
    layers: tuple[str, ...],
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 16,
    hidden: int = 0,
    progress: bool = True,
    pooling: tuple[str, ...] = HEAD_POOLINGS,
    swapped_captions: str = "none",
) -> HeadFit:
    """Fits a [`PresenceHead`] on the components DAG forms on annotated training `images`.

    The images are noised to each guided timestep as calibration does (`calibration.guided_passes`). At each step
    DAG's `Â` (from the running mean of the rows' presence evidence, as under `detection="presence"`) forms the
    unsafe components, and each component contributes its feature pooled over its pixels by `pooling`
    ([`component_features`]), the features smoothed over the steps as under `detection="head"`, labelled positive
    when the image is unsafe and the component overlaps its mask. The fit, on standardised features (the
    standardisation folded into the head): [`fit_logistic`] (`hidden=0`, L2 1e-2) or [`fit_mlp`] with `hidden`
    units.

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled on one embedding, capturing (at least) the
            head's `layers`; its thresholds and `presence_smoothing` are used.
        images (`list[AnnotatedImage]`): training images, unsafe ones with a mask and safe ones (look-alikes of
            the concept above all).
        layers (`tuple[str, ...]`): the layers the head reads, processor names (`CrossAttentionCapture.layers`).
        hidden (`int`): hidden units; 0 for a linear head.
        pooling (`tuple[str, ...]`): the statistics of a component's features the head reads ([`HEAD_POOLINGS`];
            default all three: on the mini model the mean alone guides fewer red-star generations at the same
            false-detection rate, `benchmarks/RESULTS.md`).
        swapped_captions (`str`): `"unsafe"` also fits on each unsafe image under a safe image's caption (the
            concept drawn where the prompt does not name it), `"all"` on every image under a caption of the other
            class ([`swap_captions`], drawn with `seed`), so that the head reads the image rather than the
            caption's words; `"none"` (default) fits on the images' own captions only.

    Raises:
        `ValueError`: DAG is not enabled on one embedding or does not capture `layers`; no safe or no unsafe
            image; or no component formed, or none on an unsafe image's mask (nothing to learn from).
    """
    from .calibration import guided_passes  # calibration scores heads: imported here, not at the top

    state = pipe._dag
    if state is None or len(state.keys) != 1:
        raise ValueError("Fitting a presence head needs DAG enabled on one guideline embedding.")
    missing = sorted(set(layers) - set(state.capture.layers))
    if not layers or missing:
        raise ValueError(f"DAG does not capture the head's layers {missing or '(none given)'}; enable it on them.")
    if hidden < 0:
        raise ValueError(f"`hidden` must be >= 0 (0: a linear head), got {hidden}.")
    if swapped_captions not in HEAD_CAPTION_SWAPS:
        raise ValueError(f"`swapped_captions` must be one of {HEAD_CAPTION_SWAPS}, got {swapped_captions!r}.")
    unsafe = np.array([item.unsafe for item in images])
    if unsafe.all() or not unsafe.any():
        raise ValueError(
            "Fitting a presence head needs safe images (no mask) and unsafe images (with a mask); got"
            f" {int(unsafe.sum())} unsafe and {int((~unsafe).sum())} safe."
        )
    fitted = list(images)
    if swapped_captions != "none":
        swapped = swap_captions(images, seed)
        fitted += [item for item in swapped if swapped_captions == "all" or item.unsafe]
    unsafe = np.array([item.unsafe for item in fitted])
    config = state.config
    beta = config.presence_smoothing
    pooling = tuple(pooling)
    # reads the features, and checks the pooling before the passes rather than after them
    reader = PresenceHead({name: torch.zeros(len(pooling)) for name in layers}, 0.0, pooling=pooling)
    widths = [state.capture.attention_modules()[name].query_dim for name in sorted(layers)]
    rows, labels, smoothed, smoothed_features = [], [], {}, {}
    for start, masks, step, latent_size in guided_passes(
        pipe, fitted, num_inference_steps, seed, batch_size, progress
    ):
        shares = state.shares(latent_size, concept_presence)[0]  # (B, h, w) of the one concept
        features = reader.features(state.capture.store.queries, latent_size).cpu()  # (B, h·w, ΣC)
        if step > 0:
            shares = beta * smoothed[start] + (1 - beta) * shares
            features = beta * smoothed_features[start] + (1 - beta) * features
        smoothed[start], smoothed_features[start] = shares, features
        for offset, (dag_map, mask) in enumerate(zip(minmax_normalize(shares).numpy(), masks.numpy())):
            labelled, count = unsafe_components(
                dag_map,
                config.unsafe_threshold,
                config.edit_mask_threshold,
                config.max_edit_area,
                config.components,
                config.basin_floor,
            )
            if count == 0:
                continue
            rows.append(component_features(features[offset], labelled, count, pooling, tuple(widths)))
            on_mask = np.bincount(labelled[mask], minlength=count + 1)[1:] > 0
            labels.append(torch.from_numpy(on_mask & bool(unsafe[start + offset])))
    if not rows or not torch.cat(labels).any():
        raise ValueError(
            "No unsafe component formed on the training images' masks, so the head has nothing to learn: check the"
            " embedding detects the concept (`dag-safety generate --save-maps`) and the edit threshold"
            " (`--edit-mask-threshold auto`)."
        )
    features, targets = torch.cat(rows), torch.cat(labels).float()
    mean, std = features.mean(dim=0), features.std(dim=0) + 1e-6
    standardised = (features - mean) / std
    widths = [len(pooling) * width for width in widths]
    # fold the standardisation into the first layer: W·(x - μ)/σ + c = (W/σ)·x + (c - (W/σ)·μ)
    if hidden == 0:
        weight, bias = fit_logistic(standardised, targets)
        folded = weight / std
        head = PresenceHead(
            dict(zip(sorted(layers), folded.split(widths))), float(bias - (folded * mean).sum()), pooling=pooling
        )
    else:
        net = fit_mlp(standardised, targets, hidden)
        first = net[0].weight.detach() / std
        head = PresenceHead(
            dict(zip(sorted(layers), first.split(widths, dim=1))),
            float(net[2].bias.detach()),
            hidden_bias=net[0].bias.detach() - first @ mean,
            output=net[2].weight.detach()[0],
            pooling=pooling,
        )
    scores = head.component_logits(features).numpy()
    return HeadFit(
        head=head,
        components=len(targets),
        positives=int(targets.sum()),
        images=len(images),
        train_auc=roc_auc(scores, targets.numpy().astype(bool)),
        swapped_captions=swapped_captions,
    )
