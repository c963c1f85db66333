"""`erase_mode="fill"` and `"fill_final"` (beyond the paper): a region's prediction set from its surroundings' `x̂_0`.

The oracles are independent of the package: diffusers' own schedulers read `x̂_0` from the returned prediction
(`DDIMScheduler.step(...).pred_original_sample`), step to the returned sample and give the noise level of a
fractional timestep (Euler's `sigmas`); the nearest outside pixels are found by brute force over every pixel, and
the pixels of an object a region can grow over by a breadth-first search over its drawn mask.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from dag_safety.config import DAGConfig
from dag_safety.fill import (
    alpha_prod_at,
    check_fill_scheduler,
    fill_noise_pred,
    final_alpha_prod,
    final_fill_noise_pred,
    grow_region,
)


def nearest_outside_mean(clean: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`(C, h, w)`: at each region pixel, the mean of `clean` over the outside pixels at the least distance."""
    out = clean.copy()
    outside = np.argwhere(~region)
    for y, x in np.argwhere(region):
        distance = ((outside - (y, x)) ** 2).sum(axis=1)
        ties = outside[distance == distance.min()]
        out[:, y, x] = clean[:, ties[:, 0], ties[:, 1]].mean(axis=1)
    return out


REGION = np.zeros((2, 8, 8), dtype=bool)
REGION[0, 2:5, 1:4] = True  # a block: its centre is equally near four outside pixels
REGION[0, 6, 6] = True
REGION[1, 0:3, 5:8] = True  # against the border


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_filled_prediction_gives_the_scheduler_the_surroundings_clean_estimate(prediction_type):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[3]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise_pred = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    region = torch.from_numpy(REGION)

    filled = fill_noise_pred(noise_pred, latents, alpha_prod_at(scheduler, timestep), region, prediction_type)

    outside = ~region[:, None].expand_as(filled)
    assert torch.equal(filled[outside], noise_pred[outside])
    before = scheduler.step(noise_pred, timestep, latents).pred_original_sample.numpy()
    after = scheduler.step(filled, timestep, latents).pred_original_sample.numpy()
    for i in range(2):
        expected = nearest_outside_mean(before[i], REGION[i])
        # the scheduler holds ᾱ in float32
        np.testing.assert_allclose(after[i], expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(after, before)  # the region did change


def test_fill_leaves_images_with_an_empty_or_full_region_alone():
    latents, noise_pred = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    region = torch.zeros(2, 5, 5, dtype=torch.bool)
    region[1] = True
    filled = fill_noise_pred(noise_pred, latents, 0.5, region, "epsilon")
    assert torch.equal(filled, noise_pred)


def test_alpha_prod_at_matches_euler_sigmas_at_fractional_timesteps():
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="linspace")
    scheduler.set_timesteps(7)
    fractional = [t for t in scheduler.timesteps.tolist() if t != int(t)]
    assert fractional, "the oracle needs interpolated timesteps"
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        assert alpha_prod_at(scheduler, timestep) == pytest.approx(1 / (1 + sigma**2), rel=1e-5)


def test_schedulers_that_cannot_fill_are_refused_with_the_fix():
    with pytest.raises(ValueError, match='erase_mode="fill".*FlowMatchEulerDiscreteScheduler.*erase_mode="guidance"'):
        check_fill_scheduler(FlowMatchEulerDiscreteScheduler())
    scheduler = DDIMScheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction types.*'flow'"):
        check_fill_scheduler(scheduler)
    check_fill_scheduler(DDIMScheduler(prediction_type="v_prediction"))


def test_config_checks_erase_mode():
    with pytest.raises(ValueError, match="`erase_mode` must be one of"):
        DAGConfig(erase_mode="inpaint")
    with pytest.raises(ValueError, match="norm_cap.*erase_mode"):
        DAGConfig(erase_mode="fill", norm_cap=2.0)


def final_scheduler(kind: str, prediction_type: str):
    """A scheduler set to 10 steps; DDIM without `set_alpha_to_one` ends at `ᾱ_0 < 1`, DDPM at `ᾱ = 1`."""
    if kind == "ddim":
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    else:
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    return scheduler


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_final_fill_lands_the_last_step_on_the_filled_estimate(kind, prediction_type):
    scheduler = final_scheduler(kind, prediction_type)
    timestep = scheduler.timesteps[-1]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise_pred = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    region = torch.from_numpy(REGION)
    final_alpha = final_alpha_prod(scheduler)
    assert (final_alpha < 1) == (kind == "ddim")

    filled = final_fill_noise_pred(noise_pred, latents, alpha_prod_at(scheduler, timestep), final_alpha, region,
                                   prediction_type)  # fmt: skip

    outside = ~region[:, None].expand_as(filled)
    assert torch.equal(filled[outside], noise_pred[outside])
    before = scheduler.step(noise_pred, timestep, latents)
    after = scheduler.step(filled, timestep, latents).prev_sample.numpy()
    clean, sample = before.pred_original_sample.numpy(), before.prev_sample.numpy()
    # the classifier-free step's own noise estimate, read off its sample (DDIM: s_f x̂_0 + n_f ε̂)
    noise = (sample - np.sqrt(final_alpha) * clean) / np.sqrt(1 - final_alpha) if final_alpha < 1 else 0
    for i in range(2):
        expected = np.sqrt(final_alpha) * nearest_outside_mean(clean[i], REGION[i])
        expected = expected + (np.sqrt(1 - final_alpha) * noise[i] if final_alpha < 1 else 0)
        np.testing.assert_allclose(after[i][:, REGION[i]], expected[:, REGION[i]], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(after[i][:, ~REGION[i]], sample[i][:, ~REGION[i]], rtol=0, atol=1e-12)


def test_final_fill_of_plain_fill_would_carry_the_object_into_the_sample():
    """Why the final fill solves for the step: with `ᾱ_0 < 1`, the plain fill's sample keeps part of what `x_t` held."""
    scheduler = final_scheduler("ddim", "epsilon")
    timestep = scheduler.timesteps[-1]
    latents = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    latents[..., 2:5, 2:5] = 5.0  # an object in x_t
    noise_pred = torch.zeros_like(latents)
    region = torch.zeros(1, 8, 8, dtype=torch.bool)
    region[:, 2:5, 2:5] = True
    alpha = alpha_prod_at(scheduler, timestep)
    plain = scheduler.step(fill_noise_pred(noise_pred, latents, alpha, region, "epsilon"), timestep, latents)
    final = final_fill_noise_pred(noise_pred, latents, alpha, final_alpha_prod(scheduler), region, "epsilon")
    final = scheduler.step(final, timestep, latents)
    assert plain.prev_sample[..., 3, 3].abs().min() > 0.1
    # the scheduler holds ᾱ in float32
    torch.testing.assert_close(final.prev_sample[..., 2:5, 2:5], torch.zeros(1, 4, 3, 3, dtype=torch.float64),
                               rtol=0, atol=1e-5)  # fmt: skip


def reachable(start: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """Pixels reachable from `start` in at most `steps` 8-connected moves through `allowed` pixels (BFS)."""
    height, width = start.shape
    distance = np.full(start.shape, -1)
    queue = [tuple(p) for p in np.argwhere(start)]
    for p in queue:
        distance[p] = 0
    while queue:
        y, x = queue.pop(0)
        if distance[y, x] == steps:
            continue
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and distance[ny, nx] < 0 and allowed[ny, nx]:
                    distance[ny, nx] = distance[y, x] + 1
                    queue.append((ny, nx))
    return distance >= 0


def test_grow_region_takes_in_the_object_and_stops_at_the_background():
    generator = np.random.default_rng(0)
    background = np.array([0.3, -0.2, 0.1, 0.5])
    clean = background[:, None, None] + 0.01 * generator.standard_normal((4, 16, 16))
    star = np.zeros((16, 16), dtype=bool)
    star[4:9, 6] = star[6, 4:9] = True  # a plus, 5 × 5
    star[2, 6] = star[3, 6] = True  # an arm 4 pixels from the centre
    circle = np.zeros((16, 16), dtype=bool)
    circle[10:14, 10:14] = True  # a co-object two background pixels from the plus' corner
    clean[:, star] += np.array([2.0, -1.0, 0.5, 1.5])[:, None]
    clean[:, circle] += np.array([-1.5, 2.0, 1.0, -0.5])[:, None]
    region = np.zeros((16, 16), dtype=bool)
    region[6, 6] = True  # a peak on part of the object
    values = torch.from_numpy(np.stack([clean, clean]))
    regions = torch.from_numpy(np.stack([region, np.zeros_like(region)]))

    for steps in (0, 1, 2, 3):
        grown = grow_region(regions, values, steps).numpy()
        np.testing.assert_array_equal(grown[0], reachable(region, star | circle, steps), err_msg=f"{steps} steps")
        assert not grown[0][circle].any() and not grown[1].any()
    assert grow_region(regions, values, 6).numpy()[0][star].all()


@pytest.mark.parametrize("contrast", [3.0, 2.0])
def test_grow_region_contrast_decides_a_faint_edge(contrast):
    """A faint edge pixel beside the region, 2.5 background spreads from the background (median and spread computed
    here by hand over the pixels more than two from the region): taken in at contrast 2, left at 3; and the contrast
    reaches the final fill."""
    generator = np.random.default_rng(1)
    background = np.array([0.3, -0.2, 0.1, 0.5])
    clean = background[:, None, None] + 0.01 * generator.standard_normal((4, 12, 12))
    region = np.zeros((12, 12), dtype=bool)
    region[5:7, 5:7] = True
    far = np.ones((12, 12), dtype=bool)
    far[3:9, 3:9] = False  # more than two pixels (8-connected) from the region
    median = np.median(clean[:, far], axis=1)
    spread = np.median(np.linalg.norm(clean[:, far] - median[:, None], axis=0))
    clean[:, ~far & ~region] = median[:, None]  # around the region, background
    clean[:, 5, 7] = median + np.array([2.5 * spread, 0, 0, 0])  # but a faint edge, right of it
    values = torch.from_numpy(clean[None])
    grown = grow_region(torch.from_numpy(region[None]), values, 2, contrast).numpy()[0]
    assert grown[5, 7] == (contrast < 2.5) and grown.sum() == region.sum() + (contrast < 2.5)

    scheduler = final_scheduler("ddim", "epsilon")
    timestep = scheduler.timesteps[-1]
    alpha = alpha_prod_at(scheduler, timestep)
    latents = np.sqrt(alpha) * values  # x̂_0 = clean where the prediction is zero
    filled = final_fill_noise_pred(torch.zeros_like(latents), latents, alpha, final_alpha_prod(scheduler),
                                   torch.from_numpy(region[None]), "epsilon", 2, contrast)  # fmt: skip
    changed = (filled != 0).any(dim=1)[0].numpy()
    np.testing.assert_array_equal(changed, grown)


def test_config_checks_the_final_fill_options():
    DAGConfig(erase_mode="fill_final", fill_window=1, fill_growth=0, fill_contrast=1.5)
    with pytest.raises(ValueError, match="`fill_window` must be a number of steps >= 1"):
        DAGConfig(erase_mode="fill_final", fill_window=0)
    with pytest.raises(ValueError, match="`fill_growth` must be a number of latent pixels >= 0"):
        DAGConfig(erase_mode="fill_final", fill_growth=-1)
    with pytest.raises(ValueError, match='shape the final fill: pass `erase_mode="fill_final"`'):
        DAGConfig(erase_mode="fill", fill_growth=3)
    with pytest.raises(ValueError, match="`fill_contrast` must be a number of background spreads > 0"):
        DAGConfig(erase_mode="fill_final", fill_contrast=0)
    with pytest.raises(ValueError, match='shape the final fill: pass `erase_mode="fill_final"`'):
        DAGConfig(fill_contrast=3.0)
    with pytest.raises(ValueError, match='norm_cap.*erase_mode="fill_final"'):
        DAGConfig(erase_mode="fill_final", norm_cap=2.0)
    with pytest.raises(ValueError, match="`fill_window` must be an integer"):
        DAGConfig(erase_mode="fill_final", fill_window=2.5)
