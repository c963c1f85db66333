"""Guideline-token optimization on tiny components: folder loading, errors, a loss that goes down."""

import numpy as np
import pytest
import torch
from PIL import Image

from dag_safety.optimize import (
    OptimizationConfig,
    encode_init_rows,
    load_annotated_folder,
    optimize_guideline_embedding,
    pair_cross_entropy,
    presence_loss,
)


def write_folder(root, n_unsafe=2, n_safe=1, mismatch=False):
    (root / "masks").mkdir(parents=True)
    lines = []
    rng = np.random.default_rng(0)
    for index in range(n_unsafe + n_safe):
        name = f"img_{index}.png"
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        if index < n_unsafe:
            mask = np.zeros((16, 16) if mismatch else (32, 32), dtype=np.uint8)
            mask[4:14, 4 + 8 * index : 14 + 8 * index] = 255
            Image.fromarray(mask).save(root / "masks" / name)
        lines.append(f"{name}\ta red star on a white background")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def test_folder_loading_and_errors(tmp_path):
    items = load_annotated_folder(write_folder(tmp_path / "ok"))
    assert [item.unsafe for item in items] == [True, True, False]
    assert items[0].mask.shape == (32, 32)
    with pytest.raises(ValueError, match="mask img_0.png is 16×16 but its image img_0.png is 32×32"):
        load_annotated_folder(write_folder(tmp_path / "mismatch", mismatch=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_annotated_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="has no unsafe image"):
        load_annotated_folder(write_folder(tmp_path / "safe", n_unsafe=0, n_safe=2))
    folder = write_folder(tmp_path / "nocaption")
    (folder / "captions.txt").write_text("img_0.png\ta red star\n")
    with pytest.raises(ValueError, match="img_1.png has no caption"):
        load_annotated_folder(folder)


def test_config_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="`eval_every` must be >= 1"):
        OptimizationConfig(init_text="red star", eval_every=0)
    items = load_annotated_folder(write_folder(tmp_path / "data"))
    config = OptimizationConfig(init_text="red star", timestep_range=(50, 1000), num_timesteps=2, steps=1)
    with pytest.raises(ValueError, match=r"reaches past the model's 1000 training timesteps"):
        optimize_guideline_embedding(pipe, items, config, progress=False)


def test_init_text_without_tokens(pipe):
    with pytest.raises(ValueError, match="encodes to no concept token"):
        encode_init_rows(pipe, "")
    rows = encode_init_rows(pipe, "red star")
    assert rows.shape == (3, 32)


def test_pair_cross_entropy_normalises_the_pair_together_as_ovam():
    """OVAM's loss: one min-max over both maps, then a two-class cross-entropy with `[1 - y, y]` targets. On a safe
    image a concept map that is uniformly faint beats one with a speck: normalising each map on its own would score
    the two alike, since it is blind to the concept map's scale."""
    generator = torch.Generator().manual_seed(0)
    shares = torch.rand(3, 8, 8, generator=generator)
    pair = torch.stack([1 - shares, shares], dim=1)  # (T, 2, H, W)
    target = (torch.rand(8, 8, generator=generator) > 0.7).float()
    low, high = pair.amin(dim=(1, 2, 3), keepdim=True), pair.amax(dim=(1, 2, 3), keepdim=True)
    logits = (pair - low) / (high - low)
    expected = torch.nn.functional.cross_entropy(logits, torch.stack([1 - target, target]).expand(3, -1, -1, -1))
    assert pair_cross_entropy(pair, target) == pytest.approx(float(expected), rel=1e-5)

    safe = torch.zeros(8, 8)
    faint = torch.full((1, 8, 8), 0.01) + 0.001 * torch.rand(1, 8, 8, generator=generator)
    speck = faint.clone()
    speck[0, 2:5, 2:5] = 0.6

    def loss(concept):
        return float(pair_cross_entropy(torch.stack([1 - concept, concept], dim=1), safe))

    floor = -float(torch.nn.functional.logsigmoid(torch.tensor(1.0)))  # logits in [0, 1]: the best a pixel can get
    assert loss(faint) == pytest.approx(floor, abs=0.01)  # per-map min-max would stretch the faint noise to [0, 1]
    assert loss(speck) > floor + 0.03


def test_optimization_lowers_the_loss_and_keeps_the_model(pipe, tmp_path):
    items = load_annotated_folder(write_folder(tmp_path / "data"))
    processors = dict(pipe.unet.attn_processors)
    config = OptimizationConfig(init_text="red star", num_timesteps=3, steps=30, eval_every=5, learning_rate=200.0)
    result = optimize_guideline_embedding(pipe, items, config, base_model="tiny", progress=False)
    assert len(result.losses) == 30
    first, best = result.eval_losses[0][1], min(loss for _, loss in result.eval_losses)
    assert best < first
    assert result.embedding.metadata.final_loss == pytest.approx(best, abs=1e-6)
    assert result.embedding.embeds.shape == (3, 32)
    assert torch.equal(result.embedding.embeds[0], encode_init_rows(pipe, "red star")[0])  # SoT row kept
    assert all(pipe.unet.attn_processors[name] is proc for name, proc in processors.items())
    assert not any(p.requires_grad is False for p in pipe.unet.parameters())  # restored as found
    pipe.enable_dag(result.embedding)
    assert pipe.dag_config.layer_fractions == (0.25, 0.5)


def test_named_layers_optimize_as_their_fractions_and_are_saved(pipe, tmp_path):
    """`layers` naming exactly the 1/2-side blocks fits the same embedding as `layer_fractions=(0.5,)`, bit for bit,
    and the embedding brings the names to `enable_dag`."""
    from dag_safety.attention import cross_attention_layers

    half = tuple(
        sorted({n.split(".transformer_blocks")[0] for n, f in cross_attention_layers(pipe.unet).items() if f == 2})
    )
    items = load_annotated_folder(write_folder(tmp_path / "data"))
    settings = {"init_text": "red star", "num_timesteps": 2, "steps": 6, "eval_every": 3}
    by_fraction = optimize_guideline_embedding(
        pipe, items, OptimizationConfig(layer_fractions=(0.5,), **settings), base_model="tiny", progress=False
    )
    by_name = optimize_guideline_embedding(
        pipe, items, OptimizationConfig(layers=half, **settings), base_model="tiny", progress=False
    )
    assert torch.equal(by_name.embedding.embeds, by_fraction.embedding.embeds)
    assert by_name.embedding.metadata.layers == half and by_fraction.embedding.metadata.layers is None
    pipe.enable_dag(by_name.embedding)
    assert pipe.dag_config.layers == half


def test_folder_formats_from_common_tools(tmp_path):
    """0/1 masks, a CSV with a byte-order mark (spreadsheet export), and a photo stored sideways with an EXIF
    orientation tag, its mask drawn on the upright view."""
    folder = write_folder(tmp_path / "formats")
    mask = np.asarray(Image.open(folder / "masks" / "img_0.png"))
    Image.fromarray((mask > 0).astype(np.uint8)).save(folder / "masks" / "img_0.png")  # values 0 / 1
    rows = [line.split("\t") for line in (folder / "captions.txt").read_text().splitlines()]
    (folder / "captions.txt").unlink()
    csv_text = "file_name,caption\n" + "".join(f"{name},{caption}\n" for name, caption in rows)
    (folder / "captions.csv").write_text(csv_text, encoding="utf-8-sig")
    stored = Image.fromarray(np.zeros((16, 32, 3), dtype=np.uint8))  # 32 wide, 16 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    stored.save(folder / "img_3.jpg", exif=exif)
    upright_mask = np.zeros((32, 16), dtype=np.uint8)  # 16 wide, 32 high, as viewers show the photo
    upright_mask[:8] = 255
    Image.fromarray(upright_mask).save(folder / "masks" / "img_3.png")
    with (folder / "captions.csv").open("a", encoding="utf-8") as handle:
        handle.write("img_3.jpg,a red star\n")

    items = {item.name: item for item in load_annotated_folder(folder)}
    assert items["img_0.png"].unsafe and int(items["img_0.png"].mask.sum()) == int((mask > 0).sum())
    assert items["img_3.jpg"].image.size == (16, 32) and items["img_3.jpg"].mask.sum() == 8 * 16


def test_optimization_noises_with_the_training_process_whatever_the_sampler(pipe, tmp_path):
    """An Euler sampler's `add_noise` scales differently and indexes its sampling schedule: the cache must not use
    it. Same embedding as with the DDPM forward process, also after the pipeline has sampled."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    items = load_annotated_folder(write_folder(tmp_path / "data"))
    config = OptimizationConfig(init_text="red star", num_timesteps=2, steps=3, eval_every=3)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    reference = optimize_guideline_embedding(pipe, items, config, progress=False).embedding.embeds
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(2)
    assert torch.equal(optimize_guideline_embedding(pipe, items, config, progress=False).embedding.embeds, reference)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "dice"}, "`loss` must be one of"),
        ({"optimizer": "lbfgs"}, "`optimizer` must be one of"),
        ({"positive_weight": 0.0}, "`positive_weight` must be a finite number > 0"),
        ({"negative_weight": -1.0}, "`negative_weight` must be a finite number > 0"),
        ({"negative_weight": float("inf")}, "`negative_weight` must be a finite number > 0"),
        ({"loss": "presence", "hard_pixel_fraction": 0.0}, r"`hard_pixel_fraction` must be in \(0, 1\]"),
        ({"hard_pixel_fraction": 0.5}, "`hard_pixel_fraction` ranks pixels by presence evidence"),
        ({"optimizer": "adam", "learning_rate": float("nan")}, "`learning_rate` must be a finite number > 0"),
    ],
)
def test_config_refuses_bad_loss_and_optimizer_options(options, message):
    with pytest.raises(ValueError, match=message):
        OptimizationConfig(init_text="red star", **options)


def test_learning_rate_defaults_follow_the_optimizer():
    assert OptimizationConfig(init_text="red star").learning_rate == 200.0  # the paper's Table 4, SGD
    assert OptimizationConfig(init_text="red star", optimizer="adam").learning_rate == 0.03
    assert OptimizationConfig(init_text="red star", optimizer="adam", learning_rate=0.1).learning_rate == 0.1


def test_presence_loss_is_a_weighted_cross_entropy_of_one_minus_the_start_of_text_share(pipe):
    """Against attention recomputed by hand from each layer's `to_k` and `F.binary_cross_entropy`."""
    from dag_safety.attention import CrossAttentionCapture
    from dag_safety.detection import QueryProjection
    from dag_safety.optimize import _CachedImage

    modules = CrossAttentionCapture(pipe.unet, (0.25, 0.5)).attention_modules()
    projections = {name: QueryProjection.snapshot(attn) for name, attn in modules.items()}
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 32, generator=generator)
    target = torch.zeros(16, 16)
    target[3:9, 5:12] = 1.0
    queries, sizes = {}, {}
    for name, attn in modules.items():
        side = 4  # the loss reads the grid from `sizes`, whatever the layer's resolution in the UNet
        head_dim = attn.to_q.out_features // attn.heads
        queries[name] = torch.randn(2, attn.heads, side * side, head_dim, generator=generator)
        sizes[name] = (side, side)
    image = _CachedImage(queries, sizes, target, unsafe=True)

    with torch.no_grad():
        start = 0.0
        for name, attn in modules.items():
            keys = attn.to_k(embeds).view(3, attn.heads, -1).transpose(0, 1)  # (heads, 3, head_dim)
            probs = torch.softmax(queries[name] @ keys.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)  # (T, N, 3)
            grid = probs[..., 0].reshape(2, 1, *sizes[name])
            start = start + torch.nn.functional.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)
        presence = 1 - start[:, 0] / len(modules)
        weight = (5.0 * target + (1 - target)).expand(2, -1, -1)
        expected = (
            torch.nn.functional.binary_cross_entropy(
                presence, target.expand(2, -1, -1), weight=weight, reduction="sum"
            )
            / weight.sum()
        )
        got = presence_loss(embeds, image, modules, projections, positive_weight=5.0)
        # a safe image, hard pixels only: the largest per-pixel losses against "absent", 13 of 256 per timestep
        safe = _CachedImage(queries, sizes, torch.zeros(16, 16), unsafe=False)
        per_pixel = torch.nn.functional.binary_cross_entropy(presence, torch.zeros_like(presence), reduction="none")
        hardest = torch.sort(per_pixel.flatten(1), dim=1, descending=True).values[:, :13]
        got_safe = presence_loss(embeds, safe, modules, projections, positive_weight=5.0, hard_pixel_fraction=0.05)
        all_safe = presence_loss(embeds, safe, modules, projections, positive_weight=5.0)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(all_safe) == pytest.approx(float(per_pixel.mean()), rel=1e-5)
    assert float(got_safe) == pytest.approx(float(hardest.mean()), rel=1e-5)


def test_negative_weight_weighs_safe_images_in_the_checkpoint_loss(pipe, tmp_path):
    """The step-0 validation loss is each image's own loss, safe ones weighted: against runs on each image alone."""
    items = load_annotated_folder(write_folder(tmp_path / "data", n_unsafe=1, n_safe=1))
    validation = load_annotated_folder(write_folder(tmp_path / "validation", n_unsafe=1, n_safe=1))
    unsafe, safe = ([item for item in validation if item.unsafe is flag] for flag in (True, False))

    def first_loss(images, **options):
        config = OptimizationConfig(
            init_text="red star", num_timesteps=2, steps=1, loss="presence", hard_pixel_fraction=0.1, **options
        )
        result = optimize_guideline_embedding(pipe, items, config, progress=False, validation=images)
        return result.eval_losses[0][1], result.embedding.metadata.training

    # the validation cache's noise depends on the images' order only: the unsafe one comes first in each run
    unsafe_loss, _ = first_loss(unsafe)
    safe_loss = 2 * first_loss(unsafe + safe)[0] - unsafe_loss  # the plain mean of the two
    assert first_loss(unsafe + safe, negative_weight=1e-9)[0] == pytest.approx(unsafe_loss, rel=1e-6)
    weighted, training = first_loss(unsafe + safe, negative_weight=3.0)
    assert weighted == pytest.approx((unsafe_loss + 3.0 * safe_loss) / 4.0, rel=1e-5)
    assert safe_loss != pytest.approx(unsafe_loss, rel=1e-3)  # else the weights could not show
    assert training["negative_weight"] == 3.0 and training["hard_pixel_fraction"] == 0.1


def test_adam_and_the_presence_loss_descend_and_validation_chooses_the_checkpoint(pipe, tmp_path):
    items = load_annotated_folder(write_folder(tmp_path / "data"))
    validation = load_annotated_folder(write_folder(tmp_path / "validation", n_unsafe=1, n_safe=1))
    config = OptimizationConfig(
        init_text="red star", num_timesteps=2, steps=40, eval_every=2, loss="presence", positive_weight=4.0,
        optimizer="adam",
    )  # fmt: skip
    result = optimize_guideline_embedding(pipe, items, config, progress=False, validation=validation)
    steps = [step for step, _ in result.eval_losses]
    assert steps == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]  # every max(eval_every, steps // 10) steps
    first, best = result.eval_losses[0][1], min(loss for _, loss in result.eval_losses)
    assert best < first
    assert result.embedding.metadata.final_loss == pytest.approx(best, abs=1e-6)
    training = result.embedding.metadata.training
    assert training["loss"] == "presence" and training["optimizer"] == "adam" and training["learning_rate"] == 0.03
    assert training["selected_on"] == "validation" and training["validation_images"] == 2
