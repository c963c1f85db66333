"""Frozen, validated configurations for SLD, SEGA and DAG guidance.

Field names of [`SLDConfig`] and [`SEGAConfig`] are the keyword arguments of diffusers' deprecated
`StableDiffusionPipelineSafe` and `SemanticStableDiffusionPipeline`, so settings carry over unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._validation import is_integer, is_real

__all__ = [
    "SLD_PRESETS",
    "SLD_SAFETY_CONCEPT",
    "DAGConfig",
    "SEGAConfig",
    "SLDConfig",
    "build_config",
]

SLD_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)
"""The default safety concept text of Safe Latent Diffusion (and of `StableDiffusionPipelineSafe`)."""


DETECTION_RULES = ("paper", "presence", "head")
FILL_REGIONS = ("nearest", "basin")
COMPONENT_RULES = ("threshold", "basin")
HOLD_REGIONS = ("component", "pixels")
GUIDANCE_FORMS = ("table1", "sega")
ERASE_MODES = ("guidance", "fill", "fill_final")
HEAD_POOLINGS = ("mean", "max", "std")
"""The statistics a presence head can pool a component's features by (`PresenceHead.pooling`)."""

HEAD_CAPTION_SWAPS = ("none", "unsafe", "all")
"""Which training images a presence head is also fitted on under a caption of the other class
(`fit_presence_head(swapped_captions=...)`)."""


def _check_field_types(config: Any) -> None:
    """Checks every field of a config dataclass against its annotation (`float`, `int`, `bool`,
    `tuple[float, ...]`): the ranges are checked after this, so every check below can assume the type."""
    for item in dataclasses.fields(config):
        name, value = item.name, getattr(config, item.name)
        if item.type == "float | None" and value is None:
            continue
        if item.type in ("float", "float | None"):
            if not is_real(value):
                raise ValueError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__}).")
            _check_finite(name, value)
        elif item.type == "int":
            if not is_integer(value):
                raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
        elif item.type == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__}).")
        elif item.type == "str":
            if not isinstance(value, str):
                raise ValueError(f"`{name}` must be a string, got {value!r} ({type(value).__name__}).")
        elif item.type == "tuple[str, ...] | None":
            if value is not None and (
                isinstance(value, (str, bytes))
                or not isinstance(value, Sequence)
                or not value
                or not all(isinstance(v, str) and v for v in value)
            ):
                raise ValueError(
                    f"`{name}` must be None or a non-empty sequence of layer names such as"
                    f" ('up_blocks.2.attentions.0',), got {value!r}."
                )
        elif item.type == "tuple[float, ...]":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(
                    f"`{name}` must be a sequence of numbers such as (0.5, 1.0), got {value!r} ({type(value).__name__})."
                )
            if not all(is_real(v) and math.isfinite(v) for v in value):
                raise ValueError(f"`{name}` must hold finite real numbers only, got {value!r}.")


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def _check_unit_interval(name: str, value: float, *, open_low: bool = True) -> None:
    _check_finite(name, value)
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"`{name}` must lie in {interval}, got {value!r}.")


def _check_non_negative(name: str, value: float) -> None:
    _check_finite(name, value)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def _check_steps(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer number of steps, got {value!r}.")


@dataclass(frozen=True)
class SLDConfig:
    """Safe Latent Diffusion (Schramowski et al.), as in diffusers' `StableDiffusionPipelineSafe`.

    Args:
        sld_guidance_scale (`float`, *optional*, defaults to 1000):
            Multiplier of `|e_p - e_s|` before clamping to 1; the per-element scale of the safety direction.
        sld_warmup_steps (`int`, *optional*, defaults to 10):
            Steps before the safety direction is applied (momentum still builds up during warm-up).
        sld_threshold (`float`, *optional*, defaults to 0.01):
            Elements with `e_p - e_s < sld_threshold` are guided; a difference in noise units, not a probability.
        sld_momentum_scale (`float`, *optional*, defaults to 0.3):
            Weight of the momentum term added to the safety direction.
        sld_mom_beta (`float`, *optional*, defaults to 0.4):
            Momentum decay, in `[0, 1]`.
    """

    sld_guidance_scale: float = 1000.0
    sld_warmup_steps: int = 10
    sld_threshold: float = 0.01
    sld_momentum_scale: float = 0.3
    sld_mom_beta: float = 0.4

    def __post_init__(self):
        _check_field_types(self)
        _check_non_negative("sld_guidance_scale", self.sld_guidance_scale)
        _check_steps("sld_warmup_steps", self.sld_warmup_steps)
        _check_finite("sld_threshold", self.sld_threshold)
        _check_non_negative("sld_momentum_scale", self.sld_momentum_scale)
        _check_unit_interval("sld_mom_beta", self.sld_mom_beta, open_low=False)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> SLDConfig:
        """The SLD presets `"weak"`, `"medium"`, `"strong"`, `"max"`, optionally with fields overridden."""
        if preset not in SLD_PRESETS:
            valid = ", ".join(repr(p) for p in SLD_PRESETS)
            raise ValueError(f"Unknown SLD preset {preset!r}; expected one of {valid} or None.")
        return dataclasses.replace(SLD_PRESETS[preset], **overrides)


SLD_PRESETS: dict[str, SLDConfig] = {
    name: SLDConfig(
        sld_guidance_scale=scale,
        sld_warmup_steps=warmup,
        sld_threshold=threshold,
        sld_momentum_scale=momentum,
        sld_mom_beta=beta,
    )
    for name, (scale, warmup, threshold, momentum, beta) in {
        "weak": (20, 15, 0.0, 0.0, 0.0),
        "medium": (1000, 10, 0.01, 0.3, 0.4),
        "strong": (2000, 7, 0.025, 0.5, 0.7),
        "max": (5000, 0, 1.0, 0.5, 0.7),
    }.items()
}
"""Safe Latent Diffusion's hyper-parameter presets (diffusers' `SafetyConfig`)."""


@dataclass(frozen=True)
class SEGAConfig:
    """Semantic guidance (Brack et al.) with a reversed safety concept, as in `SemanticStableDiffusionPipeline`.

    Args:
        edit_guidance_scale (`float`, *optional*, defaults to 5):
            Scale of the (reversed) concept direction. The DAG paper uses 10 for nudity.
        edit_warmup_steps (`int`, *optional*, defaults to 10):
            Steps before the edit is applied (momentum still builds up during warm-up).
        edit_threshold (`float`, *optional*, defaults to 0.9):
            Percentile in `(0, 1]`: per image and channel, only elements whose magnitude reaches this quantile
            over the `h×w` latent are guided.
        edit_momentum_scale (`float`, *optional*, defaults to 0.1):
            Weight of the momentum term.
        edit_mom_beta (`float`, *optional*, defaults to 0.4):
            Momentum decay, in `[0, 1]`.
    """

    edit_guidance_scale: float = 5.0
    edit_warmup_steps: int = 10
    edit_threshold: float = 0.9
    edit_momentum_scale: float = 0.1
    edit_mom_beta: float = 0.4

    def __post_init__(self):
        _check_field_types(self)
        _check_non_negative("edit_guidance_scale", self.edit_guidance_scale)
        _check_steps("edit_warmup_steps", self.edit_warmup_steps)
        _check_unit_interval("edit_threshold", self.edit_threshold)
        _check_non_negative("edit_momentum_scale", self.edit_momentum_scale)
        _check_unit_interval("edit_mom_beta", self.edit_mom_beta, open_low=False)


@dataclass(frozen=True)
class DAGConfig:
    """Detect-and-Guide settings (paper 3.2, Table 1, A.2, Algorithm 1).

    The safety direction of the base method (`base`: SEGA's percentile mask or SLD's threshold mask, and its
    momentum) is rescaled per latent pixel by `S_dag = S_area ⊙ T` and masked to the detected edit region.

    Args:
        base (`SEGAConfig` or `SLDConfig`, *optional*, defaults to `SEGAConfig()`):
            The base method. Only its mask (`edit_threshold` / `sld_threshold`) and momentum
            (`*_momentum_scale`, `*_mom_beta`) are used: DAG's scale map replaces the base scale, and DAG's own
            warm-up replaces the base warm-up.
        unsafe_threshold (`float`, *optional*, defaults to 0.5):
            `τ_u` in `(0, 1]`: pixels with `Â >= τ_u` form the unsafe components.
        edit_mask_threshold (`float`, *optional*, defaults to 0.01):
            `τ_e` in `(0, 1]`: pixels with `Â >= τ_e` form the edit region `M_edit`.
        base_scale (`float`, *optional*, defaults to 5):
            Numerator of the base scale `s̄ = base_scale / (h·w)`: a component covering `1/base_scale` of the
            latent gets `S_area = 1`.
        max_magnitude (`float`, *optional*, defaults to 5):
            Upper clip of the MagnitudeScaler `T = clip(Â / τ_e, 1, max_magnitude)`.
        max_edit_area (`float`, *optional*, defaults to 0.8):
            If the edit region covers at least this share of the latent, no object has formed yet ("mode
            undefined") and the step is left unguided.
        warmup_steps (`int`, *optional*, defaults to 5):
            Steps before DAG guides. Nothing beyond the plain classifier-free guidance pass runs during warm-up,
            and the momentum starts at the first guided step.
        area_scaler (`bool`, *optional*, defaults to `True`):
            `False` is the paper's ablation "DAG without AreaScaler": `S_area := 1` on `M_edit`.
        magnitude_scaler (`bool`, *optional*, defaults to `True`):
            `False` is the ablation "DAG without MagnitudeScaler": `T := 1` on `M_edit`.
        layer_fractions (`tuple[float, ...]`, *optional*, defaults to `(0.25, 0.5)`):
            Cross-attention layers whose query side is this fraction of the latent side are used for detection
            (16² and 32² for a 64² latent).
        layers (`tuple[str, ...]`, *optional*):
            The detection layers by name instead, overriding `layer_fractions`: each name selects the
            cross-attention (`attn2`) layers under that UNet module, e.g. `"up_blocks.2.attentions.0"`. An embedding
            optimized on named layers (`dag-safety optimize --layers`) brings them.
        guidance_form (`str`, *optional*, defaults to `"table1"`):
            Where the classifier-free scale `s_g` meets DAG's term `g` (the paper leaves it open):
            `"table1"`, the paper's Table 1 read literally, `e = e_u + s_g ((e_p - e_u) - g)`, so DAG's push grows
            with the guidance scale; `"sega"`, SEGA's own form (which A.2's "editing strength" refers to),
            `e = e_u + s_g (e_p - e_u) - g`, a push independent of it. Since `g` is linear in `base_scale`, at a
            fixed guidance scale `"sega"` with `base_scale · s_g` is `"table1"` with `base_scale`; a saved
            embedding's base scale is calibrated for `"table1"`.
        detection (`str`, *optional*, defaults to `"paper"`):
            Which components DAG guides. `"paper"`: every component of `Â >= unsafe_threshold` (the paper's rule,
            Algorithm 1; `Â` is min-max normalised per image, so every image has one). `"presence"`: only the
            components whose presence evidence reaches `presence_threshold` (beyond the paper; README): the evidence of a pixel is
            the summed attention share of the concept rows (`1 -` the start-of-text share, `(0, 1)`), smoothed
            over the guided steps by `presence_smoothing`, and a component's score is its mean over the
            component. A threshold is a property of the embedding, calibrated for a false-detection rate on
            validation images (`dag-safety optimize --target-fpr`), so the field default stays the paper's rule
            and a calibrated saved embedding brings `"presence"` and its threshold as its defaults. `"head"`: the
            components of the same `Â` are judged by the embedding's presence head instead (beyond the paper;
            `dag_safety.presence_head`): a read-out of the component's pooled features (cross-attention layer
            inputs, smoothed over the guided steps by `presence_smoothing`, pooled by the head's `pooling`), its
            score the head's probability. Needs an embedding with a head (`dag-safety calibrate --presence-head`).
        presence_threshold (`float`, *optional*):
            The calibrated threshold on a component's presence score (under `"head"`, the head's probability), in
            `(0, 1)`; required by `"presence"` and `"head"`.
        presence_smoothing (`float`, *optional*, defaults to 0.5):
            `β` in `[0, 1)` of the evidence's running mean over guided steps, `ē_t = β ē_{t-1} + (1 - β) r_t`
            (`ē` starts as the first guided step's `r`). `0` judges each step on its own. Both `Â` and the scores
            come from `ē` under `"presence"`.
        hold_detection (`bool`, *optional*, defaults to `False`):
            Under `"presence"` and `"head"` (beyond the paper; README): once a component has been guided, a
            component of a later step's `Â` that overlaps any pixel of the components guided at earlier steps is
            guided whatever its score. Guidance then follows the object it found while the object fades, instead
            of stopping whenever the fading object's score dips below the threshold and letting it form again; it
            never moves to an object elsewhere. The first guided step is unchanged, so a calibrated
            false-detection rate still holds.
        fill_decay (`float`, *optional*):
            How the AreaScaler's SpatialInterpolate fills the edit band around a component (beyond the paper;
            README). `None`: every edit pixel takes its nearest component's full scale. A positive `λ`: the scale
            decays as `exp(-d / (λ r))` with the pixel's distance `d` (latent pixels) to its nearest component and
            that component's equivalent radius `r = sqrt(area / π)`, so a band pixel one radius away keeps
            `exp(-1/λ)` of it. Measured in `benchmarks/RESULTS.md` ("A fill that decays with distance"). Needs
            `area_scaler=True` (the ablation has no fill to shape).
        fill_region (`str`, *optional*, defaults to `"nearest"`):
            Which component's scale an edit pixel outside the components takes. `"nearest"`: the nearest
            component's (our reading of the paper's SpatialInterpolate). `"basin"` (beyond the paper; README): the
            scale of the component it ascends to along `Â`'s steepest rise, and none if it rises to a peak of `Â`
            outside the components, which is another object's (`dag_safety.guidance.ascent_owners`): the band
            around a detected object stops where the slope turns up towards a neighbour, so a co-object too weak in
            `Â` to form a component of its own is not guided for lying near the unsafe one. With `fill_decay`, the
            distance is to the component ascended to.
        norm_cap (`float`, *optional*):
            `κ > 0` (beyond the paper; README): at every pixel DAG guides, the guided noise prediction's norm over
            the latent channels is capped at `κ` times the classifier-free prediction's (`e_u + s_g (e_p - e_u)`),
            keeping its direction. `None` (the paper's): no cap. Strong guidance drives a guided pixel's latents far
            out of their range (on the mini model at base scale 800: |z| up to 40 against 4), and the GroupNorms of
            the UNet and the VAE decoder carry that to the whole image, co-objects and background included.
            Pixels DAG does not guide are never changed.
        hold_region (`str`, *optional*, defaults to `"component"`):
            With `hold_detection=True`, what a held component (one whose score fails but which overlaps the pixels
            guided before) is guided on. `"component"`: all of it and its edit band. `"pixels"`: only its pixels
            among those guided before, without a band, so held guidance cannot spread to a neighbour that a later
            step's component of `Â` takes in once the object has faded.
        erase_mode (`str`, *optional*, defaults to `"guidance"`):
            What DAG does at the pixels it guides (`S_dag > 0`). `"guidance"`: the paper's, the base method's safety
            direction scaled by `S_dag` (above). `"fill"` (beyond the paper; README): the prediction there is
            replaced by the one whose clean-latent estimate `x̂_0` is that of the nearest pixel DAG does not guide
            (equidistant ones averaged; `dag_safety.fill.fill_noise_pred`), so the guided region takes on its
            surroundings while its latents stay in their range at any strength. `S_dag` then only says where: its
            values, the base method's mask and momentum are unused, and no safety-concept pass runs. Needs a
            scheduler with `alphas_cumprod` (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...) and an `"epsilon"`,
            `"v_prediction"` or `"sample"` prediction type. `"fill_final"` (beyond the paper; README): DAG detects
            at every step as under `"fill"` but changes nothing until the scheduler's last timestep; there it fills,
            from the surroundings, the pixels guided at any of the last `fill_window` steps, grown by up to
            `fill_growth` pixels over the object they lie on (`dag_safety.fill.final_fill_noise_pred`). Sampling
            never fights the prompt, so the model neither redraws the object beside the region nor lets it leak
            into the rest of the image; the object is taken out of the finished sample. Same scheduler needs as
            `"fill"`. Under it, every step before the last is the classifier-free one, bit for bit; the
            `"dag_scale"` callback input still shows each step's `S_dag`, what the final fill will cover.
        fill_window (`int`, *optional*, defaults to 8):
            With `erase_mode="fill_final"`: how many of the last steps' guided regions the final fill covers, `>= 1`.
            A detection map's peaks move over the object from step to step, so their union covers more of it.
        fill_growth (`int`, *optional*, defaults to 2):
            With `erase_mode="fill_final"`: the most latent pixels the region grows by over the object in `x̂_0`
            (`dag_safety.fill.grow_region`: into pixels that stand out from the background), `>= 0`.
        fill_contrast (`float`, *optional*, defaults to 2.0):
            With `erase_mode="fill_final"`: how far from the background, in units of the background's own spread
            in `x̂_0`, a pixel must lie for the region to grow into it (`dag_safety.fill.grow_region`), `> 0`.
            Lower takes in an object's faint edges too, which the decoder otherwise draws as a smudge where the
            object was, and more of what touches it. 2 (the fill as first built used 3) leaves a third less of the
            mini model's erased red stars on its tuning seeds' complex scenes, for one co-object of 75 and a few
            pixels of a close neighbour's rim (`benchmarks/RESULTS.md`, "How far the final fill grows").
        components (`str`, *optional*, defaults to `"threshold"`):
            How `Â` forms the candidate components every rule judges. `"threshold"`: the paper's, the 8-connected
            regions of `Â >= unsafe_threshold`. `"basin"` (beyond the paper; README): one component per peak of `Â`
            reaching `basin_floor`, the pixels that ascend to it with `Â >= unsafe_threshold ·` its height
            (`dag_safety.guidance.basin_components`), so an object fainter in `Â` than a look-alike elsewhere in
            the image is still a candidate, and two touching objects are two. Meant for a selective rule, which
            judges each candidate on its own; under `"paper"` every peak would be guided. A presence head must be
            fitted and calibrated on the candidates it will judge (`dag-safety calibrate --default-components`).
            Measured in `benchmarks/RESULTS.md` ("One candidate per peak of `Â`").
        basin_floor (`float`, *optional*, defaults to 0.25):
            With `components="basin"`: the lowest peak of `Â` that forms a component, in `(0, 1]` (at least
            `edit_mask_threshold` in effect). The default is half the paper's cut: on the mini model a red star
            beside a brighter look-alike peaks at 0.40-0.75, and the flat remainder of a map at or near 0.
        confirm_steps (`int`, *optional*, defaults to 1):
            Under `"presence"` and `"head"` (beyond the paper; README): DAG guides an image only from the step at
            which, for the `confirm_steps`-th time (steps need not be consecutive), one of its components passes
            `presence_threshold`; until then every step is the classifier-free one, and from then on the rule (and
            the hold) runs as with 1. The unit is the image, not the component, so that a calibration stays exact:
            an image is guided at all exactly when the `confirm_steps`-th highest of its steps' peak scores
            reaches the threshold, which is what `presence_scores` then reports. `1` (the default) guides from the
            first pass. A threshold is calibrated for one value (`dag-safety calibrate --default-confirm-steps`).
            Measured in `benchmarks/RESULTS.md` ("Confirming a detection over steps").
    """

    base: SEGAConfig | SLDConfig = field(default_factory=SEGAConfig)
    unsafe_threshold: float = 0.5
    edit_mask_threshold: float = 0.01
    base_scale: float = 5.0
    max_magnitude: float = 5.0
    max_edit_area: float = 0.8
    warmup_steps: int = 5
    area_scaler: bool = True
    magnitude_scaler: bool = True
    layer_fractions: tuple[float, ...] = (0.25, 0.5)
    layers: tuple[str, ...] | None = None
    guidance_form: str = "table1"
    detection: str = "paper"
    presence_threshold: float | None = None
    presence_smoothing: float = 0.5
    hold_detection: bool = False
    fill_decay: float | None = None
    fill_region: str = "nearest"
    norm_cap: float | None = None
    hold_region: str = "component"
    erase_mode: str = "guidance"
    fill_window: int = 8
    fill_growth: int = 2
    fill_contrast: float = 2.0
    components: str = "threshold"
    basin_floor: float = 0.25
    confirm_steps: int = 1

    def __post_init__(self):
        if not isinstance(self.base, (SEGAConfig, SLDConfig)):
            # ValueError as for every other bad DAGConfig field (tested)
            raise ValueError(f"`base` must be a SEGAConfig or an SLDConfig, got {type(self.base).__name__}.")  # noqa: TRY004
        _check_field_types(self)
        _check_unit_interval("unsafe_threshold", self.unsafe_threshold)
        _check_unit_interval("edit_mask_threshold", self.edit_mask_threshold)
        if self.edit_mask_threshold > self.unsafe_threshold:
            raise ValueError(
                f"`edit_mask_threshold` ({self.edit_mask_threshold}) must not exceed `unsafe_threshold`"
                f" ({self.unsafe_threshold}): the edit region has to contain the unsafe components."
            )
        _check_non_negative("base_scale", self.base_scale)
        _check_finite("max_magnitude", self.max_magnitude)
        if self.max_magnitude < 1:
            raise ValueError(f"`max_magnitude` must be >= 1, got {self.max_magnitude!r}.")
        _check_unit_interval("max_edit_area", self.max_edit_area)
        _check_steps("warmup_steps", self.warmup_steps)
        fractions = tuple(self.layer_fractions)
        if not fractions or any(not (0 < f <= 1) for f in fractions):
            raise ValueError(
                f"`layer_fractions` must be a non-empty tuple of fractions in (0, 1] of the latent side,"
                f" got {self.layer_fractions!r}."
            )
        object.__setattr__(self, "layer_fractions", fractions)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.guidance_form not in GUIDANCE_FORMS:
            raise ValueError(f"`guidance_form` must be one of {list(GUIDANCE_FORMS)}, got {self.guidance_form!r}.")
        if self.norm_cap is not None and self.norm_cap <= 0:
            raise ValueError(f"`norm_cap` must be None (no cap) or a finite factor > 0, got {self.norm_cap!r}.")
        if self.hold_region not in HOLD_REGIONS:
            raise ValueError(f"`hold_region` must be one of {list(HOLD_REGIONS)}, got {self.hold_region!r}.")
        if self.hold_region != "component" and not self.hold_detection:
            raise ValueError("`hold_region` shapes the hold: pass `hold_detection=True` with it, or drop it.")
        if self.erase_mode not in ERASE_MODES:
            raise ValueError(f"`erase_mode` must be one of {list(ERASE_MODES)}, got {self.erase_mode!r}.")
        if self.erase_mode != "guidance" and self.norm_cap is not None:
            raise ValueError(
                f'`norm_cap` shortens the safety guidance, which `erase_mode="{self.erase_mode}"` does not apply (it'
                " sets the guided pixels' prediction from their surroundings): drop `norm_cap`, or use"
                ' `erase_mode="guidance"`.'
            )
        if self.fill_window < 1:
            raise ValueError(f"`fill_window` must be a number of steps >= 1, got {self.fill_window!r}.")
        if self.fill_growth < 0:
            raise ValueError(f"`fill_growth` must be a number of latent pixels >= 0, got {self.fill_growth!r}.")
        if self.fill_contrast <= 0:
            raise ValueError(
                f"`fill_contrast` must be a number of background spreads > 0, got {self.fill_contrast!r}."
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.erase_mode != "fill_final" and any(
            getattr(self, name) != defaults[name] for name in ("fill_window", "fill_growth", "fill_contrast")
        ):
            raise ValueError(
                "`fill_window`, `fill_growth` and `fill_contrast` shape the final fill: pass"
                ' `erase_mode="fill_final"` with them, or drop them.'
            )
        if self.components != "basin" and self.basin_floor != defaults["basin_floor"]:
            raise ValueError(
                '`basin_floor` shapes the basin components: pass `components="basin"` with it, or drop it.'
            )
        if self.fill_region not in FILL_REGIONS:
            raise ValueError(f"`fill_region` must be one of {list(FILL_REGIONS)}, got {self.fill_region!r}.")
        if self.components not in COMPONENT_RULES:
            raise ValueError(f"`components` must be one of {list(COMPONENT_RULES)}, got {self.components!r}.")
        _check_unit_interval("basin_floor", self.basin_floor)
        if self.detection not in DETECTION_RULES:
            raise ValueError(f"`detection` must be one of {list(DETECTION_RULES)}, got {self.detection!r}.")
        if self.detection != "paper" and self.presence_threshold is None:
            raise ValueError(
                f'`detection="{self.detection}"` needs `presence_threshold`: use an embedding calibrated by'
                " `dag-safety optimize --target-fpr` (it carries its threshold), pass `presence_threshold=...`, or"
                ' choose `detection="paper"`.'
            )
        if self.confirm_steps < 1:
            raise ValueError(f"`confirm_steps` must be a number of guided steps >= 1, got {self.confirm_steps!r}.")
        if self.detection == "paper" and self.confirm_steps != 1:
            raise ValueError(
                "`confirm_steps` counts the steps at which a selective rule's threshold is passed, and the paper's"
                ' rule has none: use it with `detection="presence"` or `"head"`, or drop it.'
            )
        if self.presence_threshold is not None and not 0 < self.presence_threshold < 1:
            raise ValueError(f"`presence_threshold` must be in (0, 1), got {self.presence_threshold!r}.")
        if not 0 <= self.presence_smoothing < 1:
            raise ValueError(f"`presence_smoothing` must be in [0, 1), got {self.presence_smoothing!r}.")
        if self.fill_decay is not None:
            if self.fill_decay <= 0:
                raise ValueError(
                    f"`fill_decay` must be None (full-scale fill) or a decay length > 0, got {self.fill_decay!r}."
                )
            if not self.area_scaler:
                raise ValueError(
                    "`fill_decay` shapes the AreaScaler's fill, which `area_scaler=False` replaces by 1 on the whole"
                    " edit region: drop `fill_decay` or keep `area_scaler=True`."
                )

    @property
    def momentum_scale(self) -> float:
        return self.base.edit_momentum_scale if isinstance(self.base, SEGAConfig) else self.base.sld_momentum_scale

    @property
    def mom_beta(self) -> float:
        return self.base.edit_mom_beta if isinstance(self.base, SEGAConfig) else self.base.sld_mom_beta


# How DAG forms the candidates its rule judges and erases what it detects. A saved embedding may bring its own
# with its default rule (`state._saved_defaults`); these are the paper's.
PAPER_ERASE_SETTINGS = {
    f.name: f.default
    for f in dataclasses.fields(DAGConfig)
    if f.name in ("hold_detection", "fill_region", "erase_mode", "components", "confirm_steps")
}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_config(guidance: str, preset: str | None = None, **options: Any) -> SEGAConfig | SLDConfig:
    """Builds the base safety-guidance configuration from a method name (`"sld"` or `"sega"`), an optional SLD
    preset and overrides.

    Raises:
        `ValueError`: unknown method, unknown preset, a preset with SEGA, or an option the method does not have.
    """
    methods = {"sld": SLDConfig, "sega": SEGAConfig}
    if guidance not in methods:
        raise ValueError(f"Unknown guidance method {guidance!r}; expected one of {', '.join(map(repr, methods))}.")
    cls = methods[guidance]
    unknown = sorted(set(options) - _field_names(cls))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for {guidance!r} guidance; valid options: {sorted(_field_names(cls))}."
        )
    if preset is not None:
        if cls is not SLDConfig:
            raise ValueError(f"Presets exist for SLD only; got preset={preset!r} with guidance={guidance!r}.")
        return SLDConfig.from_preset(preset, **options)
    return cls(**options)


def split_dag_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits `enable_dag(**options)` into `DAGConfig` fields and base-method fields (validated later)."""
    dag_fields = _field_names(DAGConfig) - {"base"}
    return (
        {k: v for k, v in options.items() if k in dag_fields},
        {k: v for k, v in options.items() if k not in dag_fields},
    )
