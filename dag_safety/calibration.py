"""Calibrating DAG's selective rule (`detection="presence"`, README "Beyond the paper") for a target false-detection rate.

A benign image must stay unguided at every one of the ~20 guided steps, so the threshold is chosen on what
decides that: per validation item, the highest presence score any unsafe component reaches at any guided step.
Two ways to get that score (`source=`):

- `"generations"` (the default): generate each validation caption once, unguided, and read the pipeline's own
  `presence_scores`. This is exact for the quantity a user cares about, the share of benign *generations* DAG
  guides: until its first guided step a guided generation follows the unguided one, so it is guided at some step
  exactly when its unguided score reaches the threshold. With `confirm_steps=k` the score is the `k`-th highest
  of the steps' highest scores, and the same holds: nothing is guided before the `k`-th step that passes.
- `"images"`: approximate the trajectory from the annotated images: each image's latent is noised with one noise
  draw to each guided timestep (`x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`, the same `ε` at every step, as a deterministic
  sampler's path to that image would be), the UNet runs with the image's caption, and the evidence is smoothed
  over the steps as in the denoising loop. It also tells whether the unsafe *region* or a co-object is guided,
  which a generation without a mask cannot.

Safe validation images may carry a `group` (`captions.csv`'s optional `group` column): the kind of safe content,
such as a look-alike of the concept. The rate is then bounded on each group separately (the threshold is the
largest of the groups' own), so that it holds whatever mix of groups the prompts a model serves will hold; a pooled
bound holds only for the validation set's own mix, and look-alikes are what pass a threshold. Images without a group
form one group of their own. A group of fewer than `1 / target_fpr` images may not be guided at all.

The edit threshold `τ_e` can be calibrated too ([`choose_edit_threshold`], `--edit-mask-threshold auto`), before
the presence threshold, which is then calibrated at it: the paper's 0.01 leaves every step "mode undefined" on a
model whose concept rows attend broadly. [`evidence_trajectories`] keeps the evidence of one UNet pass, so that
both thresholds, and every candidate set of detection layers, are chosen from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from .attention import cross_attention_layers, select_layers
from .conditioning import unet_conditioning
from .detection import concept_presence, minmax_normalize
from .guidance import component_presence, unsafe_components
from .optimize import AnnotatedImage, _to_pixels
from .presence_head import roc_auc

__all__ = [
    "CALIBRATION_SOURCES",
    "EDIT_MAX_UNDEFINED",
    "EDIT_THRESHOLD_CANDIDATES",
    "EditThresholdChoice",
    "EvidenceTrajectories",
    "LayerChoice",
    "PresenceCalibration",
    "PresenceScores",
    "calibrate_edit_threshold",
    "calibrate_presence",
    "choose_edit_threshold",
    "evidence_trajectories",
    "generation_presence_scores",
    "guided_passes",
    "presence_scores",
    "scores_from_evidence",
    "select_detection_layers",
    "undefined_share",
    "unsafe_maps",
]

CALIBRATION_SOURCES = ("generations", "images")


@dataclass(frozen=True)
class PresenceScores:
    """Per image, the highest presence score over the guided steps `(N,)` (`-inf` where no component formed):
    of any component (`any`), of components overlapping the image's mask (`target`), of the others (`other`)."""

    any: np.ndarray
    target: np.ndarray
    other: np.ndarray


@dataclass(frozen=True)
class PresenceCalibration:
    """A calibrated threshold and what it does on the calibration images.

    Attributes:
        threshold (`float`): the presence threshold, in `(0, 1)`.
        target_fpr (`float`): the false-detection rate asked for.
        false_detection_rate (`float`): share of safe items (images, or generations of safe captions) guided at
            any step at `threshold`.
        detection_rate (`float`): share of unsafe items guided at some step: on images, their masked region; on
            generations, anywhere.
        co_object_rate (`float` or `None`): share of unsafe images where a component off the mask is guided at
            some step; `None` for generations (no mask).
        safe_images (`int`), unsafe_images (`int`), num_inference_steps (`int`): the calibration set and sampler.
        source (`str`): `"generations"` or `"images"` (see the module docstring).
        guidance_scale (`float` or `None`): the CFG scale of the generations.
        groups (`dict[str, tuple[int, float]]` or `None`): per group of safe images (when any has a `group`;
            `""` for those without), their number and the share guided at `threshold`, each at most `target_fpr`.
    """

    threshold: float
    target_fpr: float
    false_detection_rate: float
    detection_rate: float
    co_object_rate: float | None
    safe_images: int
    unsafe_images: int
    num_inference_steps: int
    source: str = "images"
    guidance_scale: float | None = None
    groups: dict[str, tuple[int, float]] | None = None

    def as_metadata(self) -> dict:
        """The summary stored in the embedding's `calibration` metadata."""
        summary = {
            "source": self.source,
            "target_fpr": self.target_fpr,
            "false_detection_rate": round(self.false_detection_rate, 4),
            "detection_rate": round(self.detection_rate, 4),
            "co_object_rate": None if self.co_object_rate is None else round(self.co_object_rate, 4),
            "safe_images": self.safe_images,
            "unsafe_images": self.unsafe_images,
            "num_inference_steps": self.num_inference_steps,
        }
        if self.guidance_scale is not None:
            summary["guidance_scale"] = self.guidance_scale
        if self.groups is not None:
            summary["groups"] = {
                group: {"safe_images": count, "false_detection_rate": round(rate, 4)}
                for group, (count, rate) in self.groups.items()
            }
        return summary


@torch.no_grad()
def presence_scores(
    pipe,
    images: list[AnnotatedImage],
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    layer_sets: dict[str, Collection[str]] | None = None,
    evidence: Callable[[torch.Tensor], torch.Tensor] = concept_presence,
) -> PresenceScores | dict[str, PresenceScores]:
    """The presence scores DAG's selective rule would see on `images` (see the module docstring).

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled (its embedding, layers, thresholds, warm-up and
            `presence_smoothing` are used; its `presence_threshold` is not). Under `detection="head"` DAG's own
            layers' components are scored by the presence head's probability.
        images (`list[AnnotatedImage]`): validation images; a mask marks the unsafe region.
        num_inference_steps (`int`): the sampler's steps whose guided timesteps are visited.
        seed (`int`): seed of the noise draws.
        layer_sets (`dict[str, Collection[str]]`, *optional*): named subsets of DAG's detection layers (processor
            names, as in `CrossAttentionCapture.layers`), scored from the same UNet passes as if each were the
            detection layers: one pass serves every candidate.
        evidence (`Callable`, *optional*): a pixel's evidence from one concept's layer-averaged token maps,
            `(B, 1+K, h, w) -> (B, h, w)`. DAG reads [`concept_presence`] (the default); other rules are for
            studies of what the rule should read (`benchmarks/detection_layers.py --evidence`).

    Returns:
        [`PresenceScores`], or with `layer_sets` one per set, by name.
    """
    trajectories = evidence_trajectories(
        pipe, images, num_inference_steps, seed, batch_size, progress, layer_sets, evidence
    )
    config = pipe._dag.config
    scores = {
        set_name: scores_from_evidence(
            found,
            trajectories.masks,
            config.unsafe_threshold,
            config.edit_mask_threshold,
            config.max_edit_area,
            trajectories.head if set_name == "" else None,
            config.components,
            config.basin_floor,
        )
        for set_name, found in trajectories.evidence.items()
    }
    return scores[""] if layer_sets is None else scores


@dataclass(frozen=True)
class EvidenceTrajectories:
    """The smoothed presence evidence DAG would see along a sampler's guided steps, per validation image.

    Attributes:
        evidence (`dict[str, torch.Tensor]`): per layer set (`""` for DAG's own layers), `(N, steps, concepts, h,
            w)` float32: at each guided step the running mean of the evidence, as in the denoising loop.
        masks (`torch.Tensor`): `(N, h, w)` bool, each image's mask at the latent's size (max-pooled; all `False`
            for a safe image).
        head (`torch.Tensor` or `None`): under `detection="head"`, at each guided step each unsafe component of DAG's
            own `Â` filled with the presence head's logit on its pooled smoothed features (`PresenceHead.paint`),
            `(N, steps, concepts, h, w)`: a component's mean over it is its logit at DAG's thresholds.
    """

    evidence: dict[str, torch.Tensor]
    masks: torch.Tensor
    head: torch.Tensor | None = None


@torch.no_grad()
def guided_passes(
    pipe,
    images: list[AnnotatedImage],
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> Iterator[tuple[int, torch.Tensor, int, tuple[int, int]]]:
    """The UNet passes of calibration (see the module docstring): `images` in chunks of `batch_size`, each noised
    to every guided timestep in turn and run with its captions while DAG captures the queries.

    Yields, after each pass and with the capture store filled (it is cleared when the loop resumes):
    `(start, masks, step, latent_size)`: the chunk's first index into `images`, its masks `(B, h, w)` bool at the
    latent's size (max-pooled; all `False` for a safe image), the guided step's index from 0, and `(h, w)`.
    """
    state = pipe._dag
    if state is None:
        raise ValueError("Calibration needs DAG; call `pipe.enable_dag(embedding)` first.")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps[state.config.warmup_steps :]
    if len(timesteps) == 0:
        raise ValueError(
            f"{num_inference_steps} steps leave no guided step after {state.config.warmup_steps} warm-up steps."
        )
    forward_process = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for start in tqdm(range(0, len(images), batch_size), desc="Calibrating", leave=False, disable=not progress):
        chunk = images[start : start + batch_size]
        pixels, masks = zip(*(_to_pixels(pipe, item, side) for item in chunk))
        latents = pipe.vae.encode(torch.cat(pixels)).latent_dist.mode() * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        text, added = unet_conditioning(pipe, [item.caption for item in chunk], pipe.device, 1, (side, side))
        latent_size = tuple(latents.shape[-2:])
        masks = torch.nn.functional.adaptive_max_pool2d(torch.stack(masks)[:, None], latent_size)[:, 0].bool()
        with state.capture:
            for step, t in enumerate(timesteps):
                noisy = forward_process.add_noise(latents, noise, t.expand(len(chunk)))
                state.capture.store.arm(slice(None))
                try:
                    pipe.unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added)
                finally:
                    state.capture.store.disarm()
                try:
                    yield start, masks, step, latent_size
                finally:
                    state.capture.store.clear()


@torch.no_grad()
def evidence_trajectories(
    pipe,
    images: list[AnnotatedImage],
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    layer_sets: dict[str, Collection[str]] | None = None,
    evidence: Callable[[torch.Tensor], torch.Tensor] = concept_presence,
) -> EvidenceTrajectories:
    """Runs the UNet on `images` noised to each guided timestep ([`guided_passes`]) and keeps the evidence, so that
    thresholds can be chosen and scored without another pass. Arguments as for [`presence_scores`]. Under
    `detection="head"` the head's smoothed logits are kept too (`EvidenceTrajectories.head`).

    Memory: `N × steps × concepts × h × w` floats per layer set (300 images, 20 guided steps and a 64² latent:
    98 MB a set).
    """
    state = pipe._dag
    if state is None:
        raise ValueError("Calibration needs DAG; call `pipe.enable_dag(embedding)` first.")
    config = state.config
    if layer_sets is None:
        layer_sets = {"": None}
    else:
        unknown = {name for layers in layer_sets.values() for name in layers} - set(state.capture.layers)
        if unknown:
            raise ValueError(f"`layer_sets` name layers DAG does not capture: {sorted(unknown)}.")
    heads = config.detection == "head"
    smoothing = config.presence_smoothing
    found = {set_name: [] for set_name in layer_sets}
    head_found, all_masks = [], []

    def flush(steps: dict[str, list[torch.Tensor]], head_steps: list[torch.Tensor]) -> None:
        for set_name, by_step in steps.items():
            found[set_name].append(torch.stack(by_step).permute(2, 0, 1, 3, 4))  # (B, steps, concepts, h, w)
        if head_steps:
            head_found.append(torch.stack(head_steps).permute(2, 0, 1, 3, 4))

    steps, head_steps, head_rows, head_features = {}, [], None, None
    for _, masks, step, latent_size in guided_passes(pipe, images, num_inference_steps, seed, batch_size, progress):
        if step == 0:
            if all_masks:
                flush(steps, head_steps)
            all_masks.append(masks)
            steps, head_steps = {set_name: [] for set_name in layer_sets}, []
        for set_name, layers in layer_sets.items():
            shares = state.shares(latent_size, evidence, layers)  # (concepts, B, h, w)
            if steps[set_name]:
                shares = smoothing * steps[set_name][-1] + (1 - smoothing) * shares
            steps[set_name].append(shares)
        if heads:
            # as `DAGState.detect_step` judges the components
            previous = None if step == 0 else (head_rows, head_features)
            head_rows, head_features, _, painted, _ = state.selective_evidence(latent_size, previous)
            head_steps.append(torch.stack(painted))  # (concepts, B, h, w)
    flush(steps, head_steps)
    return EvidenceTrajectories(
        {name: torch.cat(chunks) for name, chunks in found.items()},
        torch.cat(all_masks),
        torch.cat(head_found) if heads else None,
    )


def unsafe_maps(evidence: torch.Tensor) -> torch.Tensor:
    """`Â` of [`EvidenceTrajectories`] evidence `(N, steps, concepts, h, w)`: each map min-max normalised, same
    shape."""
    return minmax_normalize(evidence.flatten(0, 2)).view(evidence.shape)


def scores_from_evidence(
    evidence: torch.Tensor,
    masks: torch.Tensor,
    unsafe_threshold: float,
    edit_mask_threshold: float,
    max_edit_area: float,
    head: torch.Tensor | None = None,
    components: str = "threshold",
    basin_floor: float = 0.25,
) -> PresenceScores:
    """[`PresenceScores`] of one layer set's [`EvidenceTrajectories`] under the given thresholds (`DAGConfig`'s):
    at each step each concept's `Â` forms the unsafe components, a component scores its mean evidence (with
    `head`, the head's probability `σ(mean logit)`, as under `detection="head"`), and each image keeps its highest
    scores over the steps.

    Args:
        evidence (`torch.Tensor`): `(N, steps, concepts, h, w)`.
        masks (`torch.Tensor`): `(N, h, w)` bool.
        head (`torch.Tensor`, *optional*): `EvidenceTrajectories.head`, same shape as `evidence`.
    """
    size = evidence.shape[-2:]
    dag_maps = unsafe_maps(evidence).numpy().reshape(evidence.shape[0], -1, *size)
    shares = (evidence if head is None else head).numpy().reshape(evidence.shape[0], -1, *size)
    best = {key: np.full(evidence.shape[0], -np.inf) for key in ("any", "target", "other")}
    for index, mask in enumerate(masks.numpy()):
        for share, dag_map in zip(shares[index], dag_maps[index]):
            labels, count = unsafe_components(
                dag_map, unsafe_threshold, edit_mask_threshold, max_edit_area, components, basin_floor
            )
            if count == 0:
                continue
            scores = component_presence(share, labels, count)
            if head is not None:
                scores = 1 / (1 + np.exp(-scores.astype(np.float64)))
            on_mask = np.bincount(labels[mask], minlength=count + 1)[1:] > 0
            best["any"][index] = max(best["any"][index], scores.max())
            if on_mask.any():
                best["target"][index] = max(best["target"][index], scores[on_mask].max())
            if (~on_mask).any():
                best["other"][index] = max(best["other"][index], scores[~on_mask].max())
    return PresenceScores(**best)


EDIT_THRESHOLD_CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
EDIT_MAX_UNDEFINED = 0.05


@dataclass(frozen=True)
class EditThresholdChoice:
    """A calibrated edit threshold `τ_e` and how often, at it, an unsafe validation image's step is "mode
    undefined" (its edit region covers at least `max_edit_area` of the latent, so DAG leaves the step unguided).

    Attributes:
        threshold (`float`): `τ_e` (`DAGConfig.edit_mask_threshold`).
        undefined_share (`float`): share of the unsafe images' guided steps (and concepts) mode undefined at it.
        max_undefined (`float`): the share asked for.
    """

    threshold: float
    undefined_share: float
    max_undefined: float

    def as_metadata(self) -> dict:
        """The summary stored in the embedding's `calibration` metadata, beside the presence threshold's."""
        return {"edit_max_undefined": self.max_undefined, "edit_undefined_share": round(self.undefined_share, 4)}


def undefined_share(evidence: torch.Tensor, edit_mask_threshold: float, max_edit_area: float) -> float:
    """Share of the maps of [`EvidenceTrajectories`] evidence `(N, steps, concepts, h, w)` that are "mode undefined"
    at `edit_mask_threshold` (the test of [`unsafe_components`])."""
    area = (unsafe_maps(evidence) >= edit_mask_threshold).float().mean(dim=(-2, -1))
    return float((area >= max_edit_area).float().mean())


def choose_edit_threshold(
    evidence: torch.Tensor,
    unsafe_threshold: float,
    max_edit_area: float,
    max_undefined: float = EDIT_MAX_UNDEFINED,
    candidates: tuple[float, ...] = EDIT_THRESHOLD_CANDIDATES,
) -> EditThresholdChoice:
    """The lowest candidate `τ_e` (at most `unsafe_threshold`) at which at most `max_undefined` of the unsafe
    images' maps are "mode undefined"; the highest allowed candidate if none is.

    The paper's `τ_e = 0.01` assumes maps that are near zero away from the concept (SD v1.4's, where the
    start-of-text row takes almost all of the attention); a model whose concept rows draw a broad share
    everywhere (the mini model in training: 0.16 of it) gives maps whose edit region at 0.01 is the whole latent
    at every step, so DAG never guides. The edit region is the band DAG may guide around an unsafe component, and
    "mode undefined" is the paper's sign that no object has formed yet; an embedding's `τ_e` is therefore the
    lowest at which the unsafe images' objects have formed, at the paper's value wherever its assumption holds.

    Args:
        evidence (`torch.Tensor`): `(N, steps, concepts, h, w)` of unsafe images ([`EvidenceTrajectories`]).
        unsafe_threshold (`float`), max_edit_area (`float`): `DAGConfig`'s.
        max_undefined (`float`): in `[0, 1)`.
    """
    if not 0 <= max_undefined < 1:
        raise ValueError(f"`max_undefined` must be in [0, 1), got {max_undefined!r}.")
    allowed = [value for value in sorted(candidates) if value <= unsafe_threshold] or [unsafe_threshold]
    for value in allowed:
        share = undefined_share(evidence, value, max_edit_area)
        if share <= max_undefined:
            return EditThresholdChoice(value, share, max_undefined)
    return EditThresholdChoice(allowed[-1], share, max_undefined)


def calibrate_edit_threshold(
    pipe,
    images: list[AnnotatedImage],
    max_undefined: float = EDIT_MAX_UNDEFINED,
    num_inference_steps: int = 25,
    seed: int = 0,
    progress: bool = True,
) -> EditThresholdChoice:
    """[`choose_edit_threshold`] on the unsafe `images` along the guided steps (as [`presence_scores`] sees them),
    with DAG's detection layers, `unsafe_threshold` and `max_edit_area`.

    Raises:
        `ValueError`: no unsafe image (with a mask) among `images`, or `max_undefined` outside `[0, 1)`.
    """
    unsafe = [item for item in images if item.unsafe]
    if not unsafe:
        raise ValueError("Calibrating the edit threshold needs unsafe validation images (with a mask); got none.")
    trajectories = evidence_trajectories(pipe, unsafe, num_inference_steps, seed, progress=progress)
    config = pipe._dag.config
    return choose_edit_threshold(
        trajectories.evidence[""], config.unsafe_threshold, config.max_edit_area, max_undefined
    )


@torch.no_grad()
def generation_presence_scores(
    pipe,
    prompts: list[str],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """Per prompt, the presence score of one unguided generation (`DAGPipelineOutput.presence_scores`), `(N,)`.

    Prompt `i` is generated with `torch.Generator().manual_seed(seed + i)`, `num_inference_steps` steps and
    `guidance_scale`, under DAG's selective rule with a threshold just below 1, so that a generation is guided only
    once its score has passed every threshold a calibration could choose: each score is read along the
    generation's unguided path up to the step that decides it.

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled (its embedding, layers, thresholds, warm-up and
            `presence_smoothing` are used; its `presence_threshold` is not, and its detection rule only to score by
            the presence head under `"head"`, by the rows' presence otherwise). Left as found.
        prompts (`list[str]`): validation captions.
    """
    state = pipe._dag
    if state is None:
        raise ValueError("`generation_presence_scores` needs DAG; call `pipe.enable_dag(embedding)` first.")
    saved = state.config
    rule = "head" if saved.detection == "head" else "presence"
    state.config = dataclasses.replace(saved, detection=rule, presence_threshold=float(np.nextafter(1.0, 0.0)))
    # one bar for the calibration, not one per generation; the user's own bar settings come back afterwards
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    scores = []
    try:
        bar = tqdm(total=len(prompts), desc="Calibrating on generations", leave=False, disable=not progress)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + offset) for offset in range(len(chunk))]
            output = pipe(
                chunk,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent",
            )
            scores.extend(output.presence_scores)
            bar.update(len(chunk))
        bar.close()
    finally:
        state.config = saved
        pipe._progress_bar_config = bar_config
    return np.asarray(scores, dtype=np.float32)


def _lowest_threshold(negatives: np.ndarray, target_fpr: float, groups: np.ndarray | None = None) -> float:
    """The lowest threshold in `(0, 1)` that at most `target_fpr` of the `negatives` scores reach; with `groups`
    (`(N,)` labels), of each group's scores: the largest of the groups' own thresholds."""
    if groups is not None:
        return max(_lowest_threshold(negatives[groups == group], target_fpr) for group in np.unique(groups))
    negatives = np.sort(negatives)[::-1]
    allowed = int(np.floor(target_fpr * len(negatives)))
    # just above the first safe item that may not be guided; never below a share any item could reach
    threshold = float(np.nextafter(max(negatives[allowed], 0.0), np.inf)) if allowed < len(negatives) else 0.0
    return float(np.clip(threshold, np.nextafter(0.0, 1.0), np.nextafter(1.0, 0.0)))


def _group_rates(negatives: np.ndarray, groups: np.ndarray | None, threshold: float):
    """`PresenceCalibration.groups`: per group, its size and the share of its scores reaching `threshold`."""
    if groups is None:
        return None
    return {
        str(group): (int((groups == group).sum()), float((negatives[groups == group] >= threshold).mean()))
        for group in np.unique(groups)
    }


def calibrate_presence(
    pipe,
    images: list[AnnotatedImage],
    target_fpr: float = 0.05,
    num_inference_steps: int = 25,
    seed: int = 0,
    progress: bool = True,
    source: str = "generations",
    guidance_scale: float = 7.5,
) -> PresenceCalibration:
    """The lowest presence threshold that guides at most `target_fpr` of the safe validation items at any step (of
    each group of them, when they carry groups; see the module docstring).

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled; left as found.
        images (`list[AnnotatedImage]`): validation images; a mask marks the unsafe region, a `group` the kind of
            a safe one. With `source="generations"` only their captions, groups and whether they are unsafe are
            used.
        source (`str`): `"generations"` (default) or `"images"`, see the module docstring.
        guidance_scale (`float`): CFG scale of the generations (`source="generations"`).

    Raises:
        `ValueError`: `target_fpr` outside `(0, 1)`, an unknown `source`, `source="images"` with DAG's
            `confirm_steps` above 1, or no safe or no unsafe image.
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"`target_fpr` must be in (0, 1), got {target_fpr!r}.")
    if source not in CALIBRATION_SOURCES:
        raise ValueError(f"`source` must be one of {CALIBRATION_SOURCES}, got {source!r}.")
    if source == "images" and pipe._dag is not None and pipe._dag.config.confirm_steps > 1:
        # the images' scores are each step's own (`scores_from_evidence`), not a count of steps along a generation
        raise ValueError(
            f"Calibrating on images scores the steps one by one, so it cannot calibrate `confirm_steps="
            f"{pipe._dag.config.confirm_steps}`: calibrate on generations (`--calibrate-on generations`, the"
            " default), or confirm at the first step (`confirm_steps=1`, `--default-confirm-steps 1`)."
        )
    unsafe = np.array([item.unsafe for item in images])
    if unsafe.all() or not unsafe.any():
        raise ValueError(
            "Calibration needs safe images (no mask) and unsafe images (with a mask) among the validation images;"
            f" got {int(unsafe.sum())} unsafe and {int((~unsafe).sum())} safe."
        )
    safe_groups = [item.group for item in images if not item.unsafe]
    groups = None if all(group is None for group in safe_groups) else np.array([g or "" for g in safe_groups])
    if source == "generations":
        captions = [item.caption for item in images]
        scores = generation_presence_scores(
            pipe, captions, num_inference_steps, guidance_scale, seed, progress=progress
        )
        threshold = _lowest_threshold(scores[~unsafe], target_fpr, groups)
        return PresenceCalibration(
            threshold=threshold,
            target_fpr=target_fpr,
            false_detection_rate=float((scores[~unsafe] >= threshold).mean()),
            detection_rate=float((scores[unsafe] >= threshold).mean()),
            co_object_rate=None,
            safe_images=int((~unsafe).sum()),
            unsafe_images=int(unsafe.sum()),
            num_inference_steps=num_inference_steps,
            source=source,
            guidance_scale=guidance_scale,
            groups=_group_rates(scores[~unsafe], groups, threshold),
        )
    scores = presence_scores(pipe, images, num_inference_steps, seed, progress=progress)
    threshold = _lowest_threshold(scores.any[~unsafe], target_fpr, groups)
    return PresenceCalibration(
        threshold=threshold,
        target_fpr=target_fpr,
        false_detection_rate=float((scores.any[~unsafe] >= threshold).mean()),
        detection_rate=float((scores.target[unsafe] >= threshold).mean()),
        co_object_rate=float((scores.other[unsafe] >= threshold).mean()),
        safe_images=int((~unsafe).sum()),
        unsafe_images=int(unsafe.sum()),
        num_inference_steps=num_inference_steps,
        source=source,
        groups=_group_rates(scores.any[~unsafe], groups, threshold),
    )


@dataclass(frozen=True)
class LayerChoice:
    """One candidate of [`select_detection_layers`] and how it did on the validation images.

    Attributes:
        blocks (`tuple[str, ...]`): the UNet modules (`DAGConfig.layers`).
        detection_rate (`float`): share of unsafe images whose masked region is guided at some step at `threshold`.
        threshold (`float`): the lowest presence threshold within `target_fpr` (of each group of safe images).
        auc (`float`): ROC AUC of the unsafe images' scores (any component) against the safe ones'.
        edit_mask_threshold (`float`): the `τ_e` the candidate was scored at: DAG's, or its own
            [`choose_edit_threshold`] when the selection calibrates it.
        undefined_share (`float`): at that `τ_e`, the share of the unsafe images' guided steps "mode undefined"
            ([`undefined_share`]).
    """

    blocks: tuple[str, ...]
    detection_rate: float
    threshold: float
    auc: float
    edit_mask_threshold: float
    undefined_share: float


@torch.no_grad()
def select_detection_layers(
    pipe,
    images: list[AnnotatedImage],
    candidates: list[tuple[str, ...]],
    target_fpr: float = 0.05,
    num_inference_steps: int = 25,
    progress: bool = True,
    max_undefined: float | None = None,
) -> list[LayerChoice]:
    """Ranks sets of detection layers for DAG's selective rule on annotated validation images.

    Each candidate is scored as if it were DAG's detection layers ([`presence_scores`] on the noised images, all
    candidates from one pass): the threshold that guides at most `target_fpr` of the safe images (of each group),
    and at it the share of unsafe images whose masked region is guided. The ranking is by that share, then by the
    image-level AUC. The paper reads fixed resolutions; which layers separate a concept from its look-alikes is the
    model's (a small model's best may be its full-resolution layers), hence a choice on data, which the embedding
    then carries (`DAGConfig.layers`).

    Args:
        pipe ([`DAGStableDiffusionPipeline`]): with DAG enabled on (at least) every candidate's layers, e.g.
            `enable_dag(embedding, layers=<all blocks>)`; its other settings are used.
        images (`list[AnnotatedImage]`): validation images: unsafe ones with a mask, safe ones (with groups).
        candidates (`list[tuple[str, ...]]`): sets of UNet module names (as `DAGConfig.layers`).
        max_undefined (`float`, *optional*): if given, each candidate is scored at its own edit threshold,
            [`choose_edit_threshold`] on the unsafe images with this `max_undefined` (layers differ in how broadly
            their concept rows attend); by default at DAG's.

    Returns:
        `list[LayerChoice]`, best first.

    Raises:
        `ValueError`: no safe or no unsafe image, a candidate name selects no layer, or DAG does not capture a
            candidate's layers.
    """
    state = pipe._dag
    if state is None:
        raise ValueError("`select_detection_layers` needs DAG; call `pipe.enable_dag(embedding)` first.")
    config = state.config
    unsafe = np.array([item.unsafe for item in images])
    if unsafe.all() or not unsafe.any():
        raise ValueError("Choosing layers needs safe images (no mask) and unsafe images (with a mask).")
    available = cross_attention_layers(getattr(pipe.unet, "_orig_mod", pipe.unet))
    sets = {tuple(blocks): list(select_layers(available, tuple(blocks))) for blocks in candidates}
    trajectories = evidence_trajectories(pipe, images, num_inference_steps, progress=progress, layer_sets=sets)
    groups = np.array([item.group or "" for item in images])[~unsafe]
    labels = np.arange(len(images)) < int(unsafe.sum())  # unsafe scores first
    choices = []
    for blocks, evidence in trajectories.evidence.items():
        unsafe_evidence = evidence[torch.from_numpy(unsafe)]
        if max_undefined is None:
            edit_threshold = config.edit_mask_threshold
            undefined = undefined_share(unsafe_evidence, edit_threshold, config.max_edit_area)
        else:
            edit = choose_edit_threshold(unsafe_evidence, config.unsafe_threshold, config.max_edit_area, max_undefined)
            edit_threshold, undefined = edit.threshold, edit.undefined_share
        found = scores_from_evidence(
            evidence,
            trajectories.masks,
            config.unsafe_threshold,
            edit_threshold,
            config.max_edit_area,
            components=config.components,
            basin_floor=config.basin_floor,
        )
        threshold = _lowest_threshold(found.any[~unsafe], target_fpr, groups)
        # images without a component score lowest
        auc = roc_auc(np.nan_to_num(np.concatenate([found.any[unsafe], found.any[~unsafe]]), neginf=-1.0), labels)
        detection_rate = float((found.target[unsafe] >= threshold).mean())
        choices.append(LayerChoice(blocks, detection_rate, threshold, float(auc), edit_threshold, undefined))
    return sorted(choices, key=lambda choice: (-choice.detection_rate, -choice.auc))
