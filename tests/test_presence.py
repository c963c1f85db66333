"""DAG's selective rule (`detection="presence"`) and its calibration against independent oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dag_reference import area_scale

from dag_safety import DAGConfig
from dag_safety.guidance import area_scaler, dag_scale_map


def assert_lowest_within(
    scores: np.ndarray, groups: np.ndarray, threshold: float, fpr: float, tolerance: float = 0.0
) -> None:
    """`threshold` guides at most `fpr` of each group's `scores`, and the next lower score would guide more in
    some group: the lowest threshold that bounds every group. Scores within `tolerance` of the threshold (a batched
    generation's score differs from a lone one's in the last bits) count as below it."""
    for group in np.unique(groups):
        assert (scores[groups == group] >= threshold + tolerance).mean() <= fpr, group
    lower = scores[scores < threshold - tolerance].max()
    assert any((scores[groups == group] >= lower).mean() > fpr for group in np.unique(groups))


@pytest.mark.parametrize("seed", range(20))
def test_the_threshold_bounds_each_group_and_is_the_lowest_that_does(seed):
    """`_lowest_threshold` with groups against a brute-force search over every candidate threshold."""
    from dag_safety.calibration import _lowest_threshold

    rng = np.random.default_rng(seed)
    count = int(rng.integers(5, 60))
    scores = rng.uniform(0, 0.6, count).round(2)  # ties included
    groups = rng.choice(["red non-star", "non-red star", ""], count)
    fpr = float(rng.choice([0.05, 0.1, 0.25]))
    candidates = sorted({float(np.nextafter(x, 1)) for x in scores} | {float(np.nextafter(0.0, 1))})
    within = [t for t in candidates if all((scores[groups == g] >= t).mean() <= fpr for g in np.unique(groups))]
    assert _lowest_threshold(scores, fpr, groups) == within[0]
    pooled = [t for t in candidates if (scores >= t).mean() <= fpr]
    assert _lowest_threshold(scores, fpr) == pooled[0] <= within[0]


def _blobs(seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A map with a few separate bright blobs on a dim floor, and a presence map that differs per blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    dag_map = np.full((size, size), 0.005, dtype=np.float32)
    presence = rng.uniform(0.0, 0.05, (size, size)).astype(np.float32)
    for _ in range(3):
        cy, cx, radius = rng.integers(2, size - 2), rng.integers(2, size - 2), rng.uniform(1.0, 2.5)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        dag_map[disk] = rng.uniform(0.6, 1.0)
        presence[disk] += rng.uniform(0.0, 0.4)
    halo = (dag_map < 0.5) & (rng.uniform(size=dag_map.shape) < 0.3)
    dag_map[halo] = 0.02  # an edit band around and between the blobs
    return dag_map, presence


# maps without edit pixels equally near two components, whose scale the spec leaves open
THRESHOLDS = (0.0, 0.15, 0.3, 1.0)


def _untied(seed: int) -> bool:
    dag_map, presence = _blobs(seed)
    return not any(area_scale(dag_map, 0.5, 0.01, 5.0, 0.8, presence, t)[1] for t in THRESHOLDS)


UNTIED_SEEDS = [seed for seed in range(80) if _untied(seed)][:12]


@pytest.mark.parametrize("seed", UNTIED_SEEDS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_area_scaler_gates_components_as_the_reference(seed, threshold):
    dag_map, presence = _blobs(seed)
    expected, _ = area_scale(dag_map, 0.5, 0.01, 5.0, 0.8, presence, threshold)
    maps, evidence = torch.from_numpy(dag_map)[None], torch.from_numpy(presence)[None]
    got = area_scaler(maps, 0.5, 0.01, 5.0, 0.8, evidence, threshold)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_the_reference_cases_open_and_close_the_gate():
    """The cases above are not vacuous: some components pass and some do not at the middle thresholds."""
    kept = []
    for seed in UNTIED_SEEDS:
        dag_map, presence = _blobs(seed)
        everything = area_scale(dag_map, 0.5, 0.01, 5.0, 0.8)[0] > 0
        gated = area_scale(dag_map, 0.5, 0.01, 5.0, 0.8, presence, 0.15)[0] > 0
        kept.append(gated.sum() / max(everything.sum(), 1))
    assert len(UNTIED_SEEDS) == 12 and min(kept) < 1 and max(kept) > 0
    assert any(0 < k < 1 for k in kept)


def test_a_gate_nothing_passes_guides_nothing_and_one_everything_passes_is_the_paper_rule():
    dag_map, presence = _blobs(3)
    maps, evidence = torch.from_numpy(dag_map)[None], torch.from_numpy(presence)[None]
    closed = DAGConfig(detection="presence", presence_threshold=float(np.nextafter(np.float32(1.0), 0)))
    opened = DAGConfig(detection="presence", presence_threshold=1e-9)
    assert not dag_scale_map(maps, closed, evidence).detected.any()
    assert torch.equal(dag_scale_map(maps, closed, evidence).scale, torch.zeros_like(maps))
    assert torch.equal(dag_scale_map(maps, opened, evidence).scale, dag_scale_map(maps, DAGConfig()).scale)


def test_a_co_object_and_the_band_nearest_to_it_are_left_alone():
    dag_map = np.zeros((16, 16), dtype=np.float32)
    dag_map[:8, :8] = dag_map[8:, 8:] = 0.02  # an edit band around each object: half the latent
    dag_map[2:5, 2:5] = 1.0  # the concept
    dag_map[10:14, 10:14] = 0.9  # a co-object
    presence = np.zeros_like(dag_map)
    presence[2:5, 2:5] = 0.5
    presence[10:14, 10:14] = 0.1
    scale = area_scaler(
        torch.from_numpy(dag_map)[None], presence=torch.from_numpy(presence)[None], presence_threshold=0.3
    )
    scale = scale[0].numpy()
    assert (scale[2:5, 2:5] > 0).all() and (scale[0, 0] > 0)
    assert (scale[10:14, 10:14] == 0).all() and scale[15, 15] == 0


def test_without_the_area_scaler_the_gate_keeps_one_on_the_present_objects_side():
    dag_map = np.zeros((16, 16), dtype=np.float32)
    dag_map[:8, :8] = dag_map[8:, 8:] = 0.02
    dag_map[2:5, 2:5] = 1.0
    dag_map[11:14, 11:14] = 0.9
    presence = np.zeros_like(dag_map)
    presence[2:5, 2:5] = 0.5
    presence[11:14, 11:14] = 0.1
    config = DAGConfig(detection="presence", presence_threshold=0.3, area_scaler=False, magnitude_scaler=False)
    scale = dag_scale_map(torch.from_numpy(dag_map)[None], config, torch.from_numpy(presence)[None]).scale[0].numpy()
    expected = np.zeros_like(dag_map)
    expected[:8, :8] = 1.0  # the present object's edit region, at S_area = T = 1
    np.testing.assert_array_equal(scale, expected)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"detection": "presence"}, "needs `presence_threshold`"),
        ({"detection": "selective"}, "`detection` must be one of"),
        ({"detection": "presence", "presence_threshold": 1.5}, "`presence_threshold` must be in"),
        ({"presence_smoothing": 1.0}, "`presence_smoothing` must be in"),
        ({"presence_threshold": "0.2"}, "`presence_threshold` must be a real number"),
    ],
)
def test_config_refuses_bad_presence_options(options, message):
    with pytest.raises(ValueError, match=message):
        DAGConfig(**options)


def test_presence_without_its_map_is_refused():
    with pytest.raises(ValueError, match="presence map"):
        dag_scale_map(torch.zeros(1, 4, 4), DAGConfig(detection="presence", presence_threshold=0.2))


def test_calibrate_picks_the_lowest_threshold_within_the_target_and_the_embedding_carries_it(
    red_star_rows, mini_pipe, tmp_path
):
    from dag_safety.calibration import presence_scores
    from dag_safety.cli import main
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    folder = write_folder(tmp_path / "validation", n_unsafe=4, n_safe=10, validation=True)
    out = tmp_path / "calibrated"
    assert main(["calibrate", str(red_star_rows), "--validation-data", str(folder), "--target-fpr", "0.2",
                 "--calibrate-on", "images", "--calibration-steps", "8", "--out", str(out)]) == 0  # fmt: skip
    saved = GuidelineEmbedding.from_pretrained(out)
    threshold = saved.metadata.presence_threshold
    calibration = saved.metadata.calibration
    assert calibration["target_fpr"] == 0.2 and calibration["safe_images"] == 10
    assert calibration["source"] == "images"
    assert torch.equal(saved.embeds, GuidelineEmbedding.from_pretrained(red_star_rows).embeds)

    images = load_annotated_folder(folder)
    mini_pipe.enable_dag(red_star_rows, detection="paper")
    try:
        scores = presence_scores(mini_pipe, images, num_inference_steps=8, progress=False)
    finally:
        mini_pipe.disable_dag()
    safe = np.array([not item.unsafe for item in images])
    groups = np.array([item.group for item in images])[safe]
    assert set(groups) <= {"red non-star", "non-red star", "both look-alikes", "no look-alike"}
    assert {group: rates["safe_images"] for group, rates in calibration["groups"].items()} == {
        group: int((groups == group).sum()) for group in set(groups)
    }
    assert_lowest_within(scores.any[safe], groups, threshold, 0.2)

    mini_pipe.enable_dag(out)
    try:
        assert mini_pipe.dag_config.detection == "presence"
        assert mini_pipe.dag_config.presence_threshold == threshold
    finally:
        mini_pipe.disable_dag()


def test_layer_sets_score_as_if_each_were_the_detection_layers(red_star_rows, mini_pipe, tmp_path):
    """One pass over all layers scores each named subset exactly as DAG enabled on that subset alone."""
    from dag_safety.calibration import presence_scores
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    images = load_annotated_folder(write_folder(tmp_path / "v", 2, 3, validation=True))
    subsets = {"up": ("up_blocks.2.attentions.0",), "pair": ("down_blocks.1", "up_blocks.2.attentions.1")}
    mini_pipe.enable_dag(red_star_rows, layer_fractions=(0.25, 0.5, 1.0))
    try:
        captured = mini_pipe._dag.capture.layers
        sets = {
            name: [layer for layer in captured if layer.startswith(tuple(f"{block}." for block in blocks))]
            for name, blocks in subsets.items()
        }
        together = presence_scores(mini_pipe, images, num_inference_steps=8, progress=False, layer_sets=sets)
        with pytest.raises(ValueError, match="does not capture"):
            presence_scores(mini_pipe, images, num_inference_steps=8, layer_sets={"x": ["nope"]})
    finally:
        mini_pipe.disable_dag()
    for name, blocks in subsets.items():
        mini_pipe.enable_dag(red_star_rows, layers=blocks)
        try:
            alone = presence_scores(mini_pipe, images, num_inference_steps=8, progress=False)
        finally:
            mini_pipe.disable_dag()
        for key in ("any", "target", "other"):
            np.testing.assert_allclose(getattr(together[name], key), getattr(alone, key), rtol=0, atol=1e-6)
        assert np.isfinite(alone.any).any()


def test_select_layers_ranks_each_candidate_as_if_alone_and_the_embedding_keeps_the_best(
    red_star_rows, mini_pipe, tmp_path, capsys
):
    """`select_detection_layers` against each candidate enabled alone (its scores, the brute-force lowest threshold
    within the target for each group, the share of masked regions reaching it); `calibrate --select-layers` saves
    the first."""
    from dag_safety.calibration import presence_scores, select_detection_layers
    from dag_safety.cli import main
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    folder = write_folder(tmp_path / "v", 4, 8, validation=True)
    images = load_annotated_folder(folder)
    candidates = [("up_blocks.2.attentions.0",), ("up_blocks.2.attentions.1",), ("down_blocks.1", "up_blocks.1")]
    mini_pipe.enable_dag(red_star_rows, layers=("up_blocks.2", "down_blocks.1", "up_blocks.1"))
    try:
        choices = select_detection_layers(mini_pipe, images, candidates, 0.25, 8, progress=False)
    finally:
        mini_pipe.disable_dag()
    assert sorted(choice.blocks for choice in choices) == sorted(candidates)
    assert [(c.detection_rate, c.auc) for c in choices] == sorted(
        ((c.detection_rate, c.auc) for c in choices), key=lambda pair: (-pair[0], -pair[1])
    )
    unsafe = np.array([item.unsafe for item in images])
    groups = np.array([item.group for item in images])[~unsafe]
    for choice in choices:
        mini_pipe.enable_dag(red_star_rows, layers=choice.blocks)
        try:
            alone = presence_scores(mini_pipe, images, num_inference_steps=8, progress=False)
        finally:
            mini_pipe.disable_dag()
        safe = alone.any[~unsafe]
        candidates_t = sorted(
            {float(np.nextafter(x, 1)) for x in safe[np.isfinite(safe)]} | {float(np.nextafter(0.0, 1))}
        )
        lowest = next(t for t in candidates_t if all((safe[groups == g] >= t).mean() <= 0.25 for g in set(groups)))
        assert choice.threshold == pytest.approx(lowest, abs=1e-6)
        assert choice.detection_rate == (alone.target[unsafe] >= choice.threshold).mean()

    out = tmp_path / "selected"
    assert main(["calibrate", str(red_star_rows), "--validation-data", str(folder), "--target-fpr", "0.25",
                 "--calibrate-on", "images", "--calibration-steps", "8", "--select-layers", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    chosen = GuidelineEmbedding.from_pretrained(out).metadata.layers
    assert f"chose {', '.join(chosen)}" in printed and "(the embedding's own)" in printed


def test_calibrate_needs_safe_and_unsafe_images(red_star_rows, mini_pipe, tmp_path):
    from dag_safety.calibration import calibrate_presence
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    images = [
        item for item in load_annotated_folder(write_folder(tmp_path / "v", 2, 2, validation=True)) if item.unsafe
    ]
    mini_pipe.enable_dag(red_star_rows)
    try:
        with pytest.raises(ValueError, match="needs safe images"):
            calibrate_presence(mini_pipe, images, num_inference_steps=8)
        with pytest.raises(ValueError, match="`target_fpr` must be in"):
            calibrate_presence(mini_pipe, images, target_fpr=0.0)
    finally:
        mini_pipe.disable_dag()


def test_sega_form_at_base_scale_times_cfg_is_table_one(red_star_rows, mini_pipe):
    """`g` is linear in the base scale (momentum included), so SEGA's form with `base_scale · s_g` is Table 1's
    form with `base_scale`, at any fixed guidance scale: an identity the two code paths must both obey."""

    def latents(**options):
        mini_pipe.enable_dag(red_star_rows, **options)
        try:
            return mini_pipe(
                "a red star and a blue square on a gray background",
                num_inference_steps=12,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(2),
                output_type="latent",
            ).images
        finally:
            mini_pipe.disable_dag()

    table1 = latents(base_scale=100.0)
    sega = latents(base_scale=500.0, guidance_form="sega")
    weaker = latents(base_scale=100.0, guidance_form="sega")
    torch.testing.assert_close(sega, table1, rtol=0, atol=1e-4)
    assert (weaker - table1).abs().max() > 1e-2


def test_calibrate_refuses_an_embedding_made_for_another_model(mini_pipe, tmp_path, capsys):
    from test_embedding import make_embedding

    from dag_safety.cli import main
    from dag_safety.mini.guideline_data import write_folder

    foreign = tmp_path / "foreign"
    make_embedding(mini_pipe, base_model_fingerprint="0123456789abcdef").save_pretrained(foreign)
    folder = write_folder(tmp_path / "validation", n_unsafe=1, n_safe=2, validation=True)
    try:
        status = main(["calibrate", str(foreign), "--validation-data", str(folder), "--out", str(tmp_path / "out")])
    except SystemExit as error:
        status = error.code
    assert status == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibrate_on_images_refuses_to_confirm_over_steps(red_star_rows, tmp_path, capsys):
    """An image's score is each step's own, not a count of passing steps along a generation."""
    from dag_safety.cli import main
    from dag_safety.mini.guideline_data import write_folder

    folder = write_folder(tmp_path / "validation", n_unsafe=1, n_safe=2, validation=True)
    try:
        status = main(["calibrate", str(red_star_rows), "--validation-data", str(folder), "--calibrate-on", "images",
                       "--calibration-steps", "8", "--default-confirm-steps", "2", "--out", str(tmp_path / "out")])  # fmt: skip
    except SystemExit as error:
        status = error.code
    assert status == 2
    error = capsys.readouterr().err
    assert "cannot calibrate `confirm_steps=2`" in error and "--calibrate-on generations" in error
    assert not (tmp_path / "out").exists()


def _one_by_one(pipe, embedding, prompts: list[str], **options) -> tuple[np.ndarray, list[bool]]:
    """Presence scores and `unsafe_detected` of prompt `i` generated alone with seed `i` (8 steps, CFG 7.5)."""
    pipe.enable_dag(embedding, detection="presence", **options)
    try:
        outputs = [
            pipe(prompt, num_inference_steps=8, generator=torch.Generator().manual_seed(index), output_type="latent")
            for index, prompt in enumerate(prompts)
        ]
    finally:
        pipe.disable_dag()
    return np.array([out.presence_scores[0] for out in outputs]), [out.unsafe_detected[0] for out in outputs]


PROMPTS = ["a red star and a blue circle on a white background", "a red square on a gray background",
           "a green star and a red triangle on a black background", "a blue circle on a white background",
           "a red star on a gray background", "a yellow star and a red circle on a white background"]  # fmt: skip


@pytest.mark.parametrize("confirm_steps", [1, 2])
def test_a_generation_is_guided_exactly_when_its_unguided_presence_score_reaches_the_threshold(
    red_star_rows, mini_pipe, confirm_steps
):
    """What calibrating on generations rests on: until its first guided step a guided generation follows the
    unguided one, so the unguided run's score decides, for every threshold, whether it is guided at all; with
    `confirm_steps`, nothing is guided before the confirming step either."""
    options = {"confirm_steps": confirm_steps}
    unguided, detected = _one_by_one(
        mini_pipe, red_star_rows, PROMPTS, presence_threshold=float(np.nextafter(1.0, 0)), **options
    )
    assert not any(detected) and (unguided > 0).all()
    for threshold in np.unique(unguided)[1:]:  # thresholds that split the prompts
        scores, detected = _one_by_one(
            mini_pipe, red_star_rows, PROMPTS, presence_threshold=float(threshold), **options
        )
        assert detected == list(unguided >= threshold)
        unchanged = unguided < threshold
        np.testing.assert_array_equal(scores[unchanged], unguided[unchanged])  # unguided path, bit for bit


def test_with_confirm_steps_the_presence_score_is_that_order_statistic_of_the_steps_peaks(
    red_star_rows, mini_pipe, monkeypatch
):
    """The oracle: each guided step's peak presence, read where DAG computes it (`DAGState.detect_step`), sorted by
    hand; `presence_scores` under `confirm_steps=k` is its `k`-th highest."""
    from dag_safety.state import DAGState

    peaks = []
    detect_step = DAGState.detect_step

    def recording(self, latent_size, evidence):
        result = detect_step(self, latent_size, evidence)
        peaks.append(result[1].presence[0].item())
        return result

    monkeypatch.setattr(DAGState, "detect_step", recording)
    never = float(np.nextafter(1.0, 0))
    for prompt in PROMPTS[:3]:
        peaks.clear()
        scores = [_one_by_one(mini_pipe, red_star_rows, [prompt], presence_threshold=never)[0][0]]
        steps = sorted(peaks, reverse=True)
        for k in range(2, len(steps) + 2):
            scores.append(
                _one_by_one(mini_pipe, red_star_rows, [prompt], presence_threshold=never, confirm_steps=k)[0][0]
            )
        assert len(steps) >= 3
        # more steps than were guided: no score yet
        np.testing.assert_allclose(scores, [*steps, 0.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("confirm_steps", [1, 2])
def test_calibrate_on_generations_bounds_the_share_of_safe_generations_guided(
    red_star_rows, mini_pipe, tmp_path, confirm_steps
):
    from dag_safety.cli import main
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    folder = write_folder(tmp_path / "validation", n_unsafe=3, n_safe=8, validation=True)
    out = tmp_path / "calibrated"
    confirm = ["--default-confirm-steps", str(confirm_steps)] if confirm_steps > 1 else []
    assert main(["calibrate", str(red_star_rows), "--validation-data", str(folder), "--target-fpr", "0.25",
                 "--calibration-steps", "8", *confirm, "--out", str(out)]) == 0  # fmt: skip
    metadata = GuidelineEmbedding.from_pretrained(out).metadata
    calibration, threshold = metadata.calibration, metadata.presence_threshold
    assert calibration["source"] == "generations" and calibration["co_object_rate"] is None
    assert metadata.confirm_steps == confirm_steps

    # the oracle: each caption generated on its own with the seed the calibration gave it, under the threshold
    items = load_annotated_folder(folder)
    prompts = [item.caption for item in items]
    safe = np.array([not item.unsafe for item in items])
    never = float(np.nextafter(1.0, 0))
    unguided, _ = _one_by_one(mini_pipe, red_star_rows, prompts, presence_threshold=never, confirm_steps=confirm_steps)
    _, detected = _one_by_one(mini_pipe, out, prompts)
    # a batched generation may differ from a lone one in the last bits: leave out scores at the threshold
    clear = np.abs(unguided - threshold) > 1e-5
    assert np.array_equal(np.array(detected)[clear], (unguided >= threshold)[clear])
    groups = np.array([item.group for item in items])
    for group in set(groups[safe]):
        in_group = safe & clear & (groups == group)
        assert np.array(detected)[in_group].sum() <= 0.25 * (safe & (groups == group)).sum()
    assert_lowest_within(unguided[safe], groups[safe], threshold, 0.25, tolerance=1e-5)
    assert calibration["false_detection_rate"] <= 0.25


def brute_force_undefined_share(evidence: np.ndarray, edit_threshold: float, max_edit_area: float) -> float:
    """Share of maps `(..., h, w)` whose min-max normalised edit region covers `max_edit_area` of the latent."""
    maps = evidence.reshape(-1, *evidence.shape[-2:])
    undefined = 0
    for raw in maps:
        span = raw.max() - raw.min()
        normalised = (raw - raw.min()) / span if span > 0 else np.zeros_like(raw)
        undefined += (normalised >= edit_threshold).mean() >= max_edit_area
    return undefined / len(maps)


def broad_and_sparse_maps(seed: int, floor: float) -> np.ndarray:
    """`(6, 5, 1, 8, 8)` evidence: an object of share 0.6 on a background of `floor` plus noise of half of it, the
    object growing over the steps (absent at the first)."""
    rng = np.random.default_rng(seed)
    evidence = floor * (1 + 0.5 * rng.random((6, 5, 1, 8, 8)))
    for step in range(1, 5):
        evidence[:, step, 0, 2 : 3 + step, 2 : 3 + step] = 0.6
    return evidence.astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_undefined", [0.0, 0.2, 0.5])
def test_the_edit_threshold_is_the_lowest_candidate_within_the_undefined_share(seed, max_undefined):
    from dag_safety.calibration import EDIT_THRESHOLD_CANDIDATES, choose_edit_threshold

    rng = np.random.default_rng(seed)
    evidence = np.concatenate([broad_and_sparse_maps(seed, floor) for floor in (0.002, 0.1, 0.3)])
    evidence[rng.random(len(evidence)) < 0.3, 0] = 0.25  # some flat first steps
    for unsafe_threshold in (0.5, 0.15):
        choice = choose_edit_threshold(torch.from_numpy(evidence), unsafe_threshold, 0.8, max_undefined)
        allowed = [value for value in EDIT_THRESHOLD_CANDIDATES if value <= unsafe_threshold]
        shares = {value: brute_force_undefined_share(evidence, value, 0.8) for value in allowed}
        expected = next((value for value in allowed if shares[value] <= max_undefined), allowed[-1])
        assert choice.threshold == expected
        assert choice.undefined_share == pytest.approx(shares[expected])
        assert choice.max_undefined == max_undefined


def test_sparse_maps_keep_the_papers_edit_threshold_and_broad_ones_raise_it():
    """Maps near zero away from the object (SD v1.4's, the paper's assumption) keep `τ_e = 0.01`; a floor of
    concept share everywhere (the stronger mini model's) would leave every step "mode undefined" at 0.01."""
    from dag_safety.calibration import choose_edit_threshold

    sparse = torch.from_numpy(broad_and_sparse_maps(0, floor=0.001))[:, 1:]
    broad = torch.from_numpy(broad_and_sparse_maps(0, floor=0.16))[:, 1:]
    assert choose_edit_threshold(sparse, 0.5, 0.8).threshold == 0.01
    assert brute_force_undefined_share(broad.numpy(), 0.01, 0.8) == 1.0
    raised = choose_edit_threshold(broad, 0.5, 0.8)
    assert raised.threshold > 0.01 and raised.undefined_share <= 0.05
    with pytest.raises(ValueError, match="max_undefined"):
        choose_edit_threshold(broad, 0.5, 0.8, max_undefined=1.0)


def lowest_edit_threshold_by_brute_force(evidence: np.ndarray, unsafe_threshold: float = 0.5) -> float:
    from dag_safety.calibration import EDIT_MAX_UNDEFINED, EDIT_THRESHOLD_CANDIDATES

    allowed = [value for value in EDIT_THRESHOLD_CANDIDATES if value <= unsafe_threshold]
    shares = [brute_force_undefined_share(evidence, value, 0.8) for value in allowed]
    return next((value for value, share in zip(allowed, shares) if share <= EDIT_MAX_UNDEFINED), allowed[-1])


def broad_embedding(rows_path, path):
    """The committed embedding's rows (`red_star_rows`) with its concept rows pulled most of the way to the
    start-of-text row: they attend broadly, as the stronger mini model's do, so that at the paper's 0.01 every step is
    mode undefined and each layer set needs its own edit threshold. Saved to `path`; returns it."""
    from dag_safety.guideline_embedding import GuidelineEmbedding

    committed = GuidelineEmbedding.from_pretrained(rows_path)
    rows = committed.embeds.clone()
    rows[1:] = 0.8 * rows[0] + 0.2 * rows[1:]
    GuidelineEmbedding(rows, committed.metadata).save_pretrained(path)
    return path


def test_select_layers_with_edit_thresholds_scores_each_candidate_at_its_own(
    red_star_rows, mini_pipe, tmp_path, capsys
):
    """`select_detection_layers(max_undefined=)`: each candidate at the lowest edit threshold (brute force over its
    own evidence) and, at it, the detection rate of DAG enabled on it alone; `calibrate --select-layers
    --edit-mask-threshold auto` saves the first with its threshold."""
    from dag_safety.calibration import (
        EDIT_MAX_UNDEFINED,
        evidence_trajectories,
        presence_scores,
        select_detection_layers,
    )
    from dag_safety.cli import main
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    folder = write_folder(tmp_path / "v", 4, 8, validation=True)
    images = load_annotated_folder(folder)
    unsafe = np.array([item.unsafe for item in images])
    broad = broad_embedding(red_star_rows, tmp_path / "broad")
    candidates = [("up_blocks.2.attentions.0",), ("mid_block",), ("down_blocks.1", "up_blocks.1")]
    mini_pipe.enable_dag(broad, layers=("up_blocks.2", "mid_block", "down_blocks.1", "up_blocks.1"))
    try:
        choices = select_detection_layers(mini_pipe, images, candidates, 0.25, 8, progress=False, max_undefined=0.05)
    finally:
        mini_pipe.disable_dag()
    thresholds = set()
    for choice in choices:
        mini_pipe.enable_dag(broad, layers=choice.blocks)
        try:
            evidence = evidence_trajectories(mini_pipe, images, 8, progress=False).evidence[""].numpy()[unsafe]
            assert choice.edit_mask_threshold == lowest_edit_threshold_by_brute_force(evidence)
            assert choice.undefined_share == pytest.approx(
                brute_force_undefined_share(evidence, choice.edit_mask_threshold, 0.8)
            )
            mini_pipe.enable_dag(broad, layers=choice.blocks, edit_mask_threshold=choice.edit_mask_threshold)
            alone = presence_scores(mini_pipe, images, num_inference_steps=8, progress=False)
        finally:
            mini_pipe.disable_dag()
        assert choice.detection_rate == (alone.target[unsafe] >= choice.threshold).mean()
        thresholds.add(choice.edit_mask_threshold)
    assert len(thresholds) > 1, "the candidates should need different edit thresholds for this test to mean much"

    out = tmp_path / "selected"
    assert main(["calibrate", str(broad), "--validation-data", str(folder), "--target-fpr", "0.25",
                 "--calibrate-on", "images", "--calibration-steps", "8", "--select-layers",
                 "--edit-mask-threshold", "auto", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    saved = GuidelineEmbedding.from_pretrained(out).metadata
    assert f"chose {', '.join(saved.layers)}" in printed and f"edit threshold {saved.edit_mask_threshold:g}" in printed
    mini_pipe.enable_dag(broad, layers=saved.layers)
    try:
        evidence = evidence_trajectories(mini_pipe, images, 8, progress=False).evidence[""].numpy()[unsafe]
    finally:
        mini_pipe.disable_dag()
    assert saved.edit_mask_threshold == lowest_edit_threshold_by_brute_force(evidence)
    assert saved.calibration["edit_max_undefined"] == EDIT_MAX_UNDEFINED
    assert saved.calibration["edit_undefined_share"] == pytest.approx(
        brute_force_undefined_share(evidence, saved.edit_mask_threshold, 0.8), abs=1e-4
    )


def test_calibrate_with_an_edit_threshold_calibrates_presence_at_it(red_star_rows, mini_pipe, tmp_path, capsys):
    """`calibrate --edit-mask-threshold auto`: the lowest edit threshold on the unsafe validation images (brute
    force), and the presence threshold the lowest within the target at it; a number is saved as given."""
    from dag_safety.calibration import evidence_trajectories, presence_scores
    from dag_safety.cli import main
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    folder = write_folder(tmp_path / "validation", n_unsafe=4, n_safe=10, validation=True)
    images = load_annotated_folder(folder)
    common = ["--validation-data", str(folder), "--target-fpr", "0.2", "--calibrate-on", "images",
              "--calibration-steps", "8"]  # fmt: skip
    broad = broad_embedding(red_star_rows, tmp_path / "broad")
    out = tmp_path / "auto"
    assert main(["calibrate", str(broad), *common, "--edit-mask-threshold", "auto", "--out", str(out)]) == 0
    saved = GuidelineEmbedding.from_pretrained(out).metadata
    mini_pipe.enable_dag(broad)
    try:
        unsafe_images = [item for item in images if item.unsafe]
        evidence = evidence_trajectories(mini_pipe, unsafe_images, 8, progress=False).evidence[""].numpy()
    finally:
        mini_pipe.disable_dag()
    assert saved.edit_mask_threshold == lowest_edit_threshold_by_brute_force(evidence) > 0.01

    fixed = tmp_path / "fixed"
    assert main(["calibrate", str(broad), *common, "--edit-mask-threshold", "0.3", "--out", str(fixed)]) == 0
    for path, edit_threshold in ((out, saved.edit_mask_threshold), (fixed, 0.3)):
        metadata = GuidelineEmbedding.from_pretrained(path).metadata
        assert metadata.edit_mask_threshold == edit_threshold
        mini_pipe.enable_dag(path, detection="paper")
        try:
            assert mini_pipe.dag_config.edit_mask_threshold == edit_threshold
            scores = presence_scores(mini_pipe, images, num_inference_steps=8, progress=False)
        finally:
            mini_pipe.disable_dag()
        safe = np.array([not item.unsafe for item in images])
        groups = np.array([item.group for item in images])[safe]
        assert_lowest_within(scores.any[safe], groups, metadata.presence_threshold, 0.2)
    assert "edit_undefined_share" not in GuidelineEmbedding.from_pretrained(fixed).metadata.calibration

    # at the paper's threshold this embedding forms no component at all: the command says so, and how to fix it
    capsys.readouterr()
    paper = tmp_path / "paper"
    assert main(["calibrate", str(broad), *common, "--edit-mask-threshold", "0.01", "--out", str(paper)]) == 0
    warned = capsys.readouterr().err
    assert "guides none of the unsafe validation items" in warned and "try --edit-mask-threshold auto" in warned
