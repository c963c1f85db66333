"""The mini model's training recipe: learning-rate schedule and the one-command reproduction."""

import json
from pathlib import Path

import pytest

from dag_safety.mini.training.train_unet import lr_factor


def test_learning_rate_schedule_warmup_stable_decay():
    assert lr_factor(0, warmup=200, steps=1000) == pytest.approx(1 / 200)
    assert lr_factor(199, warmup=200, steps=1000) == 1.0
    assert lr_factor(999, warmup=200, steps=1000) == 1.0  # constant without a cool-down
    assert lr_factor(600, warmup=200, steps=1000, decay_start=600) == 1.0
    assert lr_factor(800, warmup=200, steps=1000, decay_start=600) == pytest.approx(0.5)
    assert lr_factor(1000, warmup=200, steps=1000, decay_start=600) == 0.0


def test_reproduction_chain_smoke(tmp_path):
    """`python -m dag_safety.mini.training.reproduce --smoke` runs every phase of the committed recipe (a few steps each) and
    exports a pipeline with the bundled model's architecture."""
    from diffusers import UNet2DConditionModel

    from dag_safety.mini import MODEL_PATH
    from dag_safety.mini.training.reproduce import main

    main(["--output-dir", str(tmp_path), "--smoke", "--threads", "1"])
    steps = [json.loads(line) for line in (tmp_path / "unet" / "loss.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert [("grounding" in s) for s in steps] == [False] * 3 + [True] * 9  # plain phase, then grounded
    exported = UNet2DConditionModel.load_config(tmp_path / "model" / "unet")
    bundled = UNet2DConditionModel.load_config(Path(MODEL_PATH) / "unet")
    ignore = {"_diffusers_version", "_name_or_path"}
    assert {k: v for k, v in exported.items() if k not in ignore} == {
        k: v for k, v in bundled.items() if k not in ignore
    }
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_images"] == 4


def test_hour_recipe_is_the_full_chain_shortened():
    """`--recipe hour` runs the same phases with the same flags, only with fewer steps (about 1 h on 2 CPU cores)."""
    from dag_safety.mini.training.reproduce import RECIPES, phases

    def flags(recipe):
        return [(name, argv) for name, _, argv in phases(Path("out"), "cpu", 2, recipe=recipe)]

    def value(argv, flag):
        return int(argv[argv.index(flag) + 1])

    full, hour = flags("full"), flags("hour")
    assert [name for name, _ in full] == [name for name, _ in hour]
    for (_, full_argv), (_, hour_argv) in zip(full, hour):
        assert [a for a in full_argv if not a.isdigit()] == [a for a in hour_argv if not a.isdigit()]
    (_, vae), (_, plain), (_, grounded) = hour[:3]
    recipe = RECIPES["hour"]
    assert (value(vae, "--steps"), value(plain, "--steps")) == (recipe.vae_steps, recipe.plain_steps)
    assert (value(grounded, "--steps"), value(grounded, "--lr-decay-start")) == (
        recipe.grounded_steps,
        recipe.decay_start,
    )
    assert recipe.grounded_steps < RECIPES["full"].grounded_steps / 3


def test_strong_recipe_passes_its_model_and_batch_to_both_unet_phases():
    """`--recipe strong` (the wider model in training): width, batch, learning rate and scene count reach both
    UNet phases, so a resumed phase continues the same run; the other recipes keep the bundled model's."""
    from dag_safety.mini.training.reproduce import RECIPES, phases

    for name in RECIPES:
        recipe = RECIPES[name]
        unet_phases = [
            argv for phase, _, argv in phases(Path("out"), "cpu", 1, recipe=name) if phase.startswith("unet")
        ]
        assert len(unet_phases) == 2
        for argv in unet_phases:
            got = {flag: argv[argv.index(flag) + 1] for flag in ("--width", "--batch-size", "--lr", "--num-scenes")}
            assert got == {"--width": str(recipe.width), "--batch-size": str(recipe.batch_size),
                           "--lr": str(recipe.lr), "--num-scenes": str(recipe.num_scenes)}  # fmt: skip
    assert (RECIPES["strong"].width, RECIPES["full"].width, RECIPES["full"].batch_size) == (48, 32, 16)
    # a VAE made before replaces the VAE phase, in training and export alike
    given = [(phase, argv) for phase, _, argv in phases(Path("out"), "cpu", 1, recipe="strong", vae=Path("v"))]
    assert [phase for phase, _ in given][:1] == ["unet (plain)"]
    assert all(argv[argv.index("--vae") + 1] == "v" for phase, argv in given if "--vae" in argv)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Stopping at a checkpoint and rerunning with `--resume` gives the batches, losses and weights of one
    uninterrupted run, bit for bit (same thread count): the resumability the model card's recipe relies on."""
    import torch

    from dag_safety.mini import MODEL_PATH
    from dag_safety.mini.training.train_unet import main

    def train(out, steps, *extra):
        main([
            "--vae", str(Path(MODEL_PATH) / "vae"), "--output-dir", str(out), "--steps", str(steps),
            "--num-scenes", "64", "--batch-size", "4", "--checkpoint-every", "2", "--threads", "1", *extra,
        ])  # fmt: skip

    train(tmp_path / "once", 4)
    train(tmp_path / "twice", 2)
    train(tmp_path / "twice", 4, "--resume")

    def losses(out):
        return [(r["step"], r["loss"], r["grounding"]) for r in map(json.loads, (out / "loss.jsonl").open())]

    assert losses(tmp_path / "once") == losses(tmp_path / "twice")
    assert [s for s, _, _ in losses(tmp_path / "twice")] == [1, 2, 3, 4]
    once, twice = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("once", "twice"))
    assert once["step"] == twice["step"] == 4
    assert once["model"].keys() == twice["model"].keys()
    assert all(torch.equal(once["model"][k], twice["model"][k]) for k in once["model"])
    assert all(torch.equal(once["ema"]["shadow"][k], twice["ema"]["shadow"][k]) for k in once["ema"]["shadow"])


def test_freeze_unet_fits_only_the_text_encoder_to_the_given_unet(tmp_path):
    """`--unet-init DIR --freeze-unet` (refitting a lost text encoder): the checkpoint's UNet is the given one, bit for
    bit, after training, and the text encoder moved."""
    import torch
    from diffusers import UNet2DConditionModel

    from dag_safety.mini import MODEL_PATH
    from dag_safety.mini.training.train_unet import main

    given = UNet2DConditionModel.from_pretrained(Path(MODEL_PATH) / "unet").state_dict()
    states = []
    for steps in (1, 2):
        main([
            "--vae", str(Path(MODEL_PATH) / "vae"), "--output-dir", str(tmp_path / str(steps)), "--steps", str(steps),
            "--num-scenes", "16", "--batch-size", "4", "--threads", "1", "--unet-init", str(Path(MODEL_PATH) / "unet"),
            "--freeze-unet",
        ])  # fmt: skip
        states.append(torch.load(tmp_path / str(steps) / "checkpoint.pt", weights_only=False)["model"])
    for state in states:
        unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        assert unet.keys() == given.keys()
        assert all(torch.equal(unet[k], v) for k, v in given.items())
    # the second step moved the text encoder (the two runs share their first step: same seed and batches)
    text = [k for k in states[0] if k.startswith("text_encoder.")]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in text)


def test_unet_init_errors_name_the_fix(tmp_path):
    from dag_safety.mini import MODEL_PATH
    from dag_safety.mini.training.train_unet import main

    common = [
        "--vae",
        str(Path(MODEL_PATH) / "vae"),
        "--output-dir",
        str(tmp_path),
        "--num-scenes",
        "4",
        "--threads",
        "1",
    ]
    with pytest.raises(SystemExit, match="--unet-init DIR"):
        main([*common, "--freeze-unet"])
    with pytest.raises(SystemExit, match="pass the --width it was trained at"):
        main([*common, "--width", "48", "--unet-init", str(Path(MODEL_PATH) / "unet")])


def test_ema_update_is_the_moving_average_with_warmup():
    import torch

    from dag_safety.mini.training.common import EMA

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.999)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    d = 2 / 11  # the warm-up decay (1 + n) / (10 + n) at n = 1, below 0.999
    torch.testing.assert_close(ema.shadow["weight"], d * start["weight"] + (1 - d) * module.weight.detach())
    torch.testing.assert_close(ema.shadow["bias"], module.bias.detach())


def test_ema_loads_a_checkpoint_onto_its_modules_device():
    """Checkpoints load on the CPU; a resumed GPU run must keep averaging on the GPU (a resumed CUDA run failed
    with "Expected all tensors to be on the same device" before). The meta device stands in for CUDA."""
    import torch

    from dag_safety.mini.training.common import EMA

    saved = EMA(torch.nn.Linear(3, 2)).state_dict()
    ema = EMA(torch.nn.Linear(3, 2, device="meta"))
    ema.load_state_dict(saved)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
