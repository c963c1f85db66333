"""The presence head (`detection="head"`): its read-out, storage, rule and fit against independent oracles."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import make_embedding
from dag_reference import components_of
from diffusers import StableDiffusionPipeline

from dag_safety.attention import CapturedQuery
from dag_safety.config import HEAD_POOLINGS
from dag_safety.guideline_embedding import GuidelineEmbedding
from dag_safety.presence_head import PresenceHead, component_features, fit_logistic

PROMPT = "a red star and a blue circle"


def head_for(pipe, bias: float, seed: int = 0, scale: float = 1.0) -> PresenceHead:
    """A random head on every cross-attention layer of the tiny UNet's last up block."""
    from dag_safety.attention import cross_attention_layers

    generator = torch.Generator().manual_seed(seed)
    modules = dict(pipe.unet.named_modules())
    names = [name for name in cross_attention_layers(pipe.unet) if name.startswith("up_blocks.1")]
    weights = {
        name: scale * torch.randn(modules[name.removesuffix(".processor")].query_dim, generator=generator)
        for name in names
    }
    return PresenceHead(weights, bias)


def mlp_head_for(pipe, bias: float, units: int = 8, seed: int = 0) -> PresenceHead:
    """A random head with a hidden layer on the same layers as [`head_for`]."""
    linear = head_for(pipe, bias, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    weights = {
        name: 0.5 * torch.randn(units, weight.shape[0], generator=generator) for name, weight in linear.weights.items()
    }
    return PresenceHead(
        weights, bias, torch.randn(units, generator=generator), 2 * torch.randn(units, generator=generator)
    )


def mlp_by_hand(head: PresenceHead, feature: np.ndarray) -> float:
    """The head's logit for one mean feature `(ΣC,)`, by loops (GELU through `math.erf`)."""
    columns = np.concatenate([head.weights[name].numpy() for name in head.layers], axis=-1)
    if head.output is None:
        return float(sum(columns[c] * feature[c] for c in range(len(feature))) + head.bias)
    total = head.bias
    for unit in range(len(head.output)):
        pre = sum(columns[unit, c] * feature[c] for c in range(len(feature))) + float(head.hidden_bias[unit])
        total += float(head.output[unit]) * 0.5 * pre * (1 + math.erf(pre / math.sqrt(2)))
    return float(total)


def with_head(embedding: GuidelineEmbedding, head: PresenceHead | None) -> GuidelineEmbedding:
    return GuidelineEmbedding(embedding.embeds, embedding.metadata, head)


@pytest.mark.parametrize("units", [0, 4])
def test_features_are_the_layers_inputs_at_the_latent_size_and_components_are_scored_by_hand(units):
    """Features: each pixel's inputs of a full-size layer, then a half-size layer's, constant where its input is
    (bilinear upsampling keeps constants); logits of mean features against loops, linear and with hidden units."""
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(2, 36, 5, generator=generator)
    half = torch.randn(2, 1, 3, generator=generator).expand(2, 9, 3)
    shape = (lambda c: (units, c)) if units else (lambda c: (c,))
    weights = {"a": torch.randn(*shape(5), generator=generator), "b": torch.randn(*shape(3), generator=generator)}
    extra = {} if not units else {"hidden_bias": torch.randn(units), "output": torch.randn(units)}
    head = PresenceHead(weights, -0.7, **extra)
    queries = {"a": CapturedQuery(full, None), "b": CapturedQuery(half, (3, 3))}
    features = head.features(queries, (6, 6))
    assert features.shape == (2, 36, 8)
    for image in range(2):
        for pixel in range(36):
            np.testing.assert_allclose(features[image, pixel, :5].numpy(), full[image, pixel].numpy(), atol=1e-6)
            np.testing.assert_allclose(features[image, pixel, 5:].numpy(), half[image, 0].numpy(), atol=1e-6)
    means = torch.randn(4, 8, generator=generator)
    got = head.component_logits(means)
    for row in range(4):
        assert got[row].item() == pytest.approx(mlp_by_hand(head, means[row].numpy()), abs=1e-4)


def pooled_by_hand(features: np.ndarray, widths: list[int], pooling: tuple[str, ...]) -> np.ndarray:
    """A component's pooled feature from its pixels' features `(n, ΣC)`: per layer, each statistic in turn."""
    stats = {"mean": lambda x: x.mean(axis=0), "max": lambda x: x.max(axis=0), "std": lambda x: x.std(axis=0)}
    bounds = np.cumsum([0, *widths])
    return np.concatenate(
        [stats[name](features[:, bounds[i] : bounds[i + 1]]) for i in range(len(widths)) for name in pooling]
    )


@pytest.mark.parametrize("pooling", [("mean",), ("std", "mean", "max"), HEAD_POOLINGS])
def test_component_features_pool_each_layer_by_each_statistic_in_order(pooling):
    """Three components (one of a single pixel, whose std is 0) of random two-layer features, against numpy."""
    generator = torch.Generator().manual_seed(0)
    features = 3 + 5 * torch.randn(16, 7, generator=generator, dtype=torch.float64).float()
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0, :3], labels[2:, 1:3], labels[3, 3] = 1, 2, 3
    got = component_features(features, labels, 3, pooling, (4, 3))
    assert got.shape == (3, 7 * len(pooling))
    for component in range(1, 4):
        pixels = features.numpy()[labels.reshape(-1) == component]
        want = pooled_by_hand(pixels, [4, 3], pooling)
        np.testing.assert_allclose(got[component - 1].numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_pooling_head_scores_the_pooled_feature_and_checks_its_widths():
    """A head pooling by two statistics reads `2·C_l` weights a layer: its widths are the layers' own, a UNet of
    another width is refused, and bad poolings are refused by name."""
    generator = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(3, 10, generator=generator), "b": torch.randn(3, 6, generator=generator)}
    head = PresenceHead(weights, 0.3, torch.randn(3), torch.randn(3), pooling=("max", "mean"))
    assert head.widths == (5, 3)
    head.check_layers({"a": 5, "b": 3})
    with pytest.raises(ValueError, match="reads 5 input channels of 'a'"):
        head.check_layers({"a": 10, "b": 3})
    pooled = torch.randn(2, 16, generator=generator)
    for row in range(2):
        want = mlp_by_hand(head, pooled[row].numpy())
        assert head.component_logits(pooled)[row].item() == pytest.approx(want, abs=1e-4)
    for pooling, message in [(("mean", "mean"), "distinct"), (("median",), "distinct"), ((), "distinct")]:
        with pytest.raises(ValueError, match=message):
            PresenceHead({"a": torch.ones(2)}, 0.0, pooling=pooling)
    with pytest.raises(ValueError, match="3 poolings"):
        PresenceHead({"a": torch.ones(4)}, 0.0, pooling=HEAD_POOLINGS)


def test_logistic_fit_recovers_the_direction_that_separates_two_gaussians():
    """Two classes `N(±μ, I)` (unbalanced 1:9): the Bayes-optimal boundary is orthogonal to `μ`."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.tensor([2.0, -1.0, 0.0, 0.5])
    positives = torch.randn(100, 4, generator=generator) + direction
    negatives = torch.randn(900, 4, generator=generator) - direction
    weight, _ = fit_logistic(torch.cat([positives, negatives]), torch.cat([torch.ones(100), torch.zeros(900)]))
    assert torch.nn.functional.cosine_similarity(weight, direction, dim=0) > 0.97


def test_a_head_is_saved_in_the_embeddings_file_and_loads_back(pipe, tmp_path):
    head = head_for(pipe, 0.25)
    embedding = with_head(make_embedding(pipe), head)
    embedding.save_pretrained(tmp_path / "emb")
    loaded = GuidelineEmbedding.from_pretrained(tmp_path / "emb")
    assert loaded.head.layers == head.layers and loaded.head.bias == 0.25
    for name in head.layers:
        assert torch.equal(loaded.head.weights[name], head.weights[name])
    assert GuidelineEmbedding.from_pretrained(_saved(pipe, tmp_path / "plain", None)).head is None
    mlp = mlp_head_for(pipe, -0.5)
    loaded = GuidelineEmbedding.from_pretrained(_saved(pipe, tmp_path / "mlp", mlp)).head
    assert torch.equal(loaded.output, mlp.output) and torch.equal(loaded.hidden_bias, mlp.hidden_bias)
    assert all(torch.equal(loaded.weights[name], mlp.weights[name]) for name in mlp.layers)
    pooled = PresenceHead({name: weight.repeat(1, 3) for name, weight in mlp.weights.items()}, -0.5,
                          mlp.hidden_bias, mlp.output, pooling=("std", "max", "mean"))  # fmt: skip
    loaded = GuidelineEmbedding.from_pretrained(_saved(pipe, tmp_path / "pooled", pooled)).head
    assert loaded.pooling == ("std", "max", "mean") and loaded.widths == mlp.widths


def test_a_head_saved_without_its_pooling_reads_the_mean(pipe, tmp_path):
    """Files written before heads could pool by more hold no `presence_head.pooling`: their heads pool by the mean."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _saved(pipe, tmp_path / "emb", head_for(pipe, 0.25)) / "guideline_embeds.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    assert tensors.pop("presence_head.pooling").tolist() == [0]
    save_file(tensors, str(path), metadata=header)
    assert GuidelineEmbedding.from_pretrained(path.parent).head.pooling == ("mean",)


def _saved(pipe, path, head):
    with_head(make_embedding(pipe), head).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"presence_head.up_blocks.1.x": torch.ones(3)}, "incomplete"),
        ({"presence_head.bias": torch.ones(1)}, "incomplete"),
        (
            {
                "presence_head.x": torch.ones(2),
                "presence_head.bias": torch.ones(1),
                "presence_head.pooling": torch.tensor([3]),
            },
            "indices into",
        ),
        (
            {
                "presence_head.x": torch.ones(2),
                "presence_head.bias": torch.ones(1),
                "presence_head.pooling": torch.ones(1),
            },
            "indices into",
        ),
        ({"presence_head.x": torch.tensor([1.0, float("nan")]), "presence_head.bias": torch.ones(1)}, "finite"),
        ({"presence_head.x": torch.ones(2), "presence_head.bias": torch.ones(2)}, "incomplete"),
        (
            {
                "presence_head.x": torch.ones(4, 2),
                "presence_head.bias": torch.ones(1),
                "presence_head.hidden_bias": torch.ones(4),
            },
            "both its bias and its output",
        ),
        (
            {
                "presence_head.x": torch.ones(3, 2),
                "presence_head.bias": torch.ones(1),
                "presence_head.hidden_bias": torch.ones(4),
                "presence_head.output": torch.ones(4),
            },
            "finite",
        ),
    ],
)
def test_a_damaged_head_is_refused_naming_the_file(pipe, tmp_path, entries, message):
    from safetensors.torch import load_file, save_file

    path = _saved(pipe, tmp_path / "emb", None) / "guideline_embeds.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    save_file({**load_file(str(path)), **entries}, str(path), metadata=header)
    with pytest.raises(ValueError, match=message) as error:
        GuidelineEmbedding.from_pretrained(path.parent)
    assert str(path) in str(error.value)


def test_head_rule_refuses_embeddings_without_a_fitting_head_and_leaves_the_pipeline_as_before(pipe):
    embedding = make_embedding(pipe)
    pipe.enable_dag(embedding)
    before = pipe.dag_config
    with pytest.raises(ValueError, match="--presence-head"):
        pipe.enable_dag(embedding, detection="head", presence_threshold=0.5)
    with pytest.raises(ValueError, match="bare tensor"):
        pipe.enable_dag(embedding.embeds, detection="head", presence_threshold=0.5)
    wrong_layer = PresenceHead({"up_blocks.9.attentions.0.transformer_blocks.0.attn2.processor": torch.ones(4)}, 0.0)
    with pytest.raises(ValueError, match="does not have"):
        pipe.enable_dag(with_head(embedding, wrong_layer), detection="head", presence_threshold=0.5)
    head = head_for(pipe, 0.0)
    name = head.layers[0]
    wrong_width = PresenceHead({name: torch.ones(head.weights[name].shape[0] + 1)}, 0.0)
    with pytest.raises(ValueError, match="input width"):
        pipe.enable_dag(with_head(embedding, wrong_width), detection="head", presence_threshold=0.5)
    calibrated = GuidelineEmbedding(
        embedding.embeds,
        type(embedding.metadata)(**{**embedding.metadata.as_dict(), "detection": "head", "presence_threshold": 0.9}),
        head,
    )
    with pytest.raises(ValueError, match="calibrated for its presence head"):
        pipe.enable_dag(calibrated, detection="presence")
    assert pipe.dag_config is before
    pipe.enable_dag(calibrated, detection="presence", presence_threshold=0.2)  # a threshold of its own is fine
    assert pipe.dag_config.presence_threshold == 0.2
    pipe.enable_dag(calibrated)
    assert pipe.dag_config.detection == "head" and pipe.dag_config.presence_threshold == 0.9
    pipe.disable_dag()


def generate(pipe, **options):
    return pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np", **options)


def test_a_head_that_finds_nothing_leaves_the_image_bit_identical_to_the_plain_pipeline(pipe, components):
    plain = StableDiffusionPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    expected = generate(plain).images
    embedding = with_head(make_embedding(pipe), head_for(pipe, -60.0))
    pipe.enable_dag(embedding, detection="head", presence_threshold=0.5, warmup_steps=1, max_edit_area=1.0)
    out = generate(pipe)
    pipe.disable_dag()
    assert out.unsafe_detected == [False] and out.presence_scores[0] < 1e-20
    np.testing.assert_array_equal(out.images, expected)


def test_a_head_that_finds_everything_guides_as_the_presence_rule_with_every_component_kept(pipe):
    """The same `Â` and components; every component passes both gates, so the steps are the same."""
    embedding = make_embedding(pipe)
    options = {"warmup_steps": 1, "max_edit_area": 1.0}  # never "mode undefined": the tiny model guides
    pipe.enable_dag(with_head(embedding, head_for(pipe, 60.0)), detection="head", presence_threshold=0.5, **options)
    head = generate(pipe)
    pipe.enable_dag(embedding, detection="presence", presence_threshold=float(np.nextafter(0.0, 1.0)), **options)
    presence = generate(pipe)
    pipe.disable_dag()
    assert head.unsafe_detected == [True] and head.presence_scores == [1.0]
    np.testing.assert_array_equal(head.images, presence.images)


@pytest.mark.parametrize(
    ("hidden", "hold", "confirm_steps"),
    [(False, False, 1), (True, False, 1), (True, True, 1), (True, False, 2), (True, True, 2)],
)
def test_each_step_guides_exactly_the_components_whose_smoothed_mean_feature_passes(pipe, hidden, hold, confirm_steps):
    """`DAGState.detect_step` on random captured inputs, three steps, against an oracle: the rows' evidence
    (`state.shares`) and the head's features (the captured inputs, concatenated by hand) smoothed by hand, `Â`
    min-max normalised, 8-connected components by flood fill, and a component guided iff the head's probability on
    its mean smoothed feature (by loops) reaches `τ` or, with `hold_detection`, it overlaps a pixel of a component
    guided at an earlier step, and, with `confirm_steps`, its image has had a component reach `τ` at that many
    steps, this one included (counted by hand).

    A first run collects the oracle's probabilities; the second puts `τ` between the middle two, so that both
    outcomes are exercised whatever the machine's rounding does to a random head."""
    head = mlp_head_for(pipe, 0.3, seed=1) if hidden else head_for(pipe, 0.3, seed=1, scale=0.6)
    probabilities = sorted(_check_detect_steps(pipe, head, threshold=0.5, hold=False)[0])
    middle = len(probabilities) // 2
    threshold = (probabilities[middle - 1] + probabilities[middle]) / 2
    assert probabilities[middle] - probabilities[middle - 1] > 2e-4, "the random head scores two components alike"
    probabilities, held_only, unconfirmed = _check_detect_steps(pipe, head, threshold, hold, confirm_steps)
    assert any(p >= threshold for p in probabilities) and any(p < threshold for p in probabilities)
    # the hold was exercised, and only when asked for; after a confirmation two steps in, the third step may hold
    # nothing, depending on the machine's rounding, and the oracle checks whatever it holds
    assert held_only == 0 if not hold else (held_only > 0 or confirm_steps > 1)
    assert (unconfirmed > 0) == (confirm_steps > 1)  # so was the confirmation


def _check_detect_steps(
    pipe, head: PresenceHead, threshold: float, hold: bool, confirm_steps: int = 1
) -> tuple[list[float], int, int]:
    """Run three detection steps under `threshold`, check them against the oracle and return every component's
    probability, the number of components guided only because they were held, and the number left unguided only
    because their image was not yet confirmed."""
    from dag_safety.state import prepare_dag

    embedding = with_head(make_embedding(pipe, unsafe_threshold=0.5), head)
    state = prepare_dag(
        pipe.unet,
        embedding,
        detection="head",
        presence_threshold=threshold,
        max_edit_area=1.0,
        hold_detection=hold,
        confirm_steps=confirm_steps,
    )
    modules = state.capture.attention_modules()
    latent = (8, 8)
    generator = torch.Generator().manual_seed(3)
    evidence, smoothed_shares, smoothed_features = None, None, None
    held = np.zeros((3, *latent), dtype=bool)
    passes = np.zeros(3, dtype=int)
    probabilities, held_only, unconfirmed = [], 0, 0
    for _ in range(3):
        queries = {}
        for name, attn in modules.items():
            queries[name] = CapturedQuery(torch.randn(3, 64, attn.query_dim, generator=generator), None)
        state.capture.store.queries = queries
        dag_map, scale_map, evidence = state.detect_step(latent, evidence)
        shares = state.shares(latent, _presence)[0].numpy()
        features = np.concatenate([queries[name].hidden_states.numpy() for name in sorted(head.weights)], axis=2)
        beta = state.config.presence_smoothing
        smoothed_shares = shares if smoothed_shares is None else beta * smoothed_shares + (1 - beta) * shares
        smoothed_features = features if smoothed_features is None else beta * smoothed_features + (1 - beta) * features
        guided_now = np.zeros_like(held)
        for image in range(3):
            share = smoothed_shares[image]
            normalised = (share - share.min()) / (share.max() - share.min())
            np.testing.assert_allclose(dag_map[image].numpy(), normalised, atol=1e-5)
            labels = components_of(normalised >= 0.5)
            scale = scale_map.scale[image].numpy()
            found = []
            for component in range(1, labels.max() + 1):
                pixels = labels == component
                mean = smoothed_features[image][pixels.reshape(-1)].mean(axis=0)
                probability = 1 / (1 + math.exp(-mlp_by_hand(head, mean)))
                probabilities.append(probability)
                found.append((pixels, probability, hold and bool(held[image][pixels].any())))
            # the image passes when any component would be guided; held pixels exist only once it is confirmed
            passes[image] += any(p >= threshold or kept for _, p, kept in found)
            confirmed = passes[image] >= confirm_steps
            for pixels, probability, kept in found:
                if abs(probability - threshold) < 1e-4 and not kept:
                    guided_now[image] |= pixels & (scale > 0)  # either way; what DAG did is what it holds
                    continue
                present = probability >= threshold or kept
                held_only += present and probability < threshold
                unconfirmed += present and not confirmed
                present = present and confirmed
                assert (scale[pixels] > 0).all() == present
                assert (scale[pixels] == 0).all() == (not present)
                if present:
                    guided_now[image] |= pixels
            peak = max((p for _, p, _ in found), default=0.0)
            assert scale_map.presence[image].item() == pytest.approx(peak, abs=1e-4)
            assert bool(scale_map.detected[image]) == bool(guided_now[image].any())
        held |= guided_now
    return probabilities, held_only, unconfirmed


def _presence(layer_averaged):
    from dag_safety.detection import concept_presence

    return concept_presence(layer_averaged)


def test_calibrate_fits_a_head_and_bounds_each_group_at_its_threshold(mini_pipe, tmp_path, capsys):
    """`dag-safety calibrate --presence-head`: the head reads the named block's layers, is fitted on `--head-data`
    only, becomes the default rule, and its threshold is the lowest that bounds each group of safe validation
    images; the oracle rescored the validation images under the saved embedding."""
    from test_presence import assert_lowest_within

    from dag_safety.calibration import presence_scores
    from dag_safety.cli import main
    from dag_safety.embeddings import RED_STAR
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder

    head_data = write_folder(tmp_path / "train", n_unsafe=6, n_safe=10)
    validation = write_folder(tmp_path / "validation", n_unsafe=4, n_safe=10, validation=True)
    out = tmp_path / "head"
    assert main(["calibrate", str(RED_STAR), "--validation-data", str(validation), "--presence-head", "up_blocks.2",
                 "--head-data", str(head_data), "--target-fpr", "0.2", "--calibrate-on", "images",
                 "--calibration-steps", "8", "--default-hold-detection", "--default-erase-mode", "fill_final",
                 "--default-components", "basin", "--default-confirm-steps", "1", "--presence-head-pooling", "max", "mean",
                 "--presence-head-swapped-captions", "unsafe", "--out", str(out)]) == 0  # fmt: skip
    assert "training AUC" in capsys.readouterr().out
    saved = GuidelineEmbedding.from_pretrained(out)
    assert saved.metadata.detection == "head"
    # the erase settings given are saved, the one not given is the input's (the committed embedding's)
    committed = GuidelineEmbedding.from_pretrained(RED_STAR).metadata
    assert (saved.metadata.hold_detection, saved.metadata.erase_mode) == (True, "fill_final")
    assert saved.metadata.fill_region == committed.fill_region
    # the head is fitted and its threshold calibrated on the candidates the saved rule forms (rescored below)
    assert saved.metadata.components == "basin"
    assert saved.metadata.confirm_steps == 1  # images score steps one by one: the input's two steps are refused
    assert all(name.startswith("up_blocks.2.") for name in saved.head.layers) and len(saved.head.layers) == 2
    assert saved.metadata.calibration["presence_head"]["training_images"] == 16
    assert saved.metadata.calibration["presence_head"]["swapped_captions"] == "unsafe"
    assert saved.head.pooling == ("max", "mean")
    assert saved.metadata.calibration["presence_head"]["pooling"] == ["max", "mean"]
    items = load_annotated_folder(validation)
    mini_pipe.enable_dag(out)
    try:
        assert mini_pipe.dag_config.detection == "head"
        assert mini_pipe.dag_config.hold_detection and mini_pipe.dag_config.erase_mode == "fill_final"
        assert mini_pipe.dag_config.components == "basin"
        scores = presence_scores(mini_pipe, items, num_inference_steps=8, progress=False)
    finally:
        mini_pipe.disable_dag()
    safe = np.array([not item.unsafe for item in items])
    groups = np.array([item.group for item in items])[safe]
    # a rescored image's score differs from calibration's in the last bits (measured up to 2e-9 between processes)
    scores = np.nan_to_num(scores.any[safe], neginf=0.0)
    assert_lowest_within(scores, groups, saved.metadata.presence_threshold, 0.2, tolerance=1e-6)


def test_recalibrating_a_head_to_confirm_over_steps_keeps_the_head(mini_pipe, tmp_path):
    """`dag-safety calibrate <embedding with a head> --default-confirm-steps 2`, no `--presence-head`: the head and
    what it was fitted on stay, the setting is saved, and the threshold is the lowest that bounds each group of the
    validation generations' scores, read by the oracle under the saved setting: each caption generated on its own
    with the seed the calibration gave it, its score the second highest of the steps' peaks (recorded where DAG
    computes them)."""
    from test_presence import assert_lowest_within

    from dag_safety.cli import main
    from dag_safety.embeddings import RED_STAR
    from dag_safety.mini.guideline_data import write_folder
    from dag_safety.optimize import load_annotated_folder
    from dag_safety.state import DAGState

    validation = write_folder(tmp_path / "validation", n_unsafe=2, n_safe=6, validation=True)
    out = tmp_path / "confirmed"
    assert main(["calibrate", str(RED_STAR), "--validation-data", str(validation), "--target-fpr", "0.2",
                 "--calibration-steps", "8", "--default-confirm-steps", "2", "--out", str(out)]) == 0  # fmt: skip
    committed, saved = GuidelineEmbedding.from_pretrained(RED_STAR), GuidelineEmbedding.from_pretrained(out)
    assert saved.metadata.confirm_steps == 2 and saved.metadata.detection == "head"
    assert saved.metadata.calibration["presence_head"] == committed.metadata.calibration["presence_head"]
    assert saved.head.layers == committed.head.layers
    for name in committed.head.layers:
        assert torch.equal(saved.head.weights[name], committed.head.weights[name])
    items = load_annotated_folder(validation)
    peaks, scores = [], []
    detect_step = DAGState.detect_step

    def recording(self, latent_size, evidence):
        result = detect_step(self, latent_size, evidence)
        peaks.append(result[1].presence[0].item())
        return result

    mini_pipe.enable_dag(RED_STAR, presence_threshold=float(np.nextafter(1.0, 0)))  # the committed head, never guiding
    try:
        DAGState.detect_step = recording
        for index, item in enumerate(items):
            peaks.clear()
            generator = torch.Generator().manual_seed(index)
            mini_pipe(item.caption, num_inference_steps=8, generator=generator, output_type="latent")
            scores.append(sorted(peaks)[-2])
    finally:
        DAGState.detect_step = detect_step
        mini_pipe.disable_dag()
    safe = np.array([not item.unsafe for item in items])
    groups = np.array([item.group for item in items])[safe]
    # a lone generation may differ from a batched one in the last bits
    assert_lowest_within(np.array(scores)[safe], groups, saved.metadata.presence_threshold, 0.2, tolerance=1e-5)


def test_calibrate_refuses_a_head_without_its_data(tmp_path, capsys):
    from dag_safety.cli import main
    from dag_safety.embeddings import RED_STAR

    with pytest.raises(SystemExit) as error:
        main(["calibrate", str(RED_STAR), "--validation-data", str(tmp_path), "--presence-head", "up_blocks.2",
              "--out", str(tmp_path / "out")])  # fmt: skip
    assert error.value.code == 2 and "--head-data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(RED_STAR), "--validation-data", str(tmp_path), "--head-data", str(tmp_path),
              "--out", str(tmp_path / "out")])  # fmt: skip
    assert "pass --presence-head too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(RED_STAR), "--validation-data", str(tmp_path), "--presence-head", "up_blocks.2",
              "--head-data", str(tmp_path / "."), "--out", str(tmp_path / "out")])  # fmt: skip
    assert "the same folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(RED_STAR), "--validation-data", str(tmp_path), "--presence-head", "up_blocks.2",
              "--presence-head-pooling", "median", "--out", str(tmp_path / "out")])  # fmt: skip
    assert "--presence-head-pooling: invalid choice: 'median'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(RED_STAR), "--validation-data", str(tmp_path), "--presence-head-swapped-captions",
              "all", "--out", str(tmp_path / "out")])  # fmt: skip
    assert "--presence-head-swapped-captions changes how" in capsys.readouterr().err


def test_calibrate_refuses_erase_settings_the_embedding_would_never_use(tmp_path, capsys):
    """Erase settings are saved for a calibrated selective rule: refused with the paper's rule as the default, and
    without validation data (no calibration, so the paper's rule stays)."""
    from dag_safety.cli import main
    from dag_safety.embeddings import RED_STAR

    with pytest.raises(SystemExit) as error:
        main(["calibrate", str(RED_STAR), "--validation-data", str(tmp_path), "--default-detection", "paper",
              "--default-erase-mode", "fill_final", "--out", str(tmp_path / "out")])  # fmt: skip
    assert error.value.code == 2
    assert "--default-erase-mode set how a selective rule erases" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["optimize", str(tmp_path), "--init-text", "red star", "--default-fill-region", "basin",
              "--no-default-hold-detection", "--out", str(tmp_path / "out")])  # fmt: skip
    assert "--default-hold-detection, --default-fill-region set how" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def annotated_images(count: int, side: int = 32) -> list:
    """Random RGB images, the first half unsafe with a square mask."""
    from PIL import Image

    from dag_safety.optimize import AnnotatedImage

    rng = np.random.default_rng(0)
    items = []
    for index in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mask = None
        if index < count // 2:
            mask = np.zeros((side, side), dtype=bool)
            top, left = rng.integers(0, side - 12, 2)
            mask[top : top + 12, left : left + 12] = True
        items.append(AnnotatedImage(f"{index}.png", Image.fromarray(pixels), mask, PROMPT))
    return items


def test_swapped_captions_give_each_image_a_caption_of_the_other_class_and_keep_its_mask():
    from dag_safety.presence_head import swap_captions

    images = annotated_images(10)
    images = [dataclasses.replace(item, caption=f"caption {index}") for index, item in enumerate(images)]
    unsafe_captions = {item.caption for item in images if item.unsafe}
    swapped = swap_captions(images, seed=3)
    assert [item.name for item in swapped] == [item.name for item in images]
    for item, copy in zip(images, swapped):
        assert copy.image is item.image and copy.mask is item.mask and copy.unsafe == item.unsafe
        assert (copy.caption in unsafe_captions) != item.unsafe
    assert [item.caption for item in swap_captions(images, seed=3)] == [item.caption for item in swapped]
    assert {item.caption for item in swapped} != {item.caption for item in swap_captions(images, seed=4)}
    with pytest.raises(ValueError, match="safe and unsafe images"):
        swap_captions(images[:5])


@pytest.mark.parametrize(
    ("hidden", "pooling", "swapped"),
    [(0, ("mean",), "none"), (8, ("max", "std", "mean"), "none"), (0, ("max",), "all"), (0, ("mean",), "unsafe")],
)
def test_the_fit_scores_the_components_inference_forms_with_the_labels_of_their_masks(pipe, hidden, pooling, swapped):
    """`fit_presence_head`'s training AUC against one recomputed on the inference path: the same passes
    (`guided_passes`), `Â` from the hand-smoothed rows' evidence, components by flood fill, each scored by the
    fitted head on its hand-smoothed features pooled by hand, labelled by overlap with an unsafe image's
    (max-pooled) mask, and a pairwise AUC. A fit on other features or labels than inference sees would not reproduce it.
    With swapped captions the passes also run each image (`"all"`) or each unsafe one (`"unsafe"`) under the other
    class's caption (one caption per class here, so the swap is known without drawing), labelled by its own mask."""
    from dag_safety.calibration import guided_passes
    from dag_safety.detection import concept_presence
    from dag_safety.presence_head import fit_presence_head

    captions = {True: "a red star", False: "a blue circle"}
    images = [dataclasses.replace(item, caption=captions[item.unsafe]) for item in annotated_images(8)]
    swaps = [item for item in images if swapped == "all" or (swapped == "unsafe" and item.unsafe)]
    passes = images + [dataclasses.replace(item, caption=captions[not item.unsafe]) for item in swaps]
    blank = head_for(pipe, 0.0)
    pipe.enable_dag(with_head(make_embedding(pipe), blank), detection="head", presence_threshold=0.5,
                    max_edit_area=1.0, warmup_steps=3)  # fmt: skip
    try:
        fit = fit_presence_head(
            pipe, images, blank.layers, 6, batch_size=4, hidden=hidden, progress=False, pooling=pooling,
            swapped_captions=swapped,
        )  # fmt: skip
        assert (fit.head.output is None) == (hidden == 0) and fit.head.pooling == pooling
        assert fit.images == len(images) and fit.swapped_captions == swapped
        state = pipe._dag
        beta = state.config.presence_smoothing
        scores, positive, smoothed, smoothed_features = [], [], {}, {}
        for start, masks, step, latent_size in guided_passes(pipe, passes, 6, 0, 4, progress=False):
            shares = state.shares(latent_size, concept_presence)[0].numpy()
            queries = state.capture.store.queries
            features = fit.head.features(queries, latent_size).numpy()
            first = step == 0
            smoothed[start] = shares if first else beta * smoothed[start] + (1 - beta) * shares
            smoothed_features[start] = features if first else beta * smoothed_features[start] + (1 - beta) * features
            for offset in range(len(shares)):
                share = smoothed[start][offset]
                labels = components_of((share - share.min()) / (share.max() - share.min()) >= 0.6)
                for component in range(1, labels.max() + 1):
                    pixels = smoothed_features[start][offset][labels.reshape(-1) == component]
                    pooled = pooled_by_hand(pixels, list(fit.head.widths), pooling)
                    scores.append(fit.head.component_logits(torch.from_numpy(pooled)[None]).item())
                    positive.append(passes[start + offset].unsafe and masks[offset][labels == component].any())
    finally:
        pipe.disable_dag()
    scores, positive = np.array(scores), np.array(positive)
    assert len(scores) == fit.components and positive.sum() == fit.positives > 0
    pairs = scores[positive][:, None] - scores[~positive][None, :]
    auc = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert fit.train_auc == pytest.approx(auc, abs=1e-4)
