"""An independent reference of Detect-and-Guide, written from `../shared/spec/DAG.md` (sections 1–3) and the paper
(Table 1, Algorithm 1), for the tests: it calls none of `dag_safety`'s functions.

It runs its own denoising loop with one UNet call per branch (`e_u`, `e_p`, `e_s`), captures the inputs of the
conditional branch's cross-attention layers with forward pre-hooks, and computes every quantity of a DAG step
with plain loops where the package vectorises: the guideline-token map `Â`, the 8-connected components (a flood
fill), the nearest-component fill of the edit band (brute force over pixels), AreaScaler, MagnitudeScaler, the
SEGA / SLD base mask and the masked momentum. The pipeline batches the branches and uses scipy, so the two agree
to float rounding, not bit for bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ReferenceStep:
    """What the reference computed at one step (numpy arrays of one image, `(h, w)` or `(C, h, w)`)."""

    dag_map: np.ndarray | None = None
    unsafe: np.ndarray | None = None
    edit: np.ndarray | None = None
    scale: np.ndarray | None = None  # S_dag
    base_mask: np.ndarray | None = None
    momentum: np.ndarray | None = None  # v after the step's update
    guided: bool = False
    ties: int = 0  # see `area_scale`
    capped: int = 0  # guided pixels whose prediction the norm cap shortened


@dataclass
class ReferenceRun:
    latents: torch.Tensor
    steps: list[ReferenceStep] = field(default_factory=list)

    @property
    def unsafe_detected(self) -> bool:
        return any(step.guided for step in self.steps)


def encode(pipe, text: str) -> torch.Tensor:
    """The text encoder's last hidden state for `text`, padded to the tokenizer's length, `(1, L, D)`."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def components_of(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean `(h, w)` mask by flood fill: 0 background, 1..n components."""
    labels = np.zeros(mask.shape, dtype=int)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        stack = [start]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels


def area_scale(
    dag_map: np.ndarray,
    tau_u: float,
    tau_e: float,
    base_scale: float,
    max_edit_area: float,
    presence: np.ndarray | None = None,
    presence_threshold: float = 0.0,
    fill_decay: float | None = None,
    fill_region: str = "nearest",
) -> tuple[np.ndarray, int]:
    """AreaScaler (Algorithm 1) with the nearest-component fill of the edit band (spec section 3).

    With `presence` (spec 2b's selective rule): a component whose mean presence is below `presence_threshold` has
    scale 0, and so has the band nearest to it.

    With `fill_decay` `λ` (the product's decaying fill): a band pixel at distance `d` from its nearest component,
    of `n` pixels, takes that component's scale times `exp(-d / (λ sqrt(n / π)))`.

    With `fill_region="basin"` (the product's basin fill): a band pixel climbs to its highest 8-neighbour while
    that one is higher and takes the scale of the first component it reaches, 0 if it reaches a local maximum
    first; `d` is then its distance to that component.

    Returns:
        `S_area` `(h, w)` and the number of edit-band pixels equally near two components of different areas (or,
        for the basin fill, whose climb meets two equally high neighbours): the spec leaves their scale open (this
        takes the larger, or the first neighbour), so a test must not depend on them.
    """
    height, width = dag_map.shape
    edit = dag_map >= tau_e
    if edit.mean() >= max_edit_area:
        return np.zeros_like(dag_map), 0
    labels = components_of(dag_map >= tau_u)
    if labels.max() == 0:
        return np.zeros_like(dag_map), 0
    unit = base_scale / (height * width)
    per_label = {label: unit * (labels == label).sum() for label in range(1, labels.max() + 1)}
    if presence is not None:
        for label in per_label:
            if presence[labels == label].mean() < presence_threshold:
                per_label[label] = 0.0
    scale, ties = np.zeros_like(dag_map), 0
    unsafe_pixels = list(zip(*np.nonzero(labels)))
    for y in range(height):
        for x in range(width):
            if labels[y, x]:
                scale[y, x] = per_label[labels[y, x]]
            elif edit[y, x] and fill_region == "basin":
                label, tied = climb(dag_map, labels, y, x)
                ties += tied
                if label:
                    scale[y, x] = per_label[label]
                    if fill_decay is not None:
                        own = [p for p in unsafe_pixels if labels[p] == label]
                        distance = min(math.sqrt((p[0] - y) ** 2 + (p[1] - x) ** 2) for p in own)
                        scale[y, x] *= math.exp(-distance / (fill_decay * math.sqrt(len(own) / math.pi)))
            elif edit[y, x]:
                distances = [(p[0] - y) ** 2 + (p[1] - x) ** 2 for p in unsafe_pixels]
                nearest = {labels[p] for p, d in zip(unsafe_pixels, distances) if d == min(distances)}
                decay = {label: 1.0 for label in nearest}
                if fill_decay is not None:
                    for label in nearest:
                        radius = math.sqrt((labels == label).sum() / math.pi)
                        decay[label] = math.exp(-math.sqrt(min(distances)) / (fill_decay * radius))
                fills = {per_label[label] * decay[label] for label in nearest}
                ties += len(fills) > 1
                scale[y, x] = max(fills)
    return scale, ties


def climb(dag_map: np.ndarray, labels: np.ndarray, y: int, x: int) -> tuple[int, bool]:
    """From `(y, x)`, step to the highest 8-neighbour while it is higher: `(label of the first component pixel
    reached or 0 at a local maximum, whether a step met two equally high neighbours)`."""
    tied = False
    while not labels[y, x]:
        around = [
            (dag_map[y + dy, x + dx], (y + dy, x + dx))
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy, dx) != (0, 0) and 0 <= y + dy < dag_map.shape[0] and 0 <= x + dx < dag_map.shape[1]
        ]
        best = max(value for value, _ in around)
        if best <= dag_map[y, x]:
            return 0, tied
        highest = [p for value, p in around if value == best]
        tied |= len(highest) > 1
        y, x = highest[0]
    return int(labels[y, x]), tied


def basin_components_reference(dag_map: np.ndarray, relative: float, floor: float) -> tuple[np.ndarray, int]:
    """The product's basin components (`DAGConfig.components="basin"`): the peaks are the 8-connected plateaus of
    pixels no 8-neighbour exceeds, at or above `floor` (flood fill); every pixel climbs ([`climb`]) to its peak, and
    a basin keeps its pixels at or above `relative` times its peak. Returns `(labels (h, w), count)`."""
    height, width = dag_map.shape
    local_max = np.zeros(dag_map.shape, dtype=bool)
    for y in range(height):
        for x in range(width):
            around = [
                dag_map[y + dy, x + dx]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if 0 <= y + dy < height and 0 <= x + dx < width
            ]
            local_max[y, x] = dag_map[y, x] >= max(around) and dag_map[y, x] >= floor
    peaks = components_of(local_max)
    labels = np.zeros(dag_map.shape, dtype=int)
    for y in range(height):
        for x in range(width):
            label, _ = climb(dag_map, peaks, y, x)
            if label and dag_map[y, x] >= relative * dag_map[peaks == label].max():
                labels[y, x] = label
    return labels, int(peaks.max())


def guideline_map(pipe, captured: dict[str, torch.Tensor], embedding: torch.Tensor, fractions, latent_size):
    """`Â` `(h, w)`: per selected layer, softmax of the layer's queries over the `1+K` guideline keys, averaged over
    heads, upsampled bilinearly, averaged over layers; the concept rows meaned; min-max normalised (a constant
    map is all zeros)."""
    height, width = latent_size
    total, layers = 0.0, 0
    for name, hidden in captured.items():
        attn = pipe.unet.get_submodule(name)
        side = round(math.sqrt(hidden.shape[1] * height / width))
        size = (side, hidden.shape[1] // side)
        if not any(abs(size[0] - f * height) < 1e-6 for f in fractions):
            continue
        heads = attn.heads
        query = attn.to_q(hidden[0])  # (N, inner)
        key = attn.to_k(embedding.to(query.dtype))  # (1+K, inner)
        head_dim = query.shape[-1] // heads
        probs = 0.0
        for head in range(heads):
            q = query[:, head * head_dim : (head + 1) * head_dim]
            k = key[:, head * head_dim : (head + 1) * head_dim]
            probs = probs + torch.softmax(q @ k.T / math.sqrt(head_dim), dim=-1)
        probs = (probs / heads).T.reshape(1, -1, *size)  # (1, 1+K, h_l, w_l)
        total = total + F.interpolate(probs, size=latent_size, mode="bilinear", align_corners=False)
        layers += 1
    assert layers, "no layer at these fractions"
    share = (total / layers)[0, 1:].mean(dim=0).double().numpy()
    low, high = share.min(), share.max()
    if high - low <= 1e-5 * max(abs(low), abs(high)):
        return np.zeros_like(share)
    return (share - low) / (high - low)


@torch.no_grad()
def reference_dag(
    pipe,
    prompt: str,
    embedding: torch.Tensor,
    *,
    base: str,
    num_inference_steps: int,
    seed: int,
    negative_prompt: str = "",
    safety_concept: str = "a red star",
    guidance_scale: float = 7.5,
    warmup_steps: int = 5,
    unsafe_threshold: float = 0.5,
    edit_mask_threshold: float = 0.01,
    base_scale: float = 5.0,
    max_magnitude: float = 5.0,
    max_edit_area: float = 0.8,
    fill_decay: float | None = None,
    fill_region: str = "nearest",
    norm_cap: float | None = None,
    erase_mode: str = "guidance",
    layer_fractions=(0.25, 0.5),
    edit_threshold: float = 0.9,
    momentum_scale: float = 0.1,
    mom_beta: float = 0.4,
    sld_threshold: float = 0.01,
) -> ReferenceRun:
    """DAG + SEGA (`base="sega"`) or DAG + SLD (`base="sld"`) for one image, from the spec's formulas:

    `e = e_u + s_g ((e_p − e_u) − g)`, `g = S_dag ⊙ M_base ⊙ (e_s − e_u) + momentum_scale · 1[S_dag > 0] · v`,
    `v ← β v + (1 − β) g`, nothing but classifier-free guidance during the warm-up (the momentum starting at the
    first guided step), `S_dag = S_area ⊙ clip(Â / τ_e, 1, max_magnitude) ⊙ 1[Â ≥ τ_e]`.

    `erase_mode="fill"` (ε-prediction schedulers only): at the pixels of `S_dag > 0`, the classifier-free `ε` is
    replaced by the one whose `x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)` is the mean `x̂_0` of the nearest pixels
    outside them (brute force over every pixel).
    """
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    uncond, cond, safe = (encode(pipe, text) for text in (negative_prompt, prompt, safety_concept))
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    latent_size = tuple(shape[-2:])
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: captured.__setitem__(name, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for name, module in pipe.unet.named_modules()
        if name.endswith("attn2")
    ]  # fmt: skip
    run = ReferenceRun(latents=latents)
    momentum = torch.zeros_like(latents)
    try:
        for i, t in enumerate(scheduler.timesteps):
            e_u = pipe.unet(latents, t, encoder_hidden_states=uncond).sample
            captured.clear()
            e_p = pipe.unet(latents, t, encoder_hidden_states=cond).sample
            conditional = dict(captured)
            e_s = pipe.unet(latents, t, encoder_hidden_states=safe).sample
            step = ReferenceStep()
            if i < warmup_steps:
                noise = e_u + guidance_scale * (e_p - e_u)
            else:
                dag_map = guideline_map(pipe, conditional, embedding, layer_fractions, latent_size)
                magnitude = np.clip(dag_map / edit_mask_threshold, 1, max_magnitude) * (dag_map >= edit_mask_threshold)
                area, ties = area_scale(
                    dag_map, unsafe_threshold, edit_mask_threshold, base_scale, max_edit_area,
                    fill_decay=fill_decay, fill_region=fill_region,
                )  # fmt: skip
                scale = area * magnitude
                direction = (e_s - e_u)[0].double().numpy()
                if base == "sega":
                    flat = np.abs(direction).reshape(direction.shape[0], -1)
                    quantiles = np.quantile(flat, edit_threshold, axis=1)
                    base_mask = np.abs(direction) >= quantiles[:, None, None]
                else:
                    base_mask = (e_p - e_s)[0].double().numpy() < sld_threshold
                v = momentum[0].double().numpy()
                g = scale[None] * base_mask * direction + momentum_scale * (scale > 0)[None] * v
                v = mom_beta * v + (1 - mom_beta) * g
                momentum = torch.from_numpy(v)[None].to(latents.dtype)
                noise = e_u + guidance_scale * ((e_p - e_u) - torch.from_numpy(g)[None].to(e_u.dtype))
                step_capped = 0
                if norm_cap is not None:  # each guided pixel's channel vector, shortened to the cap if longer
                    unguided = (e_u + guidance_scale * (e_p - e_u))[0].double().numpy()
                    guided = noise[0].double().numpy()
                    for y, x in zip(*np.nonzero(scale > 0)):
                        limit = norm_cap * np.linalg.norm(unguided[:, y, x])
                        length = np.linalg.norm(guided[:, y, x])
                        if length > limit:
                            guided[:, y, x] *= limit / length
                            step_capped += 1
                    noise = torch.from_numpy(guided)[None].to(e_u.dtype)
                if erase_mode == "fill" and (scale > 0).any():
                    assert scheduler.config.prediction_type == "epsilon"
                    alpha = float(scheduler.alphas_cumprod[int(t)])
                    x_t = latents[0].double().numpy()
                    eps = (e_u + guidance_scale * (e_p - e_u))[0].double().numpy()
                    clean = (x_t - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
                    outside = np.argwhere(scale <= 0)
                    for y, x in np.argwhere(scale > 0):
                        distance = ((outside - (y, x)) ** 2).sum(axis=1)
                        ties = outside[distance == distance.min()]
                        x0 = clean[:, ties[:, 0], ties[:, 1]].mean(axis=1)
                        eps[:, y, x] = (x_t[:, y, x] - math.sqrt(alpha) * x0) / math.sqrt(1 - alpha)
                    noise = torch.from_numpy(eps)[None].to(e_u.dtype)
                step = ReferenceStep(dag_map, dag_map >= unsafe_threshold, dag_map >= edit_mask_threshold, scale, base_mask,
                                     v, bool((scale > 0).any()), ties, step_capped)  # fmt: skip
            run.steps.append(step)
            latents = scheduler.step(noise, t, latents).prev_sample
    finally:
        for hook in hooks:
            hook.remove()
    run.latents = latents
    return run
