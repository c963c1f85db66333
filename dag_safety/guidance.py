"""Safety guidance math: SLD, SEGA and DAG's scale map, as pure tensor functions.

All noise predictions are `(B, C, h, w)` latent tensors: `noise_pred_uncond` (`e_u`, empty or negative
prompt), `noise_pred_text` (`e_p`, the user's prompt) and `noise_pred_safety` (`e_s`, the safety concept).
Each `*_noise_pred` function returns the guided noise prediction and the updated momentum; the caller keeps
the momentum between steps (it starts as `None`, read as zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .config import COMPONENT_RULES, FILL_REGIONS, DAGConfig, SEGAConfig, SLDConfig

__all__ = [
    "DAGScaleMap",
    "area_scaler",
    "ascent_owners",
    "basin_components",
    "component_mask",
    "component_presence",
    "dag_noise_pred",
    "dag_scale_map",
    "find_components",
    "logit",
    "magnitude_scaler",
    "peak_presence",
    "sega_noise_pred",
    "sld_noise_pred",
    "unsafe_components",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# per image of a batch, `unsafe_components`' `(labels (h, w) int, count)`
Components = list[tuple[np.ndarray, int]]


def sld_noise_pred(
    noise_pred_uncond: torch.Tensor,
    noise_pred_text: torch.Tensor,
    noise_pred_safety: torch.Tensor,
    guidance_scale: float,
    momentum: torch.Tensor | None,
    step_index: int,
    config: SLDConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Latent Diffusion, in the order of operations of diffusers' `StableDiffusionPipelineSafe`.

    `e = e_u + s_g * ((e_p - e_u) - g)` with `g = S ⊙ M ⊙ (e_s - e_u) + sld_momentum_scale * v`,
    `S = clamp(|e_p - e_s| * sld_guidance_scale, max=1)`, `M = 1[e_p - e_s < sld_threshold]`; the momentum
    `v <- beta * v + (1 - beta) * g` is updated every step, `g` is applied from `sld_warmup_steps` on.

    Returns:
        `(noise_pred, momentum)`, both `(B, C, h, w)`.
    """
    noise_guidance = noise_pred_text - noise_pred_uncond
    if momentum is None:
        momentum = torch.zeros_like(noise_guidance)
    difference = noise_pred_text - noise_pred_safety
    scale = torch.clamp(torch.abs(difference) * config.sld_guidance_scale, max=1.0)
    scale = torch.where(difference >= config.sld_threshold, torch.zeros_like(scale), scale)
    safety = torch.mul(noise_pred_safety - noise_pred_uncond, scale)
    safety = safety + config.sld_momentum_scale * momentum
    momentum = config.sld_mom_beta * momentum + (1 - config.sld_mom_beta) * safety
    if step_index >= config.sld_warmup_steps:
        noise_guidance = noise_guidance - safety
    return noise_pred_uncond + guidance_scale * noise_guidance, momentum


def _percentile_mask(direction: torch.Tensor, percentile: float) -> torch.Tensor:
    """`1[|direction| >= quantile(|direction|, percentile)]`, the quantile taken over `h×w` per `(B, C)`."""
    magnitude = torch.abs(direction)
    # torch.quantile needs float32 or float64
    quantile = torch.quantile(magnitude.flatten(start_dim=2).float(), percentile, dim=2).to(magnitude.dtype)
    return magnitude >= quantile[:, :, None, None]


def sega_noise_pred(
    noise_pred_uncond: torch.Tensor,
    noise_pred_text: torch.Tensor,
    noise_preds_safety: list[torch.Tensor],
    guidance_scale: float,
    momentum: torch.Tensor | None,
    step_index: int,
    config: SEGAConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic guidance away from one or more safety concepts (`reverse_editing_direction=True`).

    Per concept `g_c = -(e_s_c - e_u) * edit_guidance_scale`, kept where `|g_c|` reaches its `edit_threshold`
    quantile over `h×w` (per image and channel); `g = Σ_c g_c + edit_momentum_scale * v`,
    `v <- beta * v + (1 - beta) * g` every step, and `e = e_u + s_g * (e_p - e_u) + g` from
    `edit_warmup_steps` on. Matches `SemanticStableDiffusionPipeline` with one warm-up for all concepts.

    Returns:
        `(noise_pred, momentum)`, both `(B, C, h, w)`.
    """
    noise_guidance = guidance_scale * (noise_pred_text - noise_pred_uncond)
    if momentum is None:
        momentum = torch.zeros_like(noise_guidance)
    edit = torch.zeros_like(noise_guidance)
    for noise_pred_safety in noise_preds_safety:
        direction = (noise_pred_safety - noise_pred_uncond) * -1 * config.edit_guidance_scale
        edit = edit + torch.where(
            _percentile_mask(direction, config.edit_threshold), direction, torch.zeros_like(direction)
        )
    edit = edit + config.edit_momentum_scale * momentum
    momentum = config.edit_mom_beta * momentum + (1 - config.edit_mom_beta) * edit
    if step_index >= config.edit_warmup_steps:
        noise_guidance = noise_guidance + edit
    return noise_pred_uncond + noise_guidance, momentum


def area_scaler(
    dag_map: torch.Tensor,
    unsafe_threshold: float = 0.5,
    edit_mask_threshold: float = 0.01,
    base_scale: float = 5.0,
    max_edit_area: float = 0.8,
    presence: torch.Tensor | None = None,
    presence_threshold: float = 0.0,
    fill_decay: float | None = None,
    held: torch.Tensor | None = None,
    fill_region: str = "nearest",
    hold_region: str = "component",
    components: str = "threshold",
    basin_floor: float = 0.25,
    found: Components | None = None,
) -> torch.Tensor:
    """DAG's AreaScaler (paper Algorithm 1): a per-pixel scale from the area of each detected component.

    Components are the 8-connected regions of `M_unsafe = 1[Â >= unsafe_threshold]`; component `i` gets
    `s̄ · area_i` with `s̄ = base_scale / (h·w)` (a component covering `1/base_scale` of the latent gets 1.0).
    `SpatialInterpolate` (our choice, the paper gives no formula): every pixel of the edit region
    `M_edit = 1[Â >= edit_mask_threshold]` outside the components takes the scale of its nearest component
    (Euclidean distance transform with nearest-label indices). If `mean(M_edit) >= max_edit_area` no object has
    formed yet ("mode undefined") and the scale is 0; with no component it is 0 as well.

    With `presence` (the selective rule, README "Beyond the paper: selective detection"; `None` is the paper's rule), a component is kept only if the
    mean of `presence` over its pixels reaches `presence_threshold`. A dropped component gets scale 0, and so do
    the edit pixels nearest to it: the region around an object judged absent (a co-object) is not guided. With
    `held` `(B, h, w)` bool as well (`DAGConfig.hold_detection`), a component that overlaps it is kept whatever
    its presence; with `hold_region="pixels"`, such a component (one that would be dropped but for the hold) gets
    its scale on its held pixels alone, and no fill.

    With `fill_decay` `λ` (beyond the paper, README), an edit pixel at distance `d` from its nearest component
    (equivalent radius `r = sqrt(area / π)`) takes that component's scale times `exp(-d / (λ r))` instead of all
    of it; the components' own pixels (`d = 0`) keep theirs.

    With `fill_region="basin"` (beyond the paper, README), an edit pixel takes the scale of the component it
    ascends to ([`ascent_owners`]) instead of the nearest one, and none if it ascends to a peak of `Â` outside the
    components (another object's): the fill stays on the slopes of the detected object and off its neighbours.
    `fill_decay` then measures `d` to that component.

    With `components="basin"` (beyond the paper, README), the components are [`basin_components`] instead: one
    per peak of `Â` reaching `basin_floor`, cut at `unsafe_threshold` times that peak.

    Args:
        dag_map (`torch.Tensor`): `Â`, `(B, h, w)` in `[0, 1]`.
        presence (`torch.Tensor`, *optional*): `(B, h, w)` presence evidence, in the units of
            `presence_threshold`.
        found (*optional*): the components of `dag_map` under the same thresholds and rule, already found
            ([`find_components`]); found here if `None`.

    Returns:
        `torch.Tensor`: `S_area`, `(B, h, w)`, `>= 0`, on the device and dtype of `dag_map`.
    """
    if fill_region not in FILL_REGIONS:
        raise ValueError(f"`fill_region` must be one of {list(FILL_REGIONS)}, got {fill_region!r}.")
    rule = {"components": components, "basin_floor": basin_floor}
    maps = dag_map.detach().float().cpu().numpy()
    evidence = None if presence is None else presence.detach().float().cpu().numpy()
    held = None if held is None else held.detach().cpu().numpy().astype(np.float64)
    _, height, width = maps.shape
    unit = base_scale / (height * width)
    scales = np.zeros_like(maps)
    if found is None:
        found = [unsafe_components(m, unsafe_threshold, edit_mask_threshold, max_edit_area, **rule) for m in maps]
    for index, image_map in enumerate(maps):
        edit_mask = image_map >= edit_mask_threshold
        labels, count = found[index]
        if count == 0:
            continue
        areas = np.bincount(labels.ravel()).astype(np.float32)
        areas[0] = 0.0
        held_scale = None
        if evidence is not None:
            present = component_presence(evidence[index], labels, count) >= presence_threshold
            if held is not None:
                overlaps = np.bincount(labels.ravel(), weights=held[index].ravel(), minlength=count + 1)[1:] > 0
                if hold_region == "component":
                    present |= overlaps
                else:
                    held_only = np.concatenate([[False], overlaps & ~present])
                    held_scale = unit * areas[labels] * (held_only[labels] & (held[index] > 0))
            areas[1:][~present] = 0.0
            if not present.any():
                if held_scale is not None:
                    scales[index] = held_scale
                continue
        unsafe = unit * areas[labels]
        if fill_region == "basin":
            owners = ascent_owners(image_map, labels)
            fill = unit * areas[owners] * edit_mask
            if fill_decay is not None:
                distance = np.zeros_like(image_map)
                for label in np.unique(owners[(owners > 0) & (labels == 0)]):
                    # each pixel's distance to the component it ascends to
                    to_label = ndimage.distance_transform_edt(labels != label)
                    distance = np.where(owners == label, to_label, distance)
                radius = np.sqrt(np.bincount(labels.ravel(), minlength=count + 1) / np.pi)
                fill = fill * np.exp(-distance / (fill_decay * radius[owners]))
        else:
            distance, (rows, cols) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
            fill = unsafe[rows, cols] * edit_mask
            if fill_decay is not None:
                # `areas` may have been zeroed by the gate; a dropped component's fill is 0 whatever its radius
                radius = np.sqrt(np.bincount(labels.ravel(), minlength=count + 1) / np.pi)
                fill = fill * np.exp(-distance / (fill_decay * radius[labels[rows, cols]]))
        scales[index] = np.maximum(unsafe, fill)
        if held_scale is not None:
            scales[index] = np.maximum(scales[index], held_scale)
    return torch.from_numpy(scales).to(device=dag_map.device, dtype=dag_map.dtype)


_NEIGHBOURS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])


def ascent_owners(dag_map: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The component each pixel of one map `Â` `(h, w)` ascends to: `(h, w)` int, a label of `labels` (from
    [`unsafe_components`]) or 0.

    A pixel outside the components steps to its highest 8-neighbour while that neighbour is higher (strictly; of
    equally high neighbours the first in row-major order), and owns the label of the first component pixel it
    reaches, or 0 if it reaches a local maximum of `Â` outside the components first. The pixels of a component
    own its label. So each component owns the slopes that rise to it, and a weaker object's own peak (below
    `τ_u`, or a component the gate dropped) keeps its slopes: they drain to it, not to the detected object.
    """
    height, width = dag_map.shape
    padded = np.pad(dag_map, 1, constant_values=-np.inf)
    neighbours = np.stack([padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in _NEIGHBOURS])
    best = neighbours.argmax(axis=0)
    rows, cols = np.indices((height, width))
    step = (rows + _NEIGHBOURS[best, 0]) * width + cols + _NEIGHBOURS[best, 1]
    moves = (neighbours.max(axis=0) > dag_map) & (labels == 0)
    target = np.where(moves, step, rows * width + cols).ravel()
    # pointer jumping: every pixel's chain ends at a component pixel or a local maximum (Â rises along it)
    while not np.array_equal(jumped := target[target], target):
        target = jumped
    return labels.ravel()[target].reshape(height, width)


def logit(probability: float) -> float:
    """`log(p / (1 - p))` of a probability in `(0, 1)`: a presence head's threshold in the units of its logits."""
    return math.log(probability) - math.log1p(-probability)


def unsafe_components(
    dag_map: np.ndarray,
    unsafe_threshold: float,
    edit_mask_threshold: float,
    max_edit_area: float,
    components: str = "threshold",
    basin_floor: float = 0.25,
) -> tuple[np.ndarray, int]:
    """The unsafe components of one map `Â` `(h, w)`: `(labels (h, w) int, count)`, labels `1..count` and 0
    outside, or no component (`count == 0`) when the mode is undefined (`mean(Â >= edit_mask_threshold) >=
    max_edit_area`).

    `components="threshold"` (the paper's): the 8-connected regions of `Â >= unsafe_threshold`. `"basin"`:
    [`basin_components`] with `unsafe_threshold` as the cut relative to each peak.
    """
    if components not in COMPONENT_RULES:
        raise ValueError(f"`components` must be one of {list(COMPONENT_RULES)}, got {components!r}.")
    if (dag_map >= edit_mask_threshold).mean() >= max_edit_area:
        return np.zeros(dag_map.shape, dtype=np.int32), 0
    if components == "basin":
        return basin_components(dag_map, unsafe_threshold, max(basin_floor, edit_mask_threshold))
    return ndimage.label(dag_map >= unsafe_threshold, structure=_EIGHT_CONNECTED)


def basin_components(dag_map: np.ndarray, relative_threshold: float, floor: float) -> tuple[np.ndarray, int]:
    """One component per peak of a map `Â` `(h, w)`: `(labels (h, w) int, count)`, labels `1..count`, 0 outside.

    The peaks are the 8-connected plateaus of local maxima of `Â` (pixels no 8-neighbour exceeds) whose value
    reaches `floor`. Each pixel belongs to the peak it ascends to ([`ascent_owners`]: steepest rise), and peak
    `i`'s component is the pixels of its basin with `Â >= relative_threshold · peak_i`.

    Why (beyond the paper, README): the paper's components are cut at one level of a map normalised to the
    image's highest peak, so an object that draws the concept less than a look-alike elsewhere in the image
    (a red star beside a brighter yellow star) forms no component, or one pixel, and two touching objects above
    the cut form one. Cut per basin, every object that forms a peak is a candidate of its own, and the selective
    rule's presence score judges it on its own pixels. The highest peak's component is the paper's component
    (`Â >= relative_threshold`) restricted to its basin. More candidates are also more chances of a false
    detection: measured in `benchmarks/RESULTS.md` ("One candidate per peak of `Â`"), it pays on the stronger mini
    model and not on the bundled one.
    """
    local_max = dag_map >= ndimage.maximum_filter(dag_map, footprint=_EIGHT_CONNECTED, mode="nearest")
    peaks, count = ndimage.label(local_max & (dag_map >= floor), structure=_EIGHT_CONNECTED)
    if count == 0:
        return peaks, 0
    owners = ascent_owners(dag_map, peaks)
    heights = np.concatenate([[np.inf], ndimage.maximum(dag_map, peaks, index=np.arange(1, count + 1))])
    labels = np.where(dag_map >= relative_threshold * heights[owners], owners, 0)
    return labels.astype(np.int32), count


def find_components(dag_map: torch.Tensor, config: DAGConfig) -> Components:
    """The [`unsafe_components`] of each image of `Â` `(B, h, w)` under `config`'s thresholds and `components`
    rule: per image `(labels (h, w) int, count)`.

    A step finds them once and hands them to what reads them ([`area_scaler`], [`peak_presence`],
    [`component_mask`], `PresenceHead.paint`): each would otherwise find the same components again.
    """
    rule = (config.unsafe_threshold, config.edit_mask_threshold, config.max_edit_area)
    rule += (config.components, config.basin_floor)
    return [unsafe_components(image_map, *rule) for image_map in dag_map.detach().float().cpu().numpy()]


def component_mask(dag_map: torch.Tensor, config: DAGConfig, found: Components | None = None) -> torch.Tensor:
    """The pixels of the unsafe components [`unsafe_components`] forms under `config`: `(B, h, w)` bool, on the
    device of `dag_map` (`Â`, `(B, h, w)`). `found`: those components already found ([`find_components`])."""
    if found is None:
        found = find_components(dag_map, config)
    masks = np.stack([labels > 0 for labels, _ in found])
    return torch.from_numpy(masks).to(dag_map.device)


def component_presence(presence: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Mean of a presence map `(h, w)` over each of `count` labelled components (`labels` from `ndimage.label`):
    `(count,)`. A mean, not a peak: a linear read-out averaged over an object is what separates it from its
    look-alikes best (`benchmarks/probe.py` pools the same way)."""
    sums = np.bincount(labels.ravel(), weights=presence.ravel().astype(np.float64), minlength=count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return (sums[1:] / sizes[1:]).astype(np.float32)


def peak_presence(
    dag_map: torch.Tensor,
    presence: torch.Tensor,
    unsafe_threshold: float,
    edit_mask_threshold: float,
    max_edit_area: float,
    empty: float = 0.0,
    components: str = "threshold",
    basin_floor: float = 0.25,
    found: Components | None = None,
) -> torch.Tensor:
    """Per image, the highest [`component_presence`] of any unsafe component of `dag_map` (as
    [`area_scaler`] finds them), `(B,)` float32 on the CPU; `empty` where no component formed.

    Under the selective rule an image is guided at a step exactly when this reaches `presence_threshold` (with a
    positive base scale), so the highest value over the steps tells which thresholds would have guided it.

    Args:
        dag_map (`torch.Tensor`): `Â`, `(B, h, w)` in `[0, 1]`.
        presence (`torch.Tensor`): `(B, h, w)` presence evidence.
        found (*optional*): the components of `dag_map` already found ([`find_components`]).
    """
    if found is None:
        rule = (unsafe_threshold, edit_mask_threshold, max_edit_area, components, basin_floor)
        found = [unsafe_components(m, *rule) for m in dag_map.detach().float().cpu().numpy()]
    evidence = presence.detach().float().cpu().numpy()
    peaks = np.full(len(found), empty, dtype=np.float32)
    for index, (labels, count) in enumerate(found):
        if count:
            peaks[index] = component_presence(evidence[index], labels, count).max()
    return torch.from_numpy(peaks)


def magnitude_scaler(
    dag_map: torch.Tensor, edit_mask_threshold: float = 0.01, max_magnitude: float = 5.0
) -> torch.Tensor:
    """DAG's MagnitudeScaler: `T = clip(Â / τ_e, 1, max_magnitude) ⊙ 1[Â >= τ_e]`, `(B, h, w)`.

    With the defaults it saturates at 5 for `Â >= 0.05`.
    """
    edit_mask = dag_map >= edit_mask_threshold
    return torch.clamp(dag_map / edit_mask_threshold, 1.0, max_magnitude) * edit_mask


@dataclass(frozen=True)
class DAGScaleMap:
    """DAG's per-pixel scale for one step.

    Attributes:
        scale (`torch.Tensor`): `S_dag = S_area ⊙ T`, `(B, h, w)`, zero outside the edit region.
        detected (`torch.Tensor`): `(B,)` bool, the image is guided at this step (`S_dag > 0` somewhere).
        presence (`torch.Tensor` or `None`): under the selective rule, [`peak_presence`] of the step, `(B,)`
            float32 on the CPU; `None` under the paper's rule.
    """

    scale: torch.Tensor
    detected: torch.Tensor
    presence: torch.Tensor | None = None


def dag_scale_map(
    dag_map: torch.Tensor,
    config: DAGConfig,
    presence: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
    found: Components | None = None,
) -> DAGScaleMap:
    """Combines AreaScaler and MagnitudeScaler (or their ablations) into `S_dag` for a detection map `(B, h, w)`.

    With `config.detection == "presence"`, `presence` `(B, h, w)` is the evidence the components are judged on
    (see [`area_scaler`]); the AreaScaler ablation then keeps `S_area = 1` only on the edit pixels nearest to a
    present component. With `"head"`, `presence` holds each component's presence-head logit over its pixels
    (`PresenceHead.paint`), and a component is present when `σ(logit) >= presence_threshold`, i.e. its logit
    reaches `logit(presence_threshold)`; the reported peaks are probabilities. `held` `(B, h, w)` bool, under a
    selective rule: the pixels to hold ([`area_scaler`]; the reported peaks ignore it). `found`: the components of
    `dag_map` already found ([`find_components`]); found here if `None`.
    """
    if config.detection != "paper" and presence is None:
        raise ValueError(f'`detection="{config.detection}"` needs the presence map of the step.')
    edit_mask = dag_map >= config.edit_mask_threshold
    ones_on_edit = edit_mask.to(dag_map.dtype)
    head = config.detection == "head"
    rule = {"components": config.components, "basin_floor": config.basin_floor}
    if found is None and config.detection != "paper":
        # read twice below (the gated scale and the peaks); the paper's rule reads them once, in `area_scaler`
        found = find_components(dag_map, config)
    gate = {}
    if config.detection != "paper":
        threshold = logit(config.presence_threshold) if head else config.presence_threshold
        gate = {"presence": presence, "presence_threshold": threshold, "held": held, "hold_region": config.hold_region}
    if config.area_scaler:
        area = area_scaler(
            dag_map,
            config.unsafe_threshold,
            config.edit_mask_threshold,
            config.base_scale,
            config.max_edit_area,
            fill_decay=config.fill_decay,
            fill_region=config.fill_region,
            found=found,
            **rule,
            **gate,
        )
    elif gate:
        # S_area := 1 where the gated AreaScaler would guide at all
        gated = area_scaler(
            dag_map,
            config.unsafe_threshold,
            config.edit_mask_threshold,
            1.0,
            math.inf,
            fill_region=config.fill_region,
            **rule,
            **gate,
        )
        area = (gated > 0).to(dag_map.dtype)
    else:
        area = ones_on_edit
    if config.magnitude_scaler:
        magnitude = magnitude_scaler(dag_map, config.edit_mask_threshold, config.max_magnitude)
    else:
        magnitude = ones_on_edit
    scale = area * magnitude
    peaks = None
    if gate:
        peaks = peak_presence(
            dag_map,
            presence,
            config.unsafe_threshold,
            config.edit_mask_threshold,
            config.max_edit_area,
            empty=-math.inf if head else 0.0,
            found=found,
            **rule,
        )
        if head:
            peaks = torch.sigmoid(peaks)
    return DAGScaleMap(scale=scale, detected=(scale > 0).flatten(1).any(dim=1), presence=peaks)


def dag_noise_pred(
    noise_pred_uncond: torch.Tensor,
    noise_pred_text: torch.Tensor,
    noise_preds_safety: list[torch.Tensor],
    guidance_scale: float,
    scale_map: torch.Tensor,
    momentum: torch.Tensor | None,
    config: DAGConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided DAG step (paper Table 1): `e = e_u + s_g * ((e_p - e_u) - g)`, or with
    `config.guidance_form == "sega"` SEGA's own form `e = e_u + s_g * (e_p - e_u) - g`.

    `g = Σ_c S_dag ⊙ M_base,c ⊙ (e_s_c - e_u) + momentum_scale * 1[S_dag > 0] ⊙ v`, where `M_base` is the base
    method's mask (SEGA: `|e_s - e_u|` at or above its `edit_threshold` quantile over `h×w`; SLD:
    `e_p - e_s < sld_threshold`) and `S_dag` is broadcast over channels. The momentum is masked to the region
    DAG guides at this step, so nothing outside it moves: where `S_dag = 0` the prediction is exactly the
    classifier-free one. `v <- beta * v + (1 - beta) * g`.

    With `config.norm_cap` `κ` (beyond the paper; README), a guided pixel's prediction whose norm over the channels
    exceeds `κ` times the classifier-free prediction's there is scaled down to it: the guidance turns the
    prediction away from the safety concept without pushing the latents out of their range (which a model's
    GroupNorms would carry to the whole image).

    Args:
        scale_map (`torch.Tensor`): `S_dag`, `(B, h, w)`.

    Returns:
        `(noise_pred, momentum)`, both `(B, C, h, w)`.
    """
    scale = scale_map[:, None].to(noise_pred_uncond.dtype)
    if momentum is None:
        momentum = torch.zeros_like(noise_pred_uncond)
    safety = torch.zeros_like(noise_pred_uncond)
    for noise_pred_safety in noise_preds_safety:
        direction = noise_pred_safety - noise_pred_uncond
        if isinstance(config.base, SEGAConfig):
            base_mask = _percentile_mask(direction, config.base.edit_threshold)
        else:
            base_mask = (noise_pred_text - noise_pred_safety) < config.base.sld_threshold
        safety = safety + scale * base_mask * direction
    # a bool mask times a Python float is float32: cast it, or float16 runs would turn float32 here
    safety = safety + config.momentum_scale * (scale > 0).to(momentum.dtype) * momentum
    momentum = config.mom_beta * momentum + (1 - config.mom_beta) * safety
    if config.guidance_form == "sega":
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond) - safety
    else:
        noise_pred = noise_pred_uncond + guidance_scale * ((noise_pred_text - noise_pred_uncond) - safety)
    if config.norm_cap is not None:
        unguided = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        limit = config.norm_cap * torch.linalg.vector_norm(unguided, dim=1, keepdim=True)
        norm = torch.linalg.vector_norm(noise_pred, dim=1, keepdim=True)
        capped = (scale > 0) & (norm > limit)
        noise_pred = torch.where(
            capped, noise_pred * (limit / norm.clamp_min(torch.finfo(norm.dtype).tiny)), noise_pred
        )
    return noise_pred, momentum
