"""Guidance math against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from dag_reference import area_scale, basin_components_reference
from scipy import ndimage

from dag_safety.config import SLD_PRESETS, DAGConfig, SEGAConfig, SLDConfig, build_config
from dag_safety.guidance import (
    area_scaler,
    basin_components,
    component_mask,
    dag_noise_pred,
    dag_scale_map,
    find_components,
    magnitude_scaler,
    sega_noise_pred,
    sld_noise_pred,
)


def t(values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


class TestSLD:
    def test_step_by_hand(self):
        config = SLDConfig(
            sld_guidance_scale=10, sld_warmup_steps=0, sld_threshold=0.0, sld_momentum_scale=0.5, sld_mom_beta=0.25
        )
        e_u, e_p, e_s = t([0.0, 0.0, 1.0]), t([1.0, 0.2, 1.0]), t([2.0, 0.1, 0.5])
        # d = e_p - e_s = [-1, 0.1, 0.5]; scale = clamp(|d|*10, max=1) = [1, 1, 1]; mask d < 0 -> [1, 0, 0]
        # g = (e_s - e_u) * scale * mask = [2, 0, 0]; no momentum yet
        noise_pred, momentum = sld_noise_pred(e_u, e_p, e_s, 2.0, None, 0, config)
        assert torch.allclose(noise_pred, t([0 + 2 * (1 - 2), 0 + 2 * 0.2, 1 + 2 * 0.0]))
        assert torch.allclose(momentum, t([0.75 * 2, 0, 0]))
        # second step: g = [2,0,0] + 0.5 * [1.5,0,0] = [2.75,0,0]
        noise_pred, momentum = sld_noise_pred(e_u, e_p, e_s, 2.0, momentum, 1, config)
        assert torch.allclose(noise_pred, t([2 * (1 - 2.75), 0.4, 1.0]))
        assert torch.allclose(momentum, t([0.25 * 1.5 + 0.75 * 2.75, 0, 0]))

    def test_small_difference_scale_and_warmup(self):
        config = SLDConfig(
            sld_guidance_scale=100, sld_warmup_steps=3, sld_threshold=0.01, sld_momentum_scale=0.0, sld_mom_beta=0.0
        )
        e_u, e_p, e_s = t([0.0]), t([0.0]), t([0.004])  # d = -0.004 -> scale 0.4, masked in (< 0.01)
        during, momentum = sld_noise_pred(e_u, e_p, e_s, 7.5, None, 2, config)
        assert torch.equal(during, t([0.0]))  # warm-up: momentum builds, nothing applied
        assert torch.allclose(momentum, t([0.004 * 0.4]))
        after, _ = sld_noise_pred(e_u, e_p, e_s, 7.5, None, 3, config)
        assert torch.allclose(after, t([-7.5 * 0.004 * 0.4]))

    def test_presets_match_safe_latent_diffusion(self):
        assert SLD_PRESETS["weak"] == SLDConfig(20, 15, 0.0, 0.0, 0.0)
        assert SLD_PRESETS["max"] == SLDConfig(5000, 0, 1.0, 0.5, 0.7)
        assert SLDConfig.from_preset("strong", sld_warmup_steps=3).sld_warmup_steps == 3
        assert build_config("sld") == SLD_PRESETS["medium"]


class TestSEGA:
    def test_percentile_mask_reverse_direction_momentum(self):
        config = SEGAConfig(
            edit_guidance_scale=2, edit_warmup_steps=1, edit_threshold=0.5, edit_momentum_scale=0.5, edit_mom_beta=0.5
        )
        e_u = torch.zeros(1, 1, 2, 2)
        e_p = torch.ones(1, 1, 2, 2)
        e_s = torch.tensor([1.0, -3.0, 0.5, 2.0]).reshape(1, 1, 2, 2)
        # g0 = -(e_s - e_u) * 2 = [-2, 6, -1, -4]; |g0| = [2, 6, 1, 4]; quantile 0.5 (linear) = 3 -> keep 6, -4
        noise_pred, momentum = sega_noise_pred(e_u, e_p, [e_s], 3.0, None, 0, config)
        assert torch.equal(noise_pred, torch.full((1, 1, 2, 2), 3.0))  # warm-up: plain CFG
        expected_edit = torch.tensor([0.0, 6.0, 0.0, -4.0]).reshape(1, 1, 2, 2)
        assert torch.allclose(momentum, 0.5 * expected_edit)
        noise_pred, momentum = sega_noise_pred(e_u, e_p, [e_s], 3.0, momentum, 1, config)
        edit = expected_edit + 0.5 * 0.5 * expected_edit
        assert torch.allclose(noise_pred, 3.0 + edit)

    def test_several_concepts_sum(self):
        config = SEGAConfig(edit_guidance_scale=1, edit_warmup_steps=0, edit_threshold=1.0, edit_momentum_scale=0)
        e_u = torch.zeros(1, 1, 1, 2)
        one, two = t([1.0, 0.0]), t([0.0, 2.0])  # threshold 1.0 keeps only each concept's maximum
        noise_pred, _ = sega_noise_pred(e_u, e_u, [one, two], 7.5, None, 0, config)
        assert torch.allclose(noise_pred, t([-1.0, -2.0]))


class TestScalers:
    def test_magnitude_scaler(self):
        dag_map = torch.tensor([[[0.0, 0.005, 0.01, 0.03, 0.05, 0.9]]])
        assert torch.allclose(magnitude_scaler(dag_map), torch.tensor([[[0.0, 0.0, 1.0, 3.0, 5.0, 5.0]]]))

    def test_area_scaler_components_and_interpolation(self):
        dag_map = torch.zeros(1, 10, 10)
        dag_map[0, 1:3, 1:3] = 0.9  # component A: 4 px
        dag_map[0, 6:9, 6:9] = 0.8  # component B: 9 px
        dag_map[0, 3, 1] = 0.2  # edit band pixel next to A
        dag_map[0, 5, 7] = 0.2  # edit band pixel next to B
        dag_map[0, 0, 6] = 0.3  # isolated edit pixel, nearer to A (sqrt 17) than to B (6)
        s_bar = 5 / 100
        scale = area_scaler(dag_map)[0]
        assert torch.allclose(scale[1:3, 1:3], torch.full((2, 2), 4 * s_bar))
        assert torch.allclose(scale[6:9, 6:9], torch.full((3, 3), 9 * s_bar))
        assert scale[3, 1] == pytest.approx(4 * s_bar)
        assert scale[5, 7] == pytest.approx(9 * s_bar)
        assert scale[0, 6] == pytest.approx(4 * s_bar)
        assert int((scale > 0).sum()) == 4 + 9 + 3

    def test_area_scaler_fill_decay_by_hand(self):
        dag_map = torch.zeros(1, 10, 10)
        dag_map[0, 1:3, 1:3] = 0.9  # component A: 4 px
        dag_map[0, 6:9, 6:9] = 0.8  # component B: 9 px
        dag_map[0, 3, 1] = 0.2  # 1 px below A
        dag_map[0, 5, 7] = 0.2  # 1 px above B
        dag_map[0, 0, 6] = 0.3  # nearest to A's (1, 2), at sqrt(17)
        s_bar, decay = 5 / 100, 2.0
        radius_a, radius_b = math.sqrt(4 / math.pi), math.sqrt(9 / math.pi)
        scale = area_scaler(dag_map, fill_decay=decay)[0]
        assert torch.allclose(scale[1:3, 1:3], torch.full((2, 2), 4 * s_bar))
        assert torch.allclose(scale[6:9, 6:9], torch.full((3, 3), 9 * s_bar))
        assert scale[3, 1] == pytest.approx(4 * s_bar * math.exp(-1 / (decay * radius_a)))
        assert scale[5, 7] == pytest.approx(9 * s_bar * math.exp(-1 / (decay * radius_b)))
        assert scale[0, 6] == pytest.approx(4 * s_bar * math.exp(-math.sqrt(17) / (decay * radius_a)))
        assert int((scale > 0).sum()) == 4 + 9 + 3

    @pytest.mark.parametrize("seed", range(5))
    def test_area_scaler_fill_decay_against_brute_force(self, seed):
        generator = torch.Generator().manual_seed(seed)
        dag_map = torch.rand(1, 12, 12, generator=generator) ** 3  # sparse components, a partial edit band
        dag_map[dag_map < 0.05] = 0.0
        decay = 1.5
        scale = area_scaler(dag_map, edit_mask_threshold=0.01, base_scale=5.0, fill_decay=decay)[0].numpy()
        image = dag_map[0].numpy()
        labels, count = ndimage.label(image >= 0.5, structure=np.ones((3, 3)))
        assert count > 1
        pixels = np.argwhere(labels > 0)
        areas = np.bincount(labels.ravel())
        checked = 0
        for row, col in np.argwhere(image >= 0.01):
            distances = np.hypot(*(pixels - (row, col)).T)
            nearest = np.flatnonzero(distances == distances.min())
            owners = {labels[tuple(pixels[i])] for i in nearest}
            if len(owners) > 1:  # equidistant from two components: the transform may pick either
                continue
            owner = owners.pop()
            radius = math.sqrt(areas[owner] / math.pi)
            expected = 5.0 / 144 * areas[owner] * math.exp(-distances.min() / (decay * radius))
            assert scale[row, col] == pytest.approx(expected, rel=1e-5)
            checked += 1
        assert checked > 20
        assert np.all(scale[image < 0.01] == 0)

    def test_area_scaler_basin_fill_by_hand(self):
        # a detected object (peak 1.0) and a weaker one (peak 0.3, below tau_u): the nearest fill spreads the
        # detected object's scale onto the weaker one's slopes, the basin fill stops where the slope turns up
        dag_map = torch.zeros(1, 3, 9)
        dag_map[0, 1] = torch.tensor([0.0, 0.2, 0.6, 1.0, 0.4, 0.1, 0.2, 0.3, 0.05])
        s_bar = 5 / 27
        nearest = area_scaler(dag_map)[0, 1]
        basin = area_scaler(dag_map, fill_region="basin")[0, 1]
        component = 2 * s_bar  # pixels 2 and 3
        assert torch.allclose(nearest, torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1]) * component)
        # 1 and 4 rise to the component, 5 is a trough whose higher neighbour is 4, 6-8 rise to the peak at 7
        assert torch.allclose(basin, torch.tensor([0, 1, 1, 1, 1, 1, 0, 0, 0]) * component)
        radius = math.sqrt(2 / math.pi)
        decayed = area_scaler(dag_map, fill_region="basin", fill_decay=1.0)[0, 1]
        assert decayed[5] == pytest.approx(component * math.exp(-2 / radius))

    @pytest.mark.parametrize("fill_decay", [None, 1.5])
    @pytest.mark.parametrize("seed", [1, 2, 5, 6])  # seeds whose maps have a weak peak beside a component
    def test_area_scaler_basin_fill_against_brute_force(self, seed, fill_decay):
        rng = np.random.default_rng(seed)
        rows, cols = np.mgrid[:12, :12]
        image = np.zeros((12, 12))
        for row, col, height in zip(*rng.uniform(0, 12, (2, 5)), rng.uniform(0.2, 1.0, 5)):  # five bumps
            image += height * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / 1.5)
        image /= image.max()
        image[image < 0.1] = 0.0  # a partial edit band
        dag_map = torch.from_numpy(image)[None].float()
        image = dag_map[0].double().numpy()
        expected, ties = area_scale(image, 0.5, 0.01, 5.0, 0.8, fill_decay=fill_decay, fill_region="basin")
        assert ties == 0  # bumps at random places: no two equally high neighbours on a climb
        nearest, _ = area_scale(image, 0.5, 0.01, 5.0, 0.8, fill_decay=fill_decay)
        assert (expected != nearest).any()  # the maps do have rival peaks
        scale = area_scaler(dag_map, base_scale=5.0, fill_decay=fill_decay, fill_region="basin")[0].numpy()
        np.testing.assert_allclose(scale, expected, rtol=1e-5, atol=1e-7)

    def test_basin_components_by_hand(self):
        # a fainter object beside the peak: under the paper's cut it forms no component, per basin it forms its own
        row = [0.0, 0.2, 0.6, 1.0, 0.4, 0.1, 0.3, 0.45, 0.2]
        dag_map = np.array([row])
        labels, count = basin_components(dag_map, 0.5, 0.25)
        # pixel 5 climbs to 4 and on to the peak at 3; 8 (0.2) is under half its peak's 0.45
        assert count == 2 and labels.tolist() == [[0, 0, 1, 1, 0, 0, 2, 2, 0]]
        assert ndimage.label(dag_map >= 0.5)[1] == 1
        assert basin_components(dag_map, 0.5, 0.5)[0].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0, 0]]  # under the floor
        # two touching objects above the paper's cut form one component there, two here
        touching = np.array([[0.3, 0.9, 0.6, 0.8, 0.2]])
        assert ndimage.label(touching >= 0.5)[1] == 1
        labels, count = basin_components(touching, 0.5, 0.25)
        assert count == 2 and labels.tolist() == [[0, 1, 1, 2, 0]]  # 0.6 climbs to 0.9; 0.8's cut is 0.4
        # a plateau of equal maxima is one peak
        plateau = np.array([[0.1, 0.7, 0.7, 0.1, 0.0]])
        assert basin_components(plateau, 0.5, 0.25)[0].tolist() == [[0, 1, 1, 0, 0]]

    @pytest.mark.parametrize("seed", range(6))
    def test_basin_components_against_brute_force(self, seed):
        rng = np.random.default_rng(seed)
        rows, cols = np.mgrid[:14, :14]
        image = np.zeros((14, 14))
        for row, col, height in zip(*rng.uniform(0, 14, (2, 6)), rng.uniform(0.2, 1.0, 6)):  # six bumps
            image += height * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / 2.0)
        image /= image.max()
        image[image < 0.05] = 0.0  # a flat floor, as a normalised map has
        labels, count = basin_components(image, 0.5, 0.25)
        expected, expected_count = basin_components_reference(image, 0.5, 0.25)
        assert count == expected_count >= 2
        assert np.array_equal(labels, expected)

    def test_area_scaler_basin_components_judge_a_shadowed_object_on_its_own(self):
        # the red star (peak 0.45) beside a brighter look-alike (1.0): the selective rule can only guide what forms a
        # component, and only the basin rule forms one on the star
        dag_map = torch.zeros(1, 1, 15)
        dag_map[0, 0, :9] = torch.tensor([0.0, 0.2, 0.6, 1.0, 0.4, 0.1, 0.3, 0.45, 0.2])
        presence = torch.zeros(1, 1, 15)
        presence[0, 0, 6:8] = 1.0  # present on the star only
        gate = {"presence": presence, "presence_threshold": 0.5, "edit_mask_threshold": 0.05}
        assert torch.count_nonzero(area_scaler(dag_map, **gate)) == 0
        basin = area_scaler(dag_map, components="basin", fill_region="basin", **gate)[0, 0]
        # the star's component is 0.3 and 0.45 (>= 0.225, half its peak) and its band (0.2) rises to it; the
        # look-alike's basin, pixel 5 included, is left alone (the nearest fill would give pixel 5 the star's scale)
        expected = torch.zeros(15)
        expected[6:9] = 2 * 5 / 15
        assert torch.allclose(basin, expected)

    def test_component_mask_is_what_the_hold_keeps(self):
        # the hold remembers the components' pixels (not their band): the paper's cut, or each basin's own
        dag_map = torch.zeros(2, 1, 15)
        dag_map[:, 0, :9] = torch.tensor([0.0, 0.2, 0.6, 1.0, 0.4, 0.1, 0.3, 0.45, 0.2])
        dag_map[1, 0, :] = 0.5  # flat: mode undefined, no component
        paper = component_mask(dag_map, DAGConfig())
        assert paper[0, 0].nonzero().flatten().tolist() == [2, 3] and not paper[1].any()
        basin = component_mask(dag_map, DAGConfig(components="basin"))
        assert basin[0, 0].nonzero().flatten().tolist() == [2, 3, 6, 7] and not basin[1].any()

    @pytest.mark.parametrize("components", ["threshold", "basin"])
    def test_components_found_once_are_what_each_reader_finds(self, components):
        # a step finds its components once (`find_components`) and hands them on: per image, what `ndimage.label`
        # (or the brute-force basins) finds; every reader gives with them what it gives finding them itself
        generator = torch.Generator().manual_seed(3)
        dag_map = torch.rand(3, 12, 12, generator=generator) ** 4
        dag_map[2] = 0.6  # mode undefined: no component
        config = DAGConfig(
            detection="presence", presence_threshold=0.2, components=components, hold_detection=True, base_scale=40
        )
        found = find_components(dag_map, config)
        assert [count > 1 for _, count in found] == [True, True, False]
        for image, (labels, count) in zip(dag_map.numpy(), found):
            if (image >= config.edit_mask_threshold).mean() >= config.max_edit_area:
                expected, expected_count = np.zeros(image.shape, dtype=int), 0
            elif components == "basin":
                expected, expected_count = basin_components_reference(image, config.unsafe_threshold, 0.25)
            else:
                expected, expected_count = ndimage.label(image >= config.unsafe_threshold, structure=np.ones((3, 3)))
            assert count == expected_count and np.array_equal(labels, expected)
        presence = torch.rand(3, 12, 12, generator=generator)
        held = torch.zeros(3, 12, 12, dtype=torch.bool)
        held[0, :6] = True
        alone = dag_scale_map(dag_map, config, presence=presence, held=held)
        handed = dag_scale_map(dag_map, config, presence=presence, held=held, found=found)
        assert alone.scale.count_nonzero() > 0
        assert torch.equal(alone.scale, handed.scale) and torch.equal(alone.presence, handed.presence)
        assert torch.equal(component_mask(dag_map, config), component_mask(dag_map, config, found))
        # the components handed on are the ones used: none found, nothing guided
        none = [(np.zeros_like(labels), 0) for labels, _ in found]
        assert dag_scale_map(dag_map, config, presence=presence, found=none).scale.count_nonzero() == 0

    @pytest.mark.parametrize("hold_region", ["component", "pixels"])
    def test_area_scaler_hold_region_by_hand(self, hold_region):
        dag_map = torch.zeros(1, 8, 8)
        dag_map[0, 1:3, 1:3] = 0.9  # component A, scored present
        dag_map[0, 5:7, 5:7] = 0.8  # component B, scored absent, one pixel of it held
        dag_map[0, 4, 5] = 0.2  # B's band
        presence = torch.zeros(1, 8, 8)
        presence[0, 1:3, 1:3] = 1.0
        held = torch.zeros(1, 8, 8, dtype=torch.bool)
        held[0, 5, 5] = held[0, 0, 7] = True
        unit = 5 / 64
        scale = area_scaler(dag_map, presence=presence, presence_threshold=0.5, held=held, hold_region=hold_region)[0]
        assert torch.allclose(scale[1:3, 1:3], torch.full((2, 2), 4 * unit))
        expected_b = (
            torch.full((2, 2), 4 * unit) if hold_region == "component" else torch.tensor([[4 * unit, 0], [0, 0]])
        )
        assert torch.allclose(scale[5:7, 5:7], expected_b)
        assert scale[4, 5] == pytest.approx(4 * unit if hold_region == "component" else 0.0)  # B's band
        assert scale[0, 7] == 0  # a held pixel outside every component stays unguided

    def test_area_scaler_eight_connectivity(self):
        dag_map = torch.zeros(1, 5, 5)
        dag_map[0, 1, 1] = dag_map[0, 2, 2] = 1.0  # diagonal neighbours: one component of 2 px
        assert area_scaler(dag_map)[0, 1, 1] == pytest.approx(2 * 5 / 25)

    def test_mode_undefined_and_nothing_detected(self):
        diffuse = torch.full((1, 4, 4), 0.02)
        diffuse[0, 0, 0] = 1.0  # edit region covers everything: mode undefined
        assert torch.count_nonzero(area_scaler(diffuse)) == 0
        weak = torch.full((1, 4, 4), 0.0)
        weak[0, 0, 0] = 0.3  # edit pixel, no unsafe component
        assert torch.count_nonzero(area_scaler(weak)) == 0
        just_below = torch.zeros(1, 10, 10)
        just_below.view(-1)[:79] = 1.0  # 79 % edit area: defined
        assert torch.count_nonzero(area_scaler(just_below)) == 79

    def test_dag_scale_map_and_ablations(self):
        dag_map = torch.zeros(1, 10, 10)
        dag_map[0, 0:2, 0:2] = 1.0
        dag_map[0, 2, 0] = 0.02
        full = dag_scale_map(dag_map, DAGConfig())
        assert full.scale[0, 0, 0] == pytest.approx(4 * 0.05 * 5)
        assert full.scale[0, 2, 0] == pytest.approx(4 * 0.05 * 2)
        assert full.detected.tolist() == [True]
        no_area = dag_scale_map(dag_map, DAGConfig(area_scaler=False))
        assert no_area.scale[0, 0, 0] == pytest.approx(5.0) and no_area.scale[0, 2, 0] == pytest.approx(2.0)
        no_magnitude = dag_scale_map(dag_map, DAGConfig(magnitude_scaler=False))
        assert no_magnitude.scale[0, 2, 0] == pytest.approx(4 * 0.05)
        assert int(torch.count_nonzero(full.scale)) == 5


class TestDAGNoisePred:
    def test_only_edit_region_changes(self):
        generator = torch.Generator().manual_seed(0)
        e_u, e_p, e_s = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
        scale = torch.zeros(2, 8, 8)
        scale[0, 2:4, 2:4] = 1.5
        config = DAGConfig(base=SEGAConfig(edit_threshold=0.5))
        noise_pred, momentum = dag_noise_pred(e_u, e_p, [e_s], 7.5, scale, None, config)
        cfg = e_u + 7.5 * (e_p - e_u)
        outside = (scale == 0)[:, None].expand_as(cfg)
        assert torch.equal(noise_pred[outside], cfg[outside])
        assert not torch.equal(noise_pred[~outside], cfg[~outside])
        # momentum stays inside the region on the next step too
        noise_pred, _ = dag_noise_pred(e_u, e_p, [e_s], 7.5, scale, momentum, config)
        assert torch.equal(noise_pred[outside], cfg[outside])

    @pytest.mark.parametrize("base", [SEGAConfig(), SLDConfig()])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_keeps_the_dtype_of_the_predictions(self, base, dtype):
        """A float32 `S_dag` (detection runs in float32) with half-precision predictions: the guided prediction
        and the momentum stay in the predictions' dtype, at the first step and with momentum."""
        generator = torch.Generator().manual_seed(0)
        e_u, e_p, e_s = (torch.randn(2, 4, 8, 8, generator=generator).to(dtype) for _ in range(3))
        scale = torch.zeros(2, 8, 8)
        scale[:, 2:6, 2:6] = 3.0
        momentum = None
        for _ in range(2):
            noise_pred, momentum = dag_noise_pred(e_u, e_p, [e_s], 7.5, scale, momentum, DAGConfig(base=base))
            assert noise_pred.dtype == momentum.dtype == dtype

    def test_by_hand_sld_base(self):
        config = DAGConfig(base=SLDConfig(sld_threshold=0.0, sld_momentum_scale=0.0, sld_mom_beta=0.0))
        e_u, e_p, e_s = t([0.0, 0.0]), t([1.0, 1.0]), t([2.0, 0.5])  # e_p - e_s = [-1, 0.5]: only first masked
        scale = torch.tensor([[[2.0, 2.0]]])
        noise_pred, _ = dag_noise_pred(e_u, e_p, [e_s], 3.0, scale, None, config)
        assert torch.allclose(noise_pred, t([3.0 * (1 - 2 * 2.0), 3.0]))

    def test_norm_cap_by_hand(self):
        """Two channels, three pixels: a guided pixel over the cap, a guided pixel under it, an unguided one."""
        base = SLDConfig(sld_threshold=10.0, sld_momentum_scale=0.0, sld_mom_beta=0.0)  # mask everything in
        e_u = torch.zeros(1, 2, 1, 3)
        e_p = torch.tensor([[[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]])  # CFG at s_g 2: (2, 0), norm 2
        e_s = torch.tensor([[[[0.0, 0.1, 0.0]], [[1.0, 0.0, 1.0]]]])
        scale = torch.tensor([[[3.0, 1.0, 0.0]]])
        # uncapped, Table 1: 2 ((1, 0) - S e_s) = (2, -6) at pixel 0 (norm 6.3), (1.8, 0) at pixel 1, (2, 0) at 2
        noise_pred, _ = dag_noise_pred(e_u, e_p, [e_s], 2.0, scale, None, DAGConfig(base=base, norm_cap=1.5))
        direction = torch.tensor([2.0, -6.0]) / math.sqrt(40)
        assert torch.allclose(noise_pred[0, :, 0, 0], 1.5 * 2 * direction)  # capped at 1.5 × 2, same direction
        assert torch.allclose(noise_pred[0, :, 0, 1], torch.tensor([1.8, 0.0]))  # under the cap: as it was
        assert torch.equal(noise_pred[0, :, 0, 2], torch.tensor([2.0, 0.0]))  # not guided: the CFG prediction
        # a cap below 1 still leaves the pixels DAG does not guide alone
        noise_pred, _ = dag_noise_pred(e_u, e_p, [e_s], 2.0, scale, None, DAGConfig(base=base, norm_cap=0.5))
        assert torch.equal(noise_pred[0, :, 0, 2], torch.tensor([2.0, 0.0]))
        assert torch.allclose(noise_pred[0, :, 0, 1], torch.tensor([1.0, 0.0]))

    def test_by_hand_sega_form(self):
        """SEGA's own form: the DAG term is not multiplied by the guidance scale (Table 1's form: -9 above)."""
        base = SLDConfig(sld_threshold=0.0, sld_momentum_scale=0.0, sld_mom_beta=0.0)
        config = DAGConfig(base=base, guidance_form="sega")
        e_u, e_p, e_s = t([0.0, 0.0]), t([1.0, 1.0]), t([2.0, 0.5])
        noise_pred, _ = dag_noise_pred(e_u, e_p, [e_s], 3.0, torch.tensor([[[2.0, 2.0]]]), None, config)
        assert torch.allclose(noise_pred, t([3.0 * 1 - 2.0 * 2.0, 3.0]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"unsafe_threshold": 0.0},
        {"unsafe_threshold": 1.5},
        {"edit_mask_threshold": -0.1},
        {"edit_mask_threshold": 0.6},
        {"max_edit_area": 0},
        {"layer_fractions": ()},
        {"layers": ()},
        {"layers": "up_blocks.1"},
        {"layers": ("",)},
        {"warmup_steps": -1},
        {"max_magnitude": 0.5},
        {"fill_decay": 0.0},
        {"fill_decay": -1.0},
        {"fill_decay": float("inf")},
        {"fill_decay": 1.0, "area_scaler": False},
        {"fill_region": "watershed"},
        {"norm_cap": 0.0},
        {"hold_region": "pixels"},  # without hold_detection
        {"hold_region": "edge", "hold_detection": True},
        {"norm_cap": -1.0},
        {"components": "watershed"},
        {"basin_floor": 0.5},  # without components="basin"
        {"basin_floor": 0.0, "components": "basin"},
        {"basin_floor": 1.5, "components": "basin"},
        {"confirm_steps": 0, "detection": "presence", "presence_threshold": 0.5},
        {"confirm_steps": 1.5, "detection": "presence", "presence_threshold": 0.5},
        {"confirm_steps": 2},  # the paper's rule has no threshold to pass
    ],
)
def test_dag_config_rejects(kwargs):
    with pytest.raises(ValueError):
        DAGConfig(**kwargs)


def test_build_config_errors():
    with pytest.raises(ValueError, match="Unknown guidance method 'esd'"):
        build_config("esd")
    with pytest.raises(ValueError, match="Unknown SLD preset 'extreme'"):
        build_config("sld", "extreme")
    with pytest.raises(ValueError, match="Presets exist for SLD only"):
        build_config("sega", "strong")
    with pytest.raises(ValueError, match="Unknown option"):
        build_config("sega", sld_threshold=0.1)
    with pytest.raises(ValueError, match=r"edit_threshold.*\(0, 1\]"):
        build_config("sega", edit_threshold=0.0)
