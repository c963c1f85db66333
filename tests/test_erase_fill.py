"""`erase_mode="fill"` (beyond the paper): the guided pixels' prediction set from their surroundings' `x̂_0`.

The oracles are independent of the package: diffusers' own schedulers read `x̂_0` from the returned prediction
(`DDIMScheduler.step(...).pred_original_sample`) and give the noise level of a fractional timestep (Euler's
`sigmas`), and the nearest outside pixels are found by brute force over every pixel.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from dag_safety.config import DAGConfig
from dag_safety.guidance import alpha_prod_at, check_fill_scheduler, fill_noise_pred


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
