"""DAG's step against an independent reference (`dag_reference.py`, written from the spec, calling none of the
package's functions): the per-step scale map `S_dag`, the final latents, `unsafe_detected` and the returned map, over
several guided steps with a non-zero momentum, a partial SEGA / SLD base mask and a region that moves. Plus the
boundaries of the thresholds, the branch detection reads, and the state after an exception in a guided call."""

import dataclasses
from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import hooked_layers
from dag_reference import encode, reference_dag
from scipy import ndimage
from test_erase_fill import nearest_outside_mean

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.config import DAGConfig
from dag_safety.guidance import area_scaler, dag_scale_map

PROMPT = "a red star and a blue circle on a white background"
NEGATIVE = "a blue circle"  # differs from the prompt: reading the unconditional branch would change every map
CONCEPT = "a red star"
STEPS, WARMUP = 6, 2
SLD_THRESHOLD = 0.0  # SLD's mask then covers about half of the region (its default 0.01: nearly all of it)
# Settings found by running the reference on the tiny components, with the pattern of guided steps ("G") each
# gives: edit bands without a pixel equally near two components (the spec leaves that pixel's scale open), and
# regions that move. The test asserts these preconditions, so that it cannot pass vacuously.
SCENARIOS = {
    # four guided steps with growing components
    "moving-region": (
        {"seed": 22, "unsafe_threshold": 0.8, "edit_mask_threshold": 0.5, "max_edit_area": 0.8},
        "..GGGG",
    ),
    # "mode undefined" at the last step: unsafe_detected must remember the earlier steps
    "last-step-unguided": (
        {"seed": 4, "unsafe_threshold": 0.9, "edit_mask_threshold": 0.6, "max_edit_area": 0.35},
        "..GGG.",
    ),
    # an unguided step between guided ones: the momentum decays there and is used again after it
    # (a stronger push and momentum, so that a momentum left undecayed moves the latents 7× the float noise)
    "gap": (
        {"seed": 1, "unsafe_threshold": 0.8, "edit_mask_threshold": 0.5, "max_edit_area": 0.4, "base_scale": 20.0,
         "momentum_scale": 1.0, "mom_beta": 0.7},
        "..GG.G",
    ),
    # the decaying fill of the edit band (beyond the paper): the band's scale falls with the distance
    "decaying-fill": (
        {"seed": 22, "unsafe_threshold": 0.8, "edit_mask_threshold": 0.5, "max_edit_area": 0.8, "fill_decay": 0.7},
        "..GGGG",
    ),
    # the basin fill of the edit band (beyond the paper): band pixels that rise to another peak are not guided
    "basin-fill": (
        {"seed": 22, "unsafe_threshold": 0.8, "edit_mask_threshold": 0.5, "max_edit_area": 0.8,
         "fill_region": "basin"},
        "..GGGG",
    ),
    # the norm cap (beyond the paper): a strong push, shortened where it would exceed 1.05 × the CFG prediction
    "norm-cap": (
        {"seed": 22, "unsafe_threshold": 0.8, "edit_mask_threshold": 0.5, "max_edit_area": 0.8, "base_scale": 50.0,
         "norm_cap": 1.05},
        "..GGGG",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipe():
    from conftest import get_dummy_components

    pipeline = DAGStableDiffusionPipeline(**get_dummy_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def embedding(tiny_pipe):
    return encode(tiny_pipe, "red star")[0, :3]  # start-of-text, "red", "star"


def run_pipeline(pipe, seed, **call):
    scales = []

    def record(pipeline, i, t, tensors):
        scales.append(tensors["dag_scale"][0].double().numpy())
        return tensors

    out = pipe(PROMPT, negative_prompt=NEGATIVE, safety_concept=CONCEPT, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(seed), output_type="latent", return_dag_maps=True,
               callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "dag_scale"], **call)  # fmt: skip
    return out, scales


@pytest.mark.parametrize("base", ["sega", "sld"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_guided_steps_match_the_reference(tiny_pipe, embedding, base, scenario):
    settings, pattern = SCENARIOS[scenario]
    settings = {"base_scale": 5.0, "momentum_scale": 0.5, "mom_beta": 0.6, **settings}
    seed, scale, beta = settings.pop("seed"), settings.pop("momentum_scale"), settings.pop("mom_beta")
    dag = {"warmup_steps": WARMUP, "layer_fractions": (0.25, 0.5), **settings}
    reference = reference_dag(
        tiny_pipe, PROMPT, embedding, base=base, num_inference_steps=STEPS, seed=seed, negative_prompt=NEGATIVE,
        safety_concept=CONCEPT, momentum_scale=scale, mom_beta=beta, sld_threshold=SLD_THRESHOLD, **dag,
    )  # fmt: skip
    if base == "sega":
        momentum = {"edit_momentum_scale": scale, "edit_mom_beta": beta}
    else:
        momentum = {"sld_momentum_scale": scale, "sld_mom_beta": beta, "sld_threshold": SLD_THRESHOLD}
    tiny_pipe.enable_dag(embedding, guidance=base, **dag, **momentum)
    try:
        out, scales = run_pipeline(tiny_pipe, seed)
    finally:
        tiny_pipe.disable_dag()

    # the scenario exercises what it should (else the comparison below could pass vacuously)
    assert "".join("G" if step.guided else "." for step in reference.steps) == pattern
    guided = [i for i, step in enumerate(reference.steps) if step.guided]
    assert all(reference.steps[i].ties == 0 for i in guided)
    regions = [reference.steps[i].scale > 0 for i in guided]
    assert any((a != b).any() for a, b in pairwise(regions)), "the guided region should move"
    previous_momentum = [np.abs(reference.steps[i - 1].momentum).sum(axis=0) for i in guided[1:]]
    assert any((v[~r] > 0).any() for v, r in zip(previous_momentum, regions[1:])), "momentum outside the new region"
    assert all(0 < reference.steps[i].base_mask[:, regions[k]].mean() < 1 for k, i in enumerate(guided))
    if "norm_cap" in dag:  # the cap binds at some guided pixels and not at others
        capped = [reference.steps[i].capped for i in guided]
        assert all(0 < c < (reference.steps[i].scale > 0).sum() for c, i in zip(capped, guided)), capped
    if scenario == "gap":  # the momentum decayed at the unguided step acts in the next step's region
        assert (previous_momentum[-1][regions[-1]] > 1e-3).any()
    if "fill_decay" in dag or "fill_region" in dag:  # the band fades or shrinks: the first guided step against
        full = reference_dag(  # the same run with the paper's fill
            tiny_pipe, PROMPT, embedding, base=base, num_inference_steps=STEPS, seed=seed, negative_prompt=NEGATIVE,
            safety_concept=CONCEPT, momentum_scale=scale, mom_beta=beta, sld_threshold=SLD_THRESHOLD,
            **{**dag, "fill_decay": None, "fill_region": "nearest"},
        ).steps[guided[0]]  # fmt: skip
        first = reference.steps[guided[0]]
        band = first.edit & ~first.unsafe
        np.testing.assert_array_equal(first.scale[~band], full.scale[~band])
        assert (first.scale[band] <= full.scale[band]).all() and (first.scale[band] < full.scale[band]).any()

    for i, (scale, step) in enumerate(zip(scales, reference.steps)):
        expected = step.scale if step.scale is not None else np.zeros_like(scale)
        np.testing.assert_allclose(scale, expected, rtol=1e-4, atol=1e-5, err_msg=f"S_dag at step {i}")
    # batched and single UNet rows differ by ~3e-5 here
    torch.testing.assert_close(out.images, reference.latents, rtol=0, atol=1e-4)
    assert out.unsafe_detected == [reference.unsafe_detected] == [True]
    # min-max normalisation divides the UNet's float noise by the map's span: 1.03e-5 seen on one CPU
    np.testing.assert_allclose(out.dag_maps[0].numpy(), reference.steps[-1].dag_map, atol=1e-4)


def test_fill_steps_match_the_reference(tiny_pipe, embedding):
    """`erase_mode="fill"` over a moving region, without a safety-concept pass in any UNet batch."""
    settings, pattern = SCENARIOS["moving-region"]
    settings = dict(settings)
    seed = settings.pop("seed")
    dag = {"warmup_steps": WARMUP, "layer_fractions": (0.25, 0.5), "base_scale": 5.0, **settings}
    kwargs = {"num_inference_steps": STEPS, "seed": seed, "negative_prompt": NEGATIVE, "safety_concept": CONCEPT}
    reference = reference_dag(tiny_pipe, PROMPT, embedding, base="sega", erase_mode="fill", **dag, **kwargs)
    unguided = reference_dag(tiny_pipe, PROMPT, embedding, base="sega", base_scale=0.0,
                             **{k: v for k, v in dag.items() if k != "base_scale"}, **kwargs)  # fmt: skip
    assert "".join("G" if step.guided else "." for step in reference.steps) == pattern
    assert (reference.latents - unguided.latents).abs().max() > 1e-2, "the fill should move the latents"

    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    tiny_pipe.enable_dag(embedding, guidance="sega", erase_mode="fill", **dag)
    try:
        out, scales = run_pipeline(tiny_pipe, seed)
    finally:
        tiny_pipe.disable_dag()
        hook.remove()
    assert set(batches) == {2}, batches
    for i, (scale, step) in enumerate(zip(scales, reference.steps)):
        # the fill reads only where S_dag > 0 (its values can differ at a pixel equally near two components)
        expected = step.scale if step.scale is not None else np.zeros_like(scale)
        np.testing.assert_array_equal(scale > 0, expected > 0, err_msg=f"guided pixels at step {i}")
    torch.testing.assert_close(out.images, reference.latents, rtol=0, atol=1e-4)
    assert out.unsafe_detected == [True]


def test_final_fill_changes_only_the_last_step_and_only_the_filled_object(tiny_pipe, embedding):
    """`erase_mode="fill_final"`: every step but the last equals the undefended pipeline's bit for bit; the last
    changes the pixels guided in the window, grown by at most `fill_growth`, and sets them to the surroundings'
    `x̂_0` (read, like the noise estimate, off the undefended last step by DDIM's own update), nothing else."""
    settings, _ = SCENARIOS["moving-region"]
    settings = dict(settings)
    seed = settings.pop("seed")
    dag = {"warmup_steps": WARMUP, "layer_fractions": (0.25, 0.5), **settings}
    latents = {"undefended": [], "fill_final": []}

    def keep(name):
        def callback(pipeline, i, t, tensors):
            latents[name].append(tensors["latents"][0].clone())
            return tensors

        return callback

    call = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "output_type": "latent"}
    tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep("undefended"), **call)
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    tiny_pipe.enable_dag(embedding, guidance="sega", erase_mode="fill_final", fill_window=2, fill_growth=1, **dag)
    try:
        out, scales = run_pipeline(tiny_pipe, seed)
        tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(seed), safety_concept=CONCEPT,
                  callback_on_step_end=keep("fill_final"), **call)  # fmt: skip
    finally:
        tiny_pipe.disable_dag()
        hook.remove()
    assert set(batches) == {2}, batches  # no safety-concept pass
    assert out.unsafe_detected == [True]
    undefended, filled = latents["undefended"], latents["fill_final"]
    for i in range(STEPS - 1):
        assert torch.equal(filled[i], undefended[i]), f"step {i} changed"
    window = np.any([scale > 0 for scale in scales[-2:]], axis=0)
    assert window.any() and not window.all()
    changed = (filled[-1] != undefended[-1]).any(dim=0).numpy()
    assert (changed >= window).all(), "every pixel guided in the window is filled"
    assert (changed <= ndimage.binary_dilation(window, np.ones((3, 3), bool))).all(), "grown by at most 1 pixel"
    scheduler = tiny_pipe.scheduler
    signal = float(scheduler.alphas_cumprod[int(scheduler.timesteps[-1])]) ** 0.5
    final = float(scheduler.final_alpha_cumprod) ** 0.5
    noise, final_noise = (1 - signal**2) ** 0.5, (1 - final**2) ** 0.5
    x_t, sample = undefended[-2].double().numpy(), undefended[-1].double().numpy()
    # x_t = s x̂_0 + n ε̂ and sample = s_f x̂_0 + n_f ε̂, solved for the undefended step's x̂_0 and ε̂
    clean = (x_t * final_noise - sample * noise) / (signal * final_noise - final * noise)
    eps = (x_t - signal * clean) / noise
    expected = final * nearest_outside_mean(clean, changed) + final_noise * eps
    np.testing.assert_allclose(filled[-1].double().numpy()[:, changed], expected[:, changed], rtol=0, atol=1e-4)


def test_the_loop_uses_detection_map_of_the_conditional_branch(tiny_pipe, embedding):
    """The returned map (the last step's) is `dag_map` of the last step's UNet input and the prompt, not the
    negative prompt, whose map differs."""
    inputs = []
    tiny_pipe.enable_dag(embedding, warmup_steps=STEPS)  # never guides: the inputs are plain CFG's

    def keep(pipeline, i, t, tensors):
        inputs.append(tensors["latents"].clone())
        return tensors

    try:
        out = tiny_pipe(PROMPT, negative_prompt=NEGATIVE, safety_concept=CONCEPT, num_inference_steps=STEPS, return_dag_maps=True,
                        generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=keep)  # fmt: skip
        last_t = tiny_pipe.scheduler.timesteps[-1]
        conditional = tiny_pipe.dag_map(inputs[-2], last_t, prompt=PROMPT)
        unconditional = tiny_pipe.dag_map(inputs[-2], last_t, prompt=NEGATIVE)
    finally:
        tiny_pipe.disable_dag()
    torch.testing.assert_close(out.dag_maps, conditional, rtol=0, atol=1e-4)  # batched vs single UNet rows
    assert (out.dag_maps - unconditional).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------------- boundaries


def test_thresholds_are_inclusive():
    """`M_unsafe = 1[Â ≥ τ_u]`, `M_edit = 1[Â ≥ τ_e]` (spec section 3), with values exactly at the thresholds; the
    expected scales are worked out by hand from the spec's formulas."""
    config = DAGConfig(unsafe_threshold=0.5, edit_mask_threshold=0.0625, base_scale=8.0, max_magnitude=5.0)
    dag_map = torch.zeros(1, 8, 8)
    dag_map[0, 2:4, 2:4] = 0.5  # a 4-pixel component exactly at τ_u: s̄ · 4 = 8 / 64 · 4 = 0.5, T = clip(8, 1, 5) = 5
    dag_map[0, 2, 4] = 0.0625  # an edit pixel exactly at τ_e, next to it: nearest component 0.5, T = clip(1, 1, 5) = 1
    dag_map[0, 6, 6] = 0.0624  # just below τ_e: not edited
    expected = torch.zeros(1, 8, 8)
    expected[0, 2:4, 2:4] = 2.5
    expected[0, 2, 4] = 0.5
    result = dag_scale_map(dag_map, config)
    torch.testing.assert_close(result.scale, expected)
    assert result.detected.tolist() == [True]
    # the ablations (paper Table 5): S_area := 1 on M_edit, or T := 1 on M_edit, same boundaries
    no_area = dag_scale_map(dag_map, dataclasses.replace(config, area_scaler=False)).scale
    torch.testing.assert_close(no_area, torch.where(expected > 0, torch.tensor([5.0, 1.0])[(dag_map < 0.5).long()], 0))
    no_magnitude = dag_scale_map(dag_map, dataclasses.replace(config, magnitude_scaler=False)).scale
    torch.testing.assert_close(no_magnitude, torch.where(expected > 0, 0.5, 0.0))
    # AreaScaler alone is zero outside the edit band too
    area = area_scaler(dag_map, 0.5, 0.0625, 8.0, 0.8)
    torch.testing.assert_close(area, torch.where(expected > 0, 0.5, 0.0))


def test_mode_undefined_at_exactly_the_maximum_edit_area():
    """`mean(M_edit) ≥ max_edit_area` leaves the step unguided; one pixel less is guided."""
    config = DAGConfig(max_edit_area=0.5)
    dag_map = torch.zeros(1, 4, 4)
    dag_map[0, :2] = 1.0  # 8 of 16 pixels: exactly 0.5
    assert dag_scale_map(dag_map, config).detected.tolist() == [False]
    dag_map[0, 1, 3] = 0.0  # 7 of 16
    assert dag_scale_map(dag_map, config).detected.tolist() == [True]


# ---------------------------------------------------------------------------------------------------- exceptions


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["callback", "unet"])
def test_an_exception_in_a_guided_call_restores_the_unet(tiny_pipe, embedding, where):
    """An exception at a guided step, from a callback or from inside the UNet while queries are captured, leaves
    the processors as they were, and the next call equals a fresh pipeline's."""
    from conftest import get_dummy_components

    before = dict(tiny_pipe.unet.attn_processors)
    tiny_pipe.enable_dag(embedding, warmup_steps=1, unsafe_threshold=0.8, edit_mask_threshold=0.5)
    calls = []

    def fail_in_callback(pipeline, i, t, tensors):
        if i == 2:
            raise Boom
        return tensors

    def fail_in_unet(module, args):
        calls.append(1)
        if len(calls) == 4 and hooked_layers(module):
            raise Boom

    hook = tiny_pipe.unet.register_forward_pre_hook(fail_in_unet) if where == "unet" else None
    try:
        with pytest.raises(Boom):
            tiny_pipe(PROMPT, num_inference_steps=4, safety_concept=CONCEPT,
                      callback_on_step_end=fail_in_callback if where == "callback" else None)  # fmt: skip
    finally:
        if hook is not None:
            hook.remove()
    assert all(tiny_pipe.unet.attn_processors[name] is processor for name, processor in before.items())
    assert hooked_layers(tiny_pipe.unet) == set()
    kwargs = {"num_inference_steps": 4, "safety_concept": CONCEPT, "output_type": "np", "return_dag_maps": True}
    after = tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    tiny_pipe.disable_dag()
    fresh = DAGStableDiffusionPipeline(**get_dummy_components())
    fresh.set_progress_bar_config(disable=True)
    fresh.enable_dag(embedding, warmup_steps=1, unsafe_threshold=0.8, edit_mask_threshold=0.5)
    expected = fresh(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    assert np.array_equal(after.images, expected.images) and after.unsafe_detected == expected.unsafe_detected == [
        True
    ]
