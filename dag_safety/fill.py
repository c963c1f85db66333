"""Erasing by filling (beyond the paper; README): a region's clean-latent estimate `x̂_0` set from its surroundings.

`erase_mode="fill"` fills the pixels DAG guides at every guided step ([`fill_noise_pred`]); `erase_mode="fill_final"`
leaves sampling alone and fills once, at the last step, the regions guided over the last steps grown over the
object's extent in `x̂_0` ([`grow_region`], [`final_fill_noise_pred`]). Both return a noise prediction in the
scheduler's own parameterisation, so any pipeline's loop applies them unchanged.

All latents are `(B, C, h, w)`, regions `(B, h, w)` bool.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "PREDICTION_TYPES",
    "alpha_prod_at",
    "check_fill_scheduler",
    "fill_from_surroundings",
    "fill_noise_pred",
    "final_alpha_prod",
    "final_fill_noise_pred",
    "grow_region",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def alpha_prod_at(scheduler, timestep: float | torch.Tensor) -> float:
    """`ᾱ_t` of a DDPM-type scheduler (one with `alphas_cumprod`) at a UNet timestep, as a float in `[0, 1]`.

    A fractional timestep (Euler-type schedulers with interpolated timesteps) interpolates
    `σ = sqrt((1 - ᾱ) / ᾱ)` linearly between the neighbouring integer timesteps, as those schedulers build their
    sigmas; an integer timestep reads `alphas_cumprod` as it is.

    Raises:
        `ValueError`: the scheduler has no `alphas_cumprod` (e.g. flow matching), naming it.
    """
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ValueError(
            '`erase_mode="fill"` and `"fill_final"` need a DDPM-type scheduler with `alphas_cumprod`; the pipeline'
            f' has {type(scheduler).__name__}. Use `erase_mode="guidance"`, or a DDIM, PNDM, Euler or DPM-Solver'
            " scheduler."
        )
    alphas = torch.as_tensor(alphas, dtype=torch.float64).cpu()
    t = float(torch.as_tensor(timestep).flatten()[0])
    low = min(max(math.floor(t), 0), len(alphas) - 1)
    high = min(low + 1, len(alphas) - 1)
    if t == low or high == low:
        return float(alphas[low])
    sigmas = ((1 - alphas[[low, high]]) / alphas[[low, high]]).sqrt()
    sigma = sigmas[0] + (t - low) * (sigmas[1] - sigmas[0])
    return float(1 / (1 + sigma**2))


def final_alpha_prod(scheduler) -> float:
    """`ᾱ` of the sample the scheduler's last step returns: DDIM's (and PNDM's) `final_alpha_cumprod`, else 1 (the
    last step of DDPM, Euler and DPM-Solver returns the clean estimate itself)."""
    return float(getattr(scheduler, "final_alpha_cumprod", 1.0))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f'`erase_mode="fill"` and `"fill_final"` support the prediction types {list(PREDICTION_TYPES)}, but the'
            f' scheduler predicts {prediction_type!r}. Use `erase_mode="guidance"`.'
        )


def check_fill_scheduler(scheduler) -> None:
    """Raises a `ValueError` naming the problem if the fill modes cannot read `x̂_0` with this scheduler (no
    `alphas_cumprod`, or a prediction type other than `PREDICTION_TYPES`)."""
    alpha_prod_at(scheduler, 0)
    _check_prediction_type(getattr(scheduler.config, "prediction_type", None))


def _clean_and_noise(
    noise_pred: torch.Tensor, latents: torch.Tensor, signal: float, noise: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x̂_0, ε̂)` of a prediction at `x_t = signal · x̂_0 + noise · ε̂` (`signal > 0` for `"epsilon"`, `noise > 0`
    for `"sample"`)."""
    if prediction_type == "epsilon":
        return (latents - noise * noise_pred) / signal, noise_pred
    if prediction_type == "v_prediction":
        return signal * latents - noise * noise_pred, noise * latents + signal * noise_pred
    return noise_pred, (latents - signal * noise_pred) / noise


def _prediction(clean: torch.Tensor, eps: torch.Tensor, signal: float, noise: float, prediction_type: str):
    """The prediction of type `prediction_type` whose `(x̂_0, ε̂)` is `(clean, eps)`."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return signal * eps - noise * clean
    return clean


def fill_from_surroundings(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`values` with each pixel of `region` set to the value of its nearest pixel outside `region` (Euclidean
    distance on the grid; equidistant nearest pixels are averaged, so the result does not hang on a tie-break).

    An image whose region is empty or covers every pixel is returned as it is (there is nothing to fill from).

    Args:
        values (`torch.Tensor`): `(B, C, h, w)`.
        region (`torch.Tensor`): `(B, h, w)` bool.
    """
    filled = values.clone()
    ring_kernel = np.ones((3, 3), dtype=bool)
    for i, mask in enumerate(region.cpu().numpy().astype(bool)):
        if mask.all() or not mask.any():
            continue
        # the nearest outside pixel of any region pixel touches the region (a step from it towards the region
        # pixel is closer), so only the ring around the region is searched; integer squared distances tie exactly
        ring = ndimage.binary_dilation(mask, ring_kernel) & ~mask
        inside = torch.from_numpy(np.argwhere(mask).astype(np.int32))
        outside = torch.from_numpy(np.argwhere(ring).astype(np.int32))
        distance = ((inside[:, None] - outside[None]) ** 2).sum(-1)
        nearest = (distance == distance.min(dim=1, keepdim=True).values).to(values.dtype).to(values.device)
        ring_values = values[i][:, outside[:, 0], outside[:, 1]]
        filled[i][:, inside[:, 0], inside[:, 1]] = (ring_values @ nearest.T) / nearest.sum(dim=1)
    return filled


def _usable(region: torch.Tensor) -> torch.Tensor:
    """`region` without the images whose region covers every pixel (nothing to fill from)."""
    full = region.flatten(1).all(dim=1)
    return region & ~full[:, None, None]


def fill_noise_pred(
    noise_pred: torch.Tensor,
    latents: torch.Tensor,
    alpha_prod: float,
    region: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """`erase_mode="fill"`: the prediction whose clean-latent estimate `x̂_0` is, at each pixel of `region`, that of
    its nearest pixel outside `region` ([`fill_from_surroundings`]).

    `x̂_0` is the scheduler's own estimate from `x_t` and the prediction: `x̂_0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)`
    (`"epsilon"`), `sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v` (`"v_prediction"`), the prediction itself (`"sample"`); the
    filled estimate is turned back into the same parameterisation. Outside `region` the prediction is returned
    unchanged, bit for bit. Nothing is filled in an image whose region is empty or covers every pixel (there is
    nothing to fill from; DAG's `max_edit_area` leaves such a step unguided), nor at `ᾱ = 0` with `"epsilon"` (pure
    noise, where no `x̂_0` can be read) or at `ᾱ = 1` with `"epsilon"` / `"v_prediction"` (no noise left to set).

    Args:
        noise_pred (`torch.Tensor`): the classifier-free prediction, `(B, C, h, w)`.
        latents (`torch.Tensor`): `x_t`, the UNet's input for it, `(B, C, h, w)`.
        alpha_prod (`float`): `ᾱ_t` in `[0, 1]` ([`alpha_prod_at`]).
        region (`torch.Tensor`): `(B, h, w)` bool, the pixels to fill.
        prediction_type (`str`): the scheduler's, one of `PREDICTION_TYPES`.
    """
    _check_prediction_type(prediction_type)
    signal, noise = math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    if prediction_type != "sample" and (noise == 0 or (prediction_type == "epsilon" and signal == 0)):
        return noise_pred
    region = _usable(region.cpu())
    if prediction_type == "sample":
        target = fill_from_surroundings(noise_pred, region)
    else:
        filled = fill_from_surroundings(
            _clean_and_noise(noise_pred, latents, signal, noise, prediction_type)[0], region
        )
        target = _prediction(filled, (latents - signal * filled) / noise, signal, noise, prediction_type)
    return torch.where(region[:, None].to(noise_pred.device), target.to(noise_pred.dtype), noise_pred)


def grow_region(region: torch.Tensor, clean: torch.Tensor, steps: int, contrast: float = 3.0) -> torch.Tensor:
    """`region` grown by up to `steps` latent pixels over the object it lies on, read from `x̂_0`.

    Per image, the background is the pixels more than two pixels (8-connected) from `region`: its median `x̂_0`
    `b` and the median distance `d̃` of its pixels to `b` (norm over the channels). A pixel is foreground when its
    `x̂_0` lies farther than `contrast · d̃` from `b`; the region then grows `steps` times by one 8-connected pixel
    into foreground pixels. So it takes in the rest of an object it covers part of (a detection map's peaks lie
    on part of the object only) and stops at the background; on a busy background, where most pixels are
    foreground, it is at most the region dilated by `steps`. An image whose region is empty, or leaves fewer than
    8 background pixels, is returned as it is.

    Args:
        region (`torch.Tensor`): `(B, h, w)` bool.
        clean (`torch.Tensor`): `x̂_0`, `(B, C, h, w)`.
        steps (`int`): the most pixels to grow by, `>= 0`.
        contrast (`float`, *optional*, defaults to 3.0): how far from the background, in units of its own spread,
            foreground begins.

    Returns:
        `torch.Tensor`: `(B, h, w)` bool on the device of `region`, containing `region`.
    """
    if steps == 0:
        return region
    masks = region.cpu().numpy().astype(bool)
    values = clean.detach().float().cpu().numpy()
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        background = ~ndimage.binary_dilation(mask, _EIGHT_CONNECTED, iterations=2)
        if background.sum() < 8:
            continue
        median = np.median(values[i][:, background], axis=1)
        distance = np.linalg.norm(values[i] - median[:, None, None], axis=0)
        foreground = distance > contrast * np.median(distance[background])
        for _ in range(steps):
            mask = mask | (ndimage.binary_dilation(mask, _EIGHT_CONNECTED) & foreground)
        masks[i] = mask
    return torch.from_numpy(masks).to(region.device)


def final_fill_noise_pred(
    noise_pred: torch.Tensor,
    latents: torch.Tensor,
    alpha_prod: float,
    final_alpha: float,
    region: torch.Tensor,
    prediction_type: str,
    growth: int = 0,
    contrast: float = 3.0,
) -> torch.Tensor:
    """`erase_mode="fill_final"` at the last step: `region` grown by up to `growth` pixels over the object in the
    prediction's `x̂_0` ([`grow_region`], with `contrast`), and the prediction whose DDIM step to `ᾱ = final_alpha`
    lands each pixel of it on `sqrt(final_alpha) x̂_0' + sqrt(1 - final_alpha) ε̂`, where `x̂_0'` is the clean
    estimate filled from the surroundings ([`fill_from_surroundings`]) and `ε̂` the prediction's own noise estimate.

    At `final_alpha = 1` (a scheduler whose last step returns the clean estimate) this is [`fill_noise_pred`]. Below
    it (DDIM's `final_alpha_cumprod`), [`fill_noise_pred`] would carry the object's remainder in `x_t`, that is
    `sqrt(1 - final_alpha) / sqrt(1 - ᾱ_t)` of it, into the returned sample through the noise estimate it implies;
    this prediction keeps the noise estimate of the classifier-free one instead. Outside `region` the prediction is
    returned unchanged, bit for bit; nothing is filled in an image whose region is empty or covers every pixel, nor
    when `ᾱ_t` is 0 or 1 or equals `final_alpha` (no step to solve for).

    Args:
        noise_pred (`torch.Tensor`): the classifier-free prediction, `(B, C, h, w)`.
        latents (`torch.Tensor`): `x_t`, `(B, C, h, w)`.
        alpha_prod (`float`): `ᾱ_t` of the last step ([`alpha_prod_at`]).
        final_alpha (`float`): `ᾱ` of the returned sample ([`final_alpha_prod`]).
        region (`torch.Tensor`): `(B, h, w)` bool.
        prediction_type (`str`): the scheduler's, one of `PREDICTION_TYPES`.
        growth (`int`, *optional*, defaults to 0): [`grow_region`]'s `steps`.
        contrast (`float`, *optional*, defaults to 3.0): [`grow_region`]'s `contrast`.
    """
    _check_prediction_type(prediction_type)
    if not 0 < alpha_prod < 1 or alpha_prod == final_alpha:
        return noise_pred
    signal, noise = math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    final_signal, final_noise = math.sqrt(final_alpha), math.sqrt(1 - final_alpha)
    clean, eps = _clean_and_noise(noise_pred, latents, signal, noise, prediction_type)
    region = _usable(grow_region(region.cpu(), clean, growth, contrast))
    target = final_signal * fill_from_surroundings(clean, region) + final_noise * eps
    # the (x̂_0, ε̂) pair with signal · x̂_0 + noise · ε̂ = x_t whose DDIM step gives `target`
    det = signal * final_noise - noise * final_signal
    solved_clean = (latents * final_noise - noise * target) / det
    solved_eps = (signal * target - final_signal * latents) / det
    solved = _prediction(solved_clean, solved_eps, signal, noise, prediction_type)
    return torch.where(region[:, None].to(noise_pred.device), solved.to(noise_pred.dtype), noise_pred)
