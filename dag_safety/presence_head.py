"""A presence head on the components DAG forms (`detection="head"`, README "Beyond the paper").

The guideline rows find *where* a concept may be; on a model whose attention does not separate the concept from
its look-alikes (the mini model's red star from a red circle or a blue star), they cannot say *whether* it is
there. The cross-attention layers' inputs can, once read over a whole object: `benchmarks/probe.py` finds a read-out
of them averaged over an object separates what a per-pixel one cannot. The head is that read-out, applied to the
components DAG itself forms: a component's feature is the mean over its pixels of the chosen layers' inputs
(upsampled to the latent, concatenated, smoothed over the guided steps as DAG's evidence is), and its score the
head's probability on it, linear (`σ(b + w·x)`) or with one hidden layer (`σ(b + v·GELU(Wx + c))`: a conjunction
such as "red *and* star" is no half-space of the features, and a linear head on the mini model leaves most red stars
unguided at a 5 % false-detection rate; `benchmarks/RESULTS.md`). It is fitted ([`fit_presence_head`]) on the
components DAG forms on annotated training images along the guided steps, labelled by whether they overlap an
unsafe image's mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from .attention import CapturedQuery
from .detection import concept_presence, layer_spatial_size, minmax_normalize
from .guidance import unsafe_components

__all__ = [
    "HEAD_BIAS",
    "HEAD_HIDDEN_BIAS",
    "HEAD_OUTPUT",
    "HEAD_PREFIX",
    "HeadFit",
    "PresenceHead",
    "component_means",
    "fit_logistic",
    "fit_mlp",
    "fit_presence_head",
    "roc_auc",
]

HEAD_PREFIX = "presence_head."
HEAD_BIAS = HEAD_PREFIX + "bias"
HEAD_HIDDEN_BIAS = HEAD_PREFIX + "hidden_bias"
HEAD_OUTPUT = HEAD_PREFIX + "output"


@dataclass(frozen=True)
class PresenceHead:
    """A read-out of cross-attention layer inputs that scores DAG's components by their mean feature `x` (the
    head's layers' inputs, upsampled to the latent and concatenated in [`layers`] order).

    Linear (`output is None`): `logit = b + Σ_l w_l · x_l`. With a hidden layer of `H` units:
    `logit = b + v · GELU(Σ_l W_l x_l + c)`, which can read a conjunction ("red" *and* "star") that no half-space
    of the features holds.

    Attributes:
        weights (`dict[str, torch.Tensor]`): per layer (processor name, as `CrossAttentionCapture.layers`), float32
            weights on its input channels: `(C_l,)` for a linear head, `(H, C_l)` with a hidden layer.
        bias (`float`): the output bias `b`.
        hidden_bias (`torch.Tensor`, *optional*): `c`, `(H,)`; with a hidden layer only.
        output (`torch.Tensor`, *optional*): `v`, `(H,)`; with a hidden layer only.
    """

    weights: dict[str, torch.Tensor]
    bias: float
    hidden_bias: torch.Tensor | None = None
    output: torch.Tensor | None = None

    def __post_init__(self):
        if not self.weights:
            raise ValueError("A presence head needs the weights of at least one layer.")
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
            if not shape_ok or not torch.isfinite(weight).all():
                shape = "(H, C) with H its hidden units" if hidden else "(C,)"
                raise ValueError(f"The presence head's weights for {name!r} must be a finite {shape} tensor.")
        if not math.isfinite(self.bias):
            raise ValueError(f"The presence head's bias must be finite, got {self.bias!r}.")

    @property
    def layers(self) -> tuple[str, ...]:
        """The processor names of the layers it reads, sorted."""
        return tuple(sorted(self.weights))

    def check_layers(self, widths: dict[str, int], source: str = "The presence head") -> None:
        """Checks every layer exists in a UNet whose cross-attention layers have input widths `widths` (processor
        name → `attn.query_dim`).

        Raises:
            `ValueError`: a layer is missing or has another width; the message names it.
        """
        for name, weight in self.weights.items():
            if name not in widths:
                raise ValueError(
                    f"{source} reads the layer {name!r}, which this UNet does not have: it was fitted on another"
                    " model. Fit a head for this model (`dag-safety calibrate --presence-head`)."
                )
            if widths[name] != weight.shape[-1]:
                raise ValueError(
                    f"{source} has {weight.shape[-1]} weights for {name!r}, whose input width here is"
                    f" {widths[name]}: it was fitted on another model. Fit a head for this model."
                )

    def component_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits `(n,)` of `n` components from their mean features `(n, ΣC_l)` ([`features`]' channel order)."""
        weight = torch.cat([self.weights[name] for name in self.layers], dim=-1).to(features)
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
    ) -> torch.Tensor:
        """Each unsafe component of `Â` filled with its logit (the head on its mean feature), 0 elsewhere:
        `(B, h, w)` float32 on the CPU. A component's mean over this map is its logit, which is how
        `guidance.area_scaler` reads it (the components found again from the same `Â` and thresholds).

        Args:
            dag_maps (`torch.Tensor`): `Â`, `(B, h, w)`.
            features (`torch.Tensor`): [`features`] (smoothed over the steps, in DAG), `(B, h·w, ΣC_l)`.
        """
        maps = dag_maps.detach().float().cpu().numpy()
        features = features.detach().float().cpu()
        painted = torch.zeros(maps.shape, dtype=torch.float32)
        for index, dag_map in enumerate(maps):
            labels, count = unsafe_components(dag_map, unsafe_threshold, edit_mask_threshold, max_edit_area)
            if count == 0:
                continue
            means = component_means(features[index], labels, count)
            logits = torch.cat([torch.zeros(1), self.component_logits(means)])
            painted[index] = logits[torch.from_numpy(labels).long()]
        return painted

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors entries: `presence_head.<layer>` (`(C_l,)` or `(H, C_l)`), `presence_head.bias` `(1,)`,
        and with a hidden layer `presence_head.hidden_bias` and `presence_head.output` `(H,)`."""
        tensors = {HEAD_PREFIX + name: weight.contiguous() for name, weight in self.weights.items()}
        tensors[HEAD_BIAS] = torch.tensor([self.bias], dtype=torch.float32)
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
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error} The file is damaged; re-save or re-download it.") from None


def component_means(features: torch.Tensor, labels: np.ndarray, count: int) -> torch.Tensor:
    """Mean feature `(count, C)` of each of `count` labelled components (`labels` `(h, w)` from `ndimage.label`) in
    one image's `features` `(h·w, C)`."""
    flat = torch.from_numpy(labels.reshape(-1)).long()
    sums = torch.zeros(count + 1, features.shape[1]).index_add_(0, flat, features)
    sizes = torch.bincount(flat, minlength=count + 1).clamp_min(1)[:, None]
    return (sums / sizes)[1:]


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
        train_auc (`float`): ROC AUC of the head's component scores on its own training components.
    """

    head: PresenceHead
    components: int
    positives: int
    images: int
    train_auc: float

    def as_metadata(self) -> dict:
        """The summary stored in the embedding's `calibration` metadata (`presence_head`)."""
        return {
            "layers": list(self.head.layers),
            "hidden_units": 0 if self.head.output is None else int(self.head.output.shape[0]),
            "training_images": self.images,
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
) -> HeadFit:
    """Fits a [`PresenceHead`] on the components DAG forms on annotated training `images`.

    The images are noised to each guided timestep as calibration does (`calibration.guided_passes`). At each step
    DAG's `Â` (from the running mean of the rows' presence evidence, as under `detection="presence"`) forms the
    unsafe components, and each component contributes its mean feature over its pixels, the features smoothed
    over the steps as under `detection="head"`, labelled positive when the image is unsafe and the component
    overlaps its mask. The fit, on standardised features (the standardisation folded into the head): [`fit_logistic`]
    (`hidden=0`, L2 1e-2) or [`fit_mlp`] with `hidden` units.

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled on one embedding, capturing (at least) the
            head's `layers`; its thresholds and `presence_smoothing` are used.
        images (`list[AnnotatedImage]`): training images, unsafe ones with a mask and safe ones (look-alikes of
            the concept above all).
        layers (`tuple[str, ...]`): the layers the head reads, processor names (`CrossAttentionCapture.layers`).
        hidden (`int`): hidden units; 0 for a linear head.

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
    unsafe = np.array([item.unsafe for item in images])
    if unsafe.all() or not unsafe.any():
        raise ValueError(
            "Fitting a presence head needs safe images (no mask) and unsafe images (with a mask); got"
            f" {int(unsafe.sum())} unsafe and {int((~unsafe).sum())} safe."
        )
    config = state.config
    beta = config.presence_smoothing
    reader = PresenceHead({name: torch.zeros(1) for name in layers}, 0.0)
    rows, labels, smoothed, smoothed_features = [], [], {}, {}
    for start, masks, step, latent_size in guided_passes(
        pipe, images, num_inference_steps, seed, batch_size, progress
    ):
        shares = state.shares(latent_size, concept_presence)[0]  # (B, h, w) of the one concept
        features = reader.features(state.capture.store.queries, latent_size).cpu()  # (B, h·w, ΣC)
        if step > 0:
            shares = beta * smoothed[start] + (1 - beta) * shares
            features = beta * smoothed_features[start] + (1 - beta) * features
        smoothed[start], smoothed_features[start] = shares, features
        for offset, (dag_map, mask) in enumerate(zip(minmax_normalize(shares).numpy(), masks.numpy())):
            labelled, count = unsafe_components(
                dag_map, config.unsafe_threshold, config.edit_mask_threshold, config.max_edit_area
            )
            if count == 0:
                continue
            rows.append(component_means(features[offset], labelled, count))
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
    widths = [state.capture.attention_modules()[name].query_dim for name in sorted(layers)]
    # fold the standardisation into the first layer: W·(x - μ)/σ + c = (W/σ)·x + (c - (W/σ)·μ)
    if hidden == 0:
        weight, bias = fit_logistic(standardised, targets)
        folded = weight / std
        head = PresenceHead(dict(zip(sorted(layers), folded.split(widths))), float(bias - (folded * mean).sum()))
    else:
        net = fit_mlp(standardised, targets, hidden)
        first = net[0].weight.detach() / std
        head = PresenceHead(
            dict(zip(sorted(layers), first.split(widths, dim=1))),
            float(net[2].bias.detach()),
            hidden_bias=net[0].bias.detach() - first @ mean,
            output=net[2].weight.detach()[0],
        )
    scores = head.component_logits(features).numpy()
    return HeadFit(
        head=head,
        components=len(targets),
        positives=int(targets.sum()),
        images=len(images),
        train_auc=roc_auc(scores, targets.numpy().astype(bool)),
    )
