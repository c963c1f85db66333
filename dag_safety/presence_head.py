"""A linear presence head on the components DAG forms (`detection="head"`, README "Beyond the paper").

The guideline rows find *where* a concept may be; on a model whose attention does not separate the concept from
its look-alikes (the mini model's red star from a red circle or a blue star), they cannot say *whether* it is
there. The cross-attention layers' inputs can, once read over a whole object: `benchmarks/probe.py` finds a linear
read-out of them averaged over an object separates what a per-pixel one cannot. The head is that read-out, applied
to the components DAG itself forms:

    logit(p) = b + Σ_l w_l · U_l(h_l)(p)        score(component) = σ(mean of logit over the component)

with `h_l` the captured input `(h_l·w_l, C_l)` of layer `l` and `U_l` the bilinear upsampling to the latent size.
A linear map commutes with the mean and the upsampling, so a component's score is the head applied to the mean
feature over the component, which is what it is fitted on ([`fit_presence_head`]): the components DAG forms on
annotated training images along the guided steps, labelled by whether they overlap an unsafe image's mask.
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
    "HEAD_PREFIX",
    "HeadFit",
    "PresenceHead",
    "fit_logistic",
    "fit_presence_head",
    "roc_auc",
]

HEAD_PREFIX = "presence_head."
HEAD_BIAS = HEAD_PREFIX + "bias"


@dataclass(frozen=True)
class PresenceHead:
    """A linear read-out of cross-attention layer inputs, scoring DAG's components.

    Attributes:
        weights (`dict[str, torch.Tensor]`): per layer (processor name, as `CrossAttentionCapture.layers`), `(C_l,)`
            float32 weights on the layer's input channels.
        bias (`float`): the logit of a component whose features are all zero.
    """

    weights: dict[str, torch.Tensor]
    bias: float

    def __post_init__(self):
        if not self.weights:
            raise ValueError("A presence head needs the weights of at least one layer.")
        for name, weight in self.weights.items():
            if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or not torch.isfinite(weight).all():
                raise ValueError(f"The presence head's weights for {name!r} must be a finite (C,) tensor.")
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
            if widths[name] != weight.shape[0]:
                raise ValueError(
                    f"{source} has {weight.shape[0]} weights for {name!r}, whose input width here is"
                    f" {widths[name]}: it was fitted on another model. Fit a head for this model."
                )

    def logits(self, queries: dict[str, CapturedQuery], latent_size: tuple[int, int]) -> torch.Tensor:
        """The per-pixel logit map from one UNet call's captured inputs (which must include the head's layers).

        Args:
            queries (`dict[str, CapturedQuery]`): captured inputs `(B, h_l·w_l, C_l)` by processor name.
            latent_size (`tuple[int, int]`): `(h, w)` of the latent.

        Returns:
            `torch.Tensor`: `(B, h, w)` float32, on the inputs' device.
        """
        total = None
        for name in self.layers:
            captured = queries[name]
            hidden = captured.hidden_states
            weight = self.weights[name].to(device=hidden.device, dtype=torch.float32)
            layer = hidden.float() @ weight  # (B, N)
            height, width = layer_spatial_size(captured, latent_size)
            layer = layer.view(-1, 1, height, width)
            if (height, width) != tuple(latent_size):
                layer = F.interpolate(layer, size=latent_size, mode="bilinear", align_corners=False)
            total = layer if total is None else total + layer
        return total[:, 0] + self.bias

    def features(self, queries: dict[str, CapturedQuery], latent_size: tuple[int, int], index: int) -> torch.Tensor:
        """Image `index`'s features at the latent size, the head's layers concatenated in [`layers`] order:
        `(h·w, ΣC_l)` float32 (`logits` is `features @ concat(weights) + bias`)."""
        parts = []
        for name in self.layers:
            captured = queries[name]
            height, width = layer_spatial_size(captured, latent_size)
            layer = captured.hidden_states[index].float().T.reshape(1, -1, height, width)
            if (height, width) != tuple(latent_size):
                layer = F.interpolate(layer, size=latent_size, mode="bilinear", align_corners=False)
            parts.append(layer[0].flatten(1).T)
        return torch.cat(parts, dim=1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors entries: `presence_head.<layer>` `(C_l,)` and `presence_head.bias` `(1,)`."""
        tensors = {HEAD_PREFIX + name: weight.contiguous() for name, weight in self.weights.items()}
        tensors[HEAD_BIAS] = torch.tensor([self.bias], dtype=torch.float32)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], source: str) -> PresenceHead | None:
        """The head in a safetensors file's entries ([`to_tensors`]' form), `None` if it holds none.

        Raises:
            `ValueError`: head entries without a bias, a bias that is not one number, or weights that are not
                finite `(C,)` vectors; the message names `source`.
        """
        entries = {name: value for name, value in tensors.items() if name.startswith(HEAD_PREFIX)}
        if not entries:
            return None
        bias = entries.pop(HEAD_BIAS, None)
        if bias is None or bias.numel() != 1 or not entries:
            raise ValueError(
                f"{source}: its presence head is incomplete (it needs {HEAD_BIAS!r} holding one number and at"
                " least one layer's weights). The file is damaged; re-save or re-download the embedding."
            )
        try:
            return cls(
                {name.removeprefix(HEAD_PREFIX): value.float() for name, value in entries.items()},
                float(bias.reshape(())),
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error} The file is damaged; re-save or re-download it.") from None


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


@torch.no_grad()
def fit_presence_head(
    pipe,
    images: list,
    layers: tuple[str, ...],
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 16,
    l2: float = 1e-2,
    progress: bool = True,
) -> HeadFit:
    """Fits a [`PresenceHead`] on the components DAG forms on annotated training `images`.

    The images are noised to each guided timestep as calibration does (`calibration.guided_passes`); at each step
    DAG's `Â` (from the running mean of the rows' presence evidence, as under `detection="presence"`) forms the
    unsafe components, and each component contributes its mean feature over its pixels, labelled positive when
    the image is unsafe and the component overlaps its mask. The fit is [`fit_logistic`] on standardised features.

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled on one embedding, capturing (at least) the
            head's `layers`; its thresholds and `presence_smoothing` are used.
        images (`list[AnnotatedImage]`): training images, unsafe ones with a mask and safe ones (look-alikes of
            the concept above all).
        layers (`tuple[str, ...]`): the layers the head reads, processor names (`CrossAttentionCapture.layers`).
        l2 (`float`): ridge penalty of the fit.

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
    unsafe = np.array([item.unsafe for item in images])
    if unsafe.all() or not unsafe.any():
        raise ValueError(
            "Fitting a presence head needs safe images (no mask) and unsafe images (with a mask); got"
            f" {int(unsafe.sum())} unsafe and {int((~unsafe).sum())} safe."
        )
    config = state.config
    probe = PresenceHead({name: torch.zeros(1) for name in layers}, 0.0)
    rows, labels, smoothed = [], [], {}
    for start, masks, step, latent_size in guided_passes(
        pipe, images, num_inference_steps, seed, batch_size, progress
    ):
        shares = state.shares(latent_size, concept_presence)[0]  # (B, h, w) of the one concept
        if step > 0:
            shares = config.presence_smoothing * smoothed[start] + (1 - config.presence_smoothing) * shares
        smoothed[start] = shares
        dag_maps = minmax_normalize(shares).numpy()
        queries = state.capture.store.queries
        for offset, (dag_map, mask) in enumerate(zip(dag_maps, masks.numpy())):
            labelled, count = unsafe_components(
                dag_map, config.unsafe_threshold, config.edit_mask_threshold, config.max_edit_area
            )
            if count == 0:
                continue
            features = probe.features(queries, latent_size, offset)  # (h·w, ΣC)
            flat = torch.from_numpy(labelled.reshape(-1)).long()
            sums = torch.zeros(count + 1, features.shape[1]).index_add_(0, flat, features)
            sizes = torch.bincount(flat, minlength=count + 1).clamp_min(1)[:, None]
            rows.append((sums / sizes)[1:])
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
    weight, bias = fit_logistic((features - mean) / std, targets, l2)
    # fold the standardisation in: w·(x - μ)/σ + b = (w/σ)·x + (b - w·μ/σ)
    folded = weight / std
    folded_bias = float(bias - (folded * mean).sum())
    widths = [state.capture.attention_modules()[name].query_dim for name in sorted(layers)]
    head = PresenceHead(dict(zip(sorted(layers), folded.split(widths))), folded_bias)
    scores = (features @ folded + folded_bias).numpy()
    return HeadFit(
        head=head,
        components=len(targets),
        positives=int(targets.sum()),
        images=len(images),
        train_auc=roc_auc(scores, targets.numpy().astype(bool)),
    )
