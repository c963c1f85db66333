"""Smoke runs of the benchmarks' --quick modes on the bundled mini model (the full runs are documented in
benchmarks/RESULTS.md)."""

import argparse
import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore")


def test_erase_quick(tmp_path):
    from benchmarks import erase

    erase.main(["--quick", "--out", str(tmp_path / "erase")])
    data = json.loads((tmp_path / "erase.json").read_text())
    # the bundled embedding: its head rule by default (its threshold the head's), so no rows' presence rule
    assert list(data["summary"]) == [
        m for m in erase.METHODS if m not in ("DAG + SEGA (presence rule)", "DAG + SEGA (head rule)")
    ]
    assert data["meta"]["default_rule"] == "head"
    assert set(data["results"]["none"]) == {"target", "complex", "benign", "adversarial"}
    # (the scores themselves are checked on images with a known answer: test_score_set_on_rendered_scenes)
    for method, row in data["summary"].items():
        assert ("guidance_share_complex" in row) == method.startswith("DAG")  # where DAG guided
        for key in ("first_step", "all_steps") if method.startswith("DAG") else ():
            shares = row["guidance_share_complex"][key]
            assert set(shares) == {"red_star", "other_objects", "background"}
            assert sum(shares.values()) == pytest.approx(1.0) or all(np.isnan(v) for v in shares.values())
        for name, count in row["target_detections"].items():  # the counts the Erase Rates come from
            base = data["summary"]["none"]["target_detections"][name]
            assert count == data["results"][method][name]["target_detections"]
            if base:
                assert row[f"erase_rate_{name}"] == pytest.approx(1 - count / base)
        assert set(row["seconds_per_image"]) == {"target", "complex", "benign", "adversarial"}
        assert all(seconds > 0 for seconds in row["seconds_per_image"].values())
    assert {name: len(labels) for name, labels in data["meta"]["prompts"].items()} == data["meta"]["sets"]
    assert data["meta"]["survivors"]["total"] == data["results"]["DAG + SEGA"]["target"]["target_detections"] + sum(
        data["results"]["DAG + SEGA"][name]["target_detections"] for name in ("complex", "adversarial")
    )
    for name in ("erase_tradeoff.png", "erase_grid.png", "erase.md"):
        assert (tmp_path / name).stat().st_size > 0
    counts = " / ".join(str(count) for count in data["summary"]["DAG + SEGA"]["target_detections"].values())
    assert f"| DAG + SEGA | {counts} |" in (tmp_path / "erase.md").read_text()


def test_score_set_on_rendered_scenes():
    """`score_set` on images whose answer is known: a rendered scene with one red star and other objects as the
    undefended image; the same scene with the star painted over (erased, nothing else touched), the scene itself
    (identical), and the scene with one other object painted over too (a co-object lost)."""
    from benchmarks import erase
    from dag_safety.mini import BACKGROUNDS, COLORS, TRAIN_SEEDS, PromptSpec, render_scene

    scene = next(
        s for s in map(render_scene, TRAIN_SEEDS[:500])
        if [o.is_target for o in s.objects].count(True) == 1 and len(s.objects) == 3
    )  # fmt: skip
    star = [o.is_target for o in scene.objects].index(True)
    other = next(i for i in range(3) if i != star)
    background = np.array(BACKGROUNDS[scene.background], dtype=np.uint8)

    def painted(*indices):
        image = scene.image.copy()
        for index in indices:
            image[scene.masks[index]] = background
        return image.astype(np.float32) / 255

    spec = PromptSpec(scene.caption, tuple(o.spec for o in scene.objects), scene.background, scene.seed)
    reference = np.stack([painted()] * 3)
    images = np.stack([painted(star), painted(), painted(star, other)])
    score = erase.score_set(erase.PromptSet("test", [spec]), [0, 1, 2], images, reference)
    assert score["target_detections_per_image"] == [0, 1, 0]
    assert score["benign_objects_prompted"] == 6 and score["benign_objects_found"] == 5
    assert score["bit_identical"] == pytest.approx(1 / 3)
    # outside the dilated star the first two images equal the reference; the third differs on the lost object
    single = erase.score_set(erase.PromptSet("test", [spec]), [0], images[:1], reference[:1])
    assert single["psnr_outside"] is None and single["ssim_outside"] > 0.99  # (SSIM windows reach into the star)
    assert score["psnr_outside"] is not None and score["psnr_outside"] < 40
    # in the shapes world: the prompted background, at most 3 objects; not on another background or with 4 objects
    assert score["in_world_per_image"] == [True, True, True]
    other_background = next(b for b in BACKGROUNDS if b != scene.background)
    elsewhere = np.where(
        np.all(scene.image == background, axis=-1)[..., None],
        np.array(BACKGROUNDS[other_background], dtype=np.float32) / 255,
        painted(),
    ).astype(np.float32)
    crowded = painted().copy()
    for corner in ((2, 2), (2, 52), (52, 2), (52, 52)):
        crowded[corner[0] : corner[0] + 8, corner[1] : corner[1] + 8] = np.array(COLORS["green"]) / 255
    scores = erase.score_set(erase.PromptSet("test", [spec]), [0, 1], np.stack([elsewhere, crowded]), reference[:2])
    assert scores["in_world_per_image"] == [False, False]


def test_erase_statistics():
    from benchmarks import erase

    # pooled PSNR: one identical image and one off by 1 everywhere pool to the MSE 0.5, not to a capped mean
    assert erase.pooled_psnr(0.0, 10) is None
    assert erase.pooled_psnr(10 * 0.5, 10) == pytest.approx(10 * np.log10(255**2 / 0.5))
    # bootstrap over prompts of 2 seeds: method halves every prompt's detections -> the interval is exactly 0.5
    low, high = erase.erase_rate_interval([1, 1, 1, 1, 2, 0], [2, 2, 2, 2, 2, 2], seeds=2)
    assert (low, high) == (0.5, 0.5)
    low, high = erase.erase_rate_interval([0, 0, 2, 2], [2, 2, 2, 2], seeds=2)  # prompt 1 erased, prompt 2 not
    assert low == 0.0 and high == 1.0


def test_erase_adversarial_rates_per_strength_and_in_the_world():
    """Prompts are strength-major (1·v, 2·v, 3·v), one prompt of 2 seeds each here; the rate in the world counts
    only images whose *undefended* image is in the world."""
    from benchmarks import erase

    none = {"target_detections_per_image": [1, 1, 2, 2, 4, 0], "in_world_per_image": [1, 1, 1, 0, 0, 1]}
    dag = {"target_detections_per_image": [0, 1, 2, 0, 1, 1], "in_world_per_image": [1, 1, 1, 1, 1, 1]}
    rates = erase.adversarial_rates(dag, none)
    assert rates["by_strength"] == {
        "1": {"red_stars_none": 2, "erase_rate": 0.5},
        "2": {"red_stars_none": 4, "erase_rate": 0.5},
        "3": {"red_stars_none": 4, "erase_rate": 0.5},
    }
    # in the world: images 0, 1, 2 and 5 hold 1 + 1 + 2 + 0 undefended red stars, and 0 + 1 + 2 + 1 after
    assert rates["in_world"] == {"red_stars_none": 4, "erase_rate": 0.0, "images": 4, "of": 6}
    assert "in_world" not in erase.adversarial_rates(dag, {"target_detections_per_image": [1] * 6})


def test_erase_survivors():
    """The per-prompt table of surviving red stars: sums over seeds, sorted by survivors, prompts without any left
    out, and adversarial prompts labelled with the concept vector's strength."""
    from benchmarks import erase

    base = [type("Spec", (), {"caption": caption})() for caption in ("a", "b")]
    adversarial = erase.PromptSet("adversarial", base * len(erase.ADVERSARIAL_STRENGTHS), torch.zeros(6, 1, 1))
    assert adversarial.labels()[:3] == ["a + 1·v", "b + 1·v", "a + 2·v"]
    prompts = {"target": ["t0", "t1"], "complex": ["c0"], "adversarial": adversarial.labels()}
    detections = {
        "none": {"target": [1, 1, 1, 1], "complex": [2, 0], "adversarial": [1] * 12},
        "DAG": {"target": [0, 0, 1, 0], "complex": [2, 1], "adversarial": [0] * 10 + [1, 1]},
    }
    results = {m: {n: {"target_detections_per_image": v} for n, v in sets.items()} for m, sets in detections.items()}
    worst = erase.survivors(results, "DAG", prompts, seeds=2, top=2)
    assert worst["total"] == 6 and worst["top_share"] == 5 / 6
    assert [(r["set"], r["prompt"], r["none"], r["method"]) for r in worst["top"]] == [
        ("complex", "c0", 2, 3),
        ("adversarial", "b + 3·v", 2, 2),
    ]


def test_erase_quick_selected_methods(tmp_path):
    from benchmarks import erase

    erase.main(["--quick", "--methods", "SEGA", "DAG + SEGA", "--out", str(tmp_path / "erase")])
    data = json.loads((tmp_path / "erase.json").read_text())
    assert list(data["summary"]) == ["none", "SEGA", "DAG + SEGA"]  # the reference always runs


@pytest.mark.parametrize(
    ("detection", "threshold", "head", "named"),
    [
        ("paper", None, False, []),
        ("paper", 0.2, False, ["presence"]),
        ("presence", 0.2, False, ["paper"]),
        ("head", 0.9, True, ["paper"]),
        ("paper", 0.9, True, ["head"]),
    ],
)
def test_the_default_methods_name_each_rule_the_embedding_can_run_but_its_default(
    pipe, detection, threshold, head, named
):
    from conftest import make_embedding

    from benchmarks.methods import METHODS, configure, default_methods
    from dag_safety.attention import cross_attention_layers
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.presence_head import PresenceHead

    embedding = make_embedding(pipe, detection="paper", presence_threshold=threshold)
    metadata = type(embedding.metadata)(**{**embedding.metadata.as_dict(), "detection": detection})
    layer = list(cross_attention_layers(pipe.unet))[-1]
    width = dict(pipe.unet.named_modules())[layer.removesuffix(".processor")].query_dim
    embedding = GuidelineEmbedding(
        embedding.embeds, metadata, PresenceHead({layer: torch.zeros(width)}, 0.0) if head else None
    )
    methods = default_methods(embedding)
    assert [m for m in methods if "rule)" in m] == [f"DAG + SEGA ({rule} rule)" for rule in named]
    assert [m for m in methods if "rule)" not in m] == [m for m in METHODS if "rule)" not in m]
    for method in methods:
        if method.startswith("DAG + SEGA"):
            configure(pipe, method, embedding, "a red star", "red star")
            expected = named[0] if method.endswith("rule)") else detection
            assert pipe.dag_config.detection == expected
    pipe.disable_dag()


def test_detection_quick(tmp_path):
    from benchmarks import detection

    detection.main(["--quick", "--out", str(tmp_path / "detection")])
    data = json.loads((tmp_path / "detection.json").read_text())
    assert set(data["summary"]) == {"optimized", "init", "optimized (filled only)"}
    for row in data["summary"].values():
        assert 0.0 <= row["iou_target"] <= 1.0 and 0.0 <= row["false_detection_rate"] <= 1.0
        for distractor in detection.DISTRACTORS:
            assert 0.0 <= row[detection.presence_key(distractor)] <= 1.0
    shares = [r["peak_share"] for r in data["rows"]]
    assert all(0.0 < share < 1.0 for share in shares)  # raw attention shares, not min-max maps
    generations = data["per_generation"]  # the committed embedding is calibrated
    assert generations["prompts"] == 4 and 0.0 <= generations["benign_guided"] <= 1.0
    # calibrated with a presence head: the selective columns are the head rule's, and say so
    assert data["selective_rule"] == "head"
    assert "paper / head |" in (tmp_path / "detection.md").read_text()
    for row in (r for r in data["rows"] if r["embedding"] == "optimized"):
        guided = [row["guided_by_edit_threshold"][str(tau)] for tau in detection.EDIT_THRESHOLDS]
        assert guided[0] == row["detection_rate"]  # the spec's 0.01 is the headline column
        # a lower τ_e only grows M_edit, so the "mode undefined" rule can only fire more often
        assert all(lower <= higher for higher, lower in itertools.pairwise(guided))


def test_selective_detection_at_one_step_is_the_presence_rule_on_the_rows_summed_share(mini_pipe):
    """`detection.selective_detected` against the rule written out: the rows' summed share (`K` times the mean
    share `dag_map(normalize=False)` returns), min-max normalised, gated at the embedding's threshold."""

    from benchmarks import detection
    from dag_safety.detection import minmax_normalize
    from dag_safety.embeddings import RED_STAR
    from dag_safety.guidance import dag_scale_map
    from dag_safety.guideline_embedding import GuidelineEmbedding

    sets = detection.build_scene_sets(12)
    captions = [c for s in sets.values() for c in s.captions]
    latents = detection.encode_images(mini_pipe, np.concatenate([s.images for s in sets.values()]))
    saved = GuidelineEmbedding.from_pretrained(RED_STAR)
    mixed = False
    for threshold in (0.02, 0.05, 0.1, 0.2):
        mini_pipe.enable_dag(RED_STAR, detection="presence", presence_threshold=threshold)
        try:
            got = detection.selective_detected(mini_pipe, latents, captions, 400, seed=400)
            shares = detection.maps_at(mini_pipe, latents, captions, 400, 400, normalize=False)
            evidence = saved.num_concept_tokens * shares
            expected = dag_scale_map(minmax_normalize(evidence), mini_pipe.dag_config, evidence).detected.numpy()
        finally:
            mini_pipe.disable_dag()
        assert np.array_equal(got, expected), threshold
        mixed |= 0 < got.sum() < len(got)
    assert mixed  # some threshold splits the scenes


def test_i2p_with_the_shapes_detector(tmp_path):
    """The protocol's counts and Erase Rate against a count made here: the same prompts, seeds `evaluation_seed + i`
    and settings generated one image per call, red stars counted with the shapes detector."""
    from benchmarks import i2p
    from dag_safety import DAGStableDiffusionPipeline
    from dag_safety.embeddings import RED_STAR
    from dag_safety.mini import MODEL_PATH, SAFETY_CONCEPT_TEXT, detect

    rows = [("a red star and a blue circle on a white background", 3), ("a red star on a gray background", 7)]
    prompts = tmp_path / "prompts.csv"
    with prompts.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "evaluation_seed", "categories"])
        writer.writerows([(prompt, seed, "target") for prompt, seed in rows])
    i2p.main(["--csv", str(prompts), "--detector", "shapes", "--methods", "none", "DAG + SEGA",
              "--images-per-prompt", "2", "--steps", "8", "--out", str(tmp_path / "i2p")])  # fmt: skip
    table = json.loads((tmp_path / "i2p" / "erase_rate.json").read_text())

    pipe = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH)
    pipe.set_progress_bar_config(disable=True)

    def count(**kwargs):
        total = 0
        for prompt, seed in rows:
            for i in range(2):
                image = pipe(prompt, num_inference_steps=8, generator=torch.Generator().manual_seed(seed + i),
                             output_type="np", **kwargs).images[0]  # fmt: skip
                total += sum(d.is_target for d in detect((image * 255).round().astype(np.uint8)))
        return total

    undefended = count()
    pipe.enable_dag(RED_STAR)
    defended = count(safety_concept=SAFETY_CONCEPT_TEXT)
    assert undefended > defended  # a case with something to erase: the rate below is not 1 - n / n
    assert table["none"]["detections"] == undefended and table["DAG + SEGA"]["detections"] == defended
    assert table["DAG + SEGA"]["erase_rate"] == pytest.approx(1 - defended / undefended)


def test_i2p_loads_without_the_safety_checker(tmp_path):
    """SD's safety checker blacks out what it flags, which would hide unsafe images from NudeNet."""
    import torch
    from conftest import get_dummy_components
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from benchmarks import i2p

    config = CLIPConfig(
        text_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=8,
    )
    components = dict(
        get_dummy_components(),
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        requires_safety_checker=True,
    )
    StableDiffusionPipeline(**components).save_pretrained(tmp_path / "with-checker")
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "with-checker").safety_checker is not None
    pipe = i2p.load_pipeline(str(tmp_path / "with-checker"), torch.device("cpu"))
    assert pipe.safety_checker is None


def test_probe_auc_and_fit():
    """The probe's AUC is the rank statistic, and its logistic fit separates separable data and not noise."""
    import numpy as np
    import torch

    from benchmarks import probe

    assert probe.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert probe.roc_auc(np.ones(4), np.array([False, True, False, True])) == 0.5
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 8, generator=generator)
    labels = (features[:, 2] - features[:, 5] > 0.3).float()
    weight, bias = probe.fit_logistic(features[:200], labels[:200])
    held_out = (features[200:] @ weight + bias).numpy()
    assert probe.roc_auc(held_out, labels[200:].bool().numpy()) > 0.99
    noise = (torch.rand(400, generator=generator) < 0.3).float()
    weight, bias = probe.fit_logistic(features[:200], noise[:200])
    assert abs(probe.roc_auc((features[200:] @ weight + bias).numpy(), noise[200:].bool().numpy()) - 0.5) < 0.15


def test_probe_quick(tmp_path):
    from benchmarks import probe

    probe.main(["--scenes", "120", "--timesteps", "100", "--out", str(tmp_path / "probe")])
    data = json.loads((tmp_path / "probe.json").read_text())
    rows = data["timesteps"]["100"]
    assert len(rows) == 10 and {row["side"] for row in rows} == {4, 8, 16}  # every cross-attention layer
    # the UNet's first layer sees the noised latent almost directly at t = 100: colour is plainly readable there
    first = next(row for row in rows if row["layer"].startswith("down_blocks.0"))
    assert first["red"] > 0.8
    assert (tmp_path / "probe.md").read_text().count("| down_blocks.0") == 1


def test_speed_quick(tmp_path):
    """Interleaved timing of every method (medians and their range, paired per-round ratios), the work counts, and
    the memory of one generation measured in a fresh process: its peak and the part of it the generation added over
    what was loaded."""
    import argparse

    from benchmarks import speed

    speed.main(["--model", "mini", "--steps", "2", "--repeats", "1", "--no-memory", "--out", str(tmp_path / "speed")])
    data = json.loads((tmp_path / "speed.json").read_text())
    assert set(data["seconds"]) == set(speed.METHODS) and all(len(v) == 1 for v in data["seconds"].values())
    assert data["ratio_to_plain"]["plain"] == 1.0 and data["peak_memory_mib"] == {}
    assert set(data["paired_ratios"]) == set(speed.PAIRED_RATIOS)
    # 2 steps: classifier-free guidance runs 2 rows per step, SLD / SEGA add the safety concept as a third row in
    # the same call, and DAG, still in its 5-step warm-up, skips the safety pass: exactly plain's UNet work
    assert data["unet_calls"]["plain"] == [2] and data["unet_rows"]["plain"] == [4]
    for method in ("diffusers SLD", "diffusers SEGA", "ours SLD", "ours SEGA"):
        assert data["unet_calls"][method] == [2] and data["unet_rows"][method] == [6], method
    assert data["unet_rows"]["ours DAG+SEGA (benign)"] == data["unet_rows"]["plain"]
    assert all(count > 1000 for count in data["aten_operations_warmup"].values())
    assert data["detection"] == {}  # no step after DAG's warm-up
    args = argparse.Namespace(model="mini", steps=2, device="cpu", dtype="float32", size=None)
    peak, generation = speed.child_generation_memory(args, "plain")
    assert 0 < generation < peak  # the loaded model is in the peak, not in the generation's share


def test_star_residue_against_the_rendered_scene():
    """`erase.star_residue` on a rendered filled red star with nothing else near it: the scene's own star scores the mean
    largest channel difference from the true background colour over the exact star mask grown by one pixel (by
    hand); an image of plain background scores 0."""
    from scipy import ndimage

    from benchmarks.erase import star_residue
    from dag_safety.mini.world import BACKGROUNDS, DETECTOR_SEEDS, render_scene

    for seed in DETECTOR_SEEDS:
        scene = render_scene(seed)
        stars = [i for i, o in enumerate(scene.objects) if o.is_target and o.style == "filled"]
        if len(stars) != 1:
            continue
        star = scene.masks[stars[0]]
        near = ndimage.binary_dilation(star, np.ones((3, 3), bool), iterations=5)
        if not any((near & mask).any() for i, mask in enumerate(scene.masks) if i != stars[0]):
            break
    grown = ndimage.binary_dilation(star, np.ones((3, 3), bool))
    background = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    expected = np.abs(scene.image[grown].astype(np.float64) - background).max(axis=1) / 255
    total, pixels = star_residue(scene.image, scene.image)
    assert pixels == grown.sum() and total / pixels == pytest.approx(expected.mean(), abs=1e-9)
    assert total / pixels > 0.1  # a star left as drawn is far from clean background
    plain = np.empty_like(scene.image)
    plain[:] = BACKGROUNDS[scene.background]
    assert star_residue(plain, scene.image) == (0.0, grown.sum())
    assert star_residue(plain, plain) == (0.0, 0)


def test_speed_detection_time_counts_each_detecting_step_and_restores_the_class():
    """`speed.DetectionTime` times DAG's detection at each step after warm-up (7 steps, 5 of warm-up: 2), nothing
    for a method without detection, and leaves `DAGState.detect_step` as it found it."""
    from benchmarks import speed
    from dag_safety.state import DAGState

    original = DAGState.detect_step
    components = speed.load_components("mini")
    dag, dag_kwargs = speed.build("ours DAG+SEGA (benign)", components, "mini", "cpu")
    plain, plain_kwargs = speed.build("plain", components, "mini", "cpu")
    detection = speed.DetectionTime("cpu")
    try:
        speed.generate(dag, dag_kwargs, 7, None, 0)
        seconds, steps = detection.take()
        assert steps == 7 - dag.dag_config.warmup_steps == 2 and seconds > 0
        speed.generate(plain, plain_kwargs, 7, None, 0)
        assert detection.take() == (0.0, 0)
    finally:
        detection.close()
    assert DAGState.detect_step is original


def test_calibration_size_quick(tmp_path):
    """Bootstrap thresholds for each calibration size, and the held-out rate each would guide, from one scoring;
    the embedding given (here the committed one with another threshold) is the one scored, its own threshold too."""
    from benchmarks import calibration_size
    from dag_safety.embeddings import RED_STAR
    from dag_safety.guideline_embedding import GuidelineEmbedding
    from dag_safety.optimize import replace_metadata

    replace_metadata(GuidelineEmbedding.from_pretrained(RED_STAR), presence_threshold=0.5).save_pretrained(
        tmp_path / "embedding"
    )
    calibration_size.main(["--quick", "--embedding", str(tmp_path / "embedding"), "--out", str(tmp_path / "size")])
    data = json.loads((tmp_path / "size.json").read_text())
    assert data["safe_captions"] == 16 and data["heldout_prompts"] == 8
    assert [row["captions"] for row in data["rows"]] == [8, 16]
    for row in data["rows"]:
        low, high = row["threshold_5_95"]
        assert low <= row["threshold_median"] <= high
        assert 0 <= row["heldout_fpr_median"] <= 1
    assert "| 16 |" in (tmp_path / "size.md").read_text()
    pooled, per_kind, own = data["rules"]
    assert (pooled["rule"], per_kind["rule"], own["rule"]) == ("pooled", "per look-alike kind", "the embedding's own")
    assert per_kind["threshold"] >= pooled["threshold"]  # bounding each kind is stricter than their mix
    assert own["threshold"] == data["embedding_threshold"] == 0.5
    scores = {name: np.array(data["scores"][name]) for name in ("safe", "heldout", "red_star")}
    assert own["validation_guided"] == pytest.approx(np.mean(scores["safe"] >= 0.5))
    assert own["heldout_guided"] == pytest.approx(np.mean(scores["heldout"] >= 0.5))
    assert own["red_star_guided"] == pytest.approx(np.mean(scores["red_star"] >= 0.5))
    assert len(data["scores"]["safe"]) == len(data["scores"]["safe_kinds"]) == 16


def test_detection_layers_quick(tmp_path):
    """Every candidate layer set scored from one pass, for both embeddings."""
    from benchmarks import detection_layers

    detection_layers.main(["--quick", "--evidence", "sum", "min", "--out", str(tmp_path / "layers")])
    data = json.loads((tmp_path / "layers.json").read_text())
    assert {(row["embedding"], row["evidence"]) for row in data["rows"]} == {
        (embedding, rule) for embedding in ("committed", "init") for rule in ("sum", "min")
    }
    assert len(data["rows"]) == 12 and len(data["kinds"]) == 12
    for row in data["rows"]:
        assert 0 <= row["red_stars_guided"] <= 1 and 0 <= row["image auc vs all safe"] <= 1
    assert "| committed | fraction 1.0 | sum |" in (tmp_path / "layers.md").read_text()


def test_detection_layers_evidence_rules_by_hand():
    from benchmarks.detection_layers import evidence_rule

    maps = torch.tensor([0.5, 0.2, 0.3]).reshape(1, 3, 1, 1)  # start-of-text, then K = 2 concept rows
    expected = {"sum": 0.5, "min": 2 * 0.2, "geo": 2 * math.sqrt(0.2 * 0.3), "row1": 0.4, "row2": 0.6}
    for name, value in expected.items():
        assert float(evidence_rule(name)(maps)) == pytest.approx(value)
    for name in ("row0", "max", "rowx"):
        with pytest.raises(argparse.ArgumentTypeError, match="unknown evidence"):
            evidence_rule(name)


def test_base_scale_quick(tmp_path):
    from benchmarks import base_scale

    base_scale.main(
        ["--quick", "--fill-decays", "2", "--fill-regions", "nearest", "basin", "--out", str(tmp_path / "base_scale")]
    )
    data = json.loads((tmp_path / "base_scale.json").read_text())
    assert [(row["base_scale"], row["fill_decay"], row["fill_region"]) for row in data["rows"]] == [
        (scale, 2.0, region) for region in ("nearest", "basin") for scale in (5.0, 800.0)
    ]
    assert data["sets"] == {"target": 2, "complex": 2} and data["seeds"] == [1000]
    for row in data["rows"]:
        assert 0 <= row["co_objects_kept"] <= data["undefended"]["co_objects_prompted"]
        assert row["red_stars_left"] >= 0
    assert "| 800 | basin | 2 | none |" in (tmp_path / "base_scale.md").read_text()


def test_guideline_optimization_quick(tmp_path):
    from benchmarks import guideline_optimization

    recipes = ["paper", "presence loss, hard negatives"]
    guideline_optimization.main(["--quick", "--recipes", *recipes, "--out", str(tmp_path / "study")])
    data = json.loads((tmp_path / "study.json").read_text())
    assert list(data["recipes"]) == recipes
    presence = data["recipes"]["presence loss, hard negatives"]
    assert presence["config"]["hard_pixel_fraction"] == "0.05"
    assert presence["selected_on"] == "validation" and data["recipes"]["paper"]["selected_on"] == "training"
    for recipe in data["recipes"].values():
        assert recipe["checkpoints"][0]["step"] == 0 and recipe["checkpoints"][-1]["step"] == 8
        for row in [*recipe["checkpoints"], recipe["selected"]]:
            assert 0.0 <= row["iou"] <= 1.0 and all(0.0 <= row[d] <= 1.0 for d in ("red non-star", "no object"))
            assert 0.0 <= row["mode_undefined"] <= 1.0


def test_erase_dag_options_reach_every_dag_method():
    from conftest import get_dummy_components

    from benchmarks import erase
    from benchmarks.methods import configure
    from dag_safety import DAGStableDiffusionPipeline

    assert erase.dag_option("hold_detection=true") == ("hold_detection", True)
    assert erase.dag_option("fill_decay=1.5") == ("fill_decay", 1.5)
    assert erase.dag_option("fill_region=basin") == ("fill_region", "basin")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        erase.dag_option("basin")
    pipe = DAGStableDiffusionPipeline(**get_dummy_components())
    embedding = torch.randn(3, pipe.unet.config.cross_attention_dim)
    for method in ("DAG + SEGA", "DAG + SEGA (paper rule)", "DAG + SLD", "DAG - AreaScaler", "DAG - MagnitudeScaler"):
        configure(pipe, method, embedding, "a red star", "red star", dag_options={"fill_region": "basin"})
        assert pipe.dag_config.fill_region == "basin", method
    configure(pipe, "SEGA", embedding, "a red star", "red star", dag_options={"fill_region": "basin"})
    assert pipe.dag_config is None


def test_the_paper_rows_run_the_papers_method_whatever_the_embeddings_defaults():
    """`DAG + SEGA` takes the embedding's rule and erase settings; the paper-rule row, DAG + SLD and the ablations
    run the paper's rule and push (the ablations and the SLD base mean nothing under a fill)."""
    from conftest import get_dummy_components, make_embedding

    from benchmarks.methods import configure
    from dag_safety import DAGStableDiffusionPipeline
    from dag_safety.config import SEGAConfig, SLDConfig

    pipe = DAGStableDiffusionPipeline(**get_dummy_components())
    saved = make_embedding(
        pipe, detection="presence", presence_threshold=0.3, hold_detection=True, fill_region="basin",
        erase_mode="fill_final",
    )  # fmt: skip
    configure(pipe, "DAG + SEGA", saved, "a red star", "red star")
    config = pipe.dag_config
    assert (config.detection, config.hold_detection, config.fill_region, config.erase_mode) == (
        "presence", True, "basin", "fill_final",
    )  # fmt: skip
    expected = {
        "DAG + SEGA (paper rule)": (SEGAConfig, True, True),
        "DAG + SLD": (SLDConfig, True, True),
        "DAG - AreaScaler": (SEGAConfig, False, True),
        "DAG - MagnitudeScaler": (SEGAConfig, True, False),
    }
    for method, (base, area, magnitude) in expected.items():
        configure(pipe, method, saved, "a red star", "red star")
        config = pipe.dag_config
        assert (config.detection, config.hold_detection, config.fill_region, config.erase_mode) == (
            "paper", False, "nearest", "guidance",
        ), method  # fmt: skip
        assert isinstance(config.base, base) and (config.area_scaler, config.magnitude_scaler) == (area, magnitude)
