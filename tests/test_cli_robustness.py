"""`dag-safety` against bad input: every option checked at parse time, output paths checked before any model is
loaded, never overwriting an embedding directory or (with --no-clobber) an image, one-line errors, clean output.

Nearly every case fails before a model loads (`load_pipeline` is replaced by a tripwire); the few that generate use
the tiny in-memory pipeline of `conftest.py`."""

import math
import os

import pytest
import torch
from test_optimize import write_folder

from dag_safety import cli
from dag_safety.cli import main
from dag_safety.guideline_embedding import EMBEDDING_FILE, GuidelineEmbedding
from dag_safety.optimize import OptimizationConfig


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""

    def tripwire(args):
        raise AssertionError("the command loaded a model before refusing its arguments")

    monkeypatch.setattr(cli, "load_pipeline", tripwire)


@pytest.fixture
def tiny_model(monkeypatch, pipe):
    """`load_pipeline` returns the tiny in-memory pipeline (32 px): generation in a fraction of a second."""
    monkeypatch.setattr(cli, "load_pipeline", lambda args: pipe)
    return pipe


def refused(argv, capsys) -> str:
    """Runs the command, expects argparse's exit status 2 and one `dag-safety: error:` line; returns the line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("dag-safety: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return captured.err


# 1. Every numeric option is checked at parse time


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
        (["--steps", "-1"], "argument --steps: expected an integer >= 1, got '-1'"),
        (["--steps", "2.5"], "argument --steps: expected an integer >= 1"),
        (["--num-images", "0"], "argument --num-images: expected an integer >= 1"),
        (["--guidance-scale", "nan"], "argument --guidance-scale: expected a finite number >= 0, got 'nan'"),
        (["--guidance-scale", "inf"], "argument --guidance-scale: expected a finite number"),
        (["--height", "60", "--width", "64"], "argument --height: expected an integer >= 8 and a multiple of 8"),
        (["--height", "0", "--width", "64"], "argument --height: expected an integer >= 8"),
        (["--height", "64", "--width", "-8"], "argument --width: expected an integer >= 8"),
        (["--height", "64"], "give --height and --width together"),
        (["--width", "64"], "give --height and --width together"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["--seed", str(2**64)], "argument --seed: expected an integer >= 0 and <= 2**63 - 1"),
        (["--device", "foo"], "argument --device: unknown device 'foo'"),
        (["--device", "meta"], "argument --device: 'meta' holds no data"),
    ],
)
def test_generate_options_are_checked_at_parse_time(options, expected, tmp_path, capsys, no_model):
    err = refused(["generate", "a red star", "--out", str(tmp_path / "x.png"), *options], capsys)
    assert expected in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, no_model):
    err = refused(["generate", "a red star", "--device", "cuda", "--out", str(tmp_path / "x.png")], capsys)
    assert "argument --device: 'cuda' is not available" in err and "use --device cpu" in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
        (["--lr", "inf"], "argument --lr: expected a finite number > 0"),
        (["--lr", "0"], "argument --lr: expected a finite number > 0"),
        (["--lr", "-1"], "argument --lr: expected a finite number > 0"),
        (["--base-scale", "-1"], "argument --base-scale: expected a finite number >= 0, got '-1'"),
        (["--base-scale", "nan"], "argument --base-scale: expected a finite number >= 0"),
        (["--timesteps", "0"], "argument --timesteps: expected an integer >= 1"),
        (["--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["--seed", "x"], "argument --seed: expected an integer"),
        (["--layer-fractions", "0.5", "0"], "argument --layer-fractions: expected a finite number > 0 and <= 1"),
        (["--layer-fractions", "1.5"], "argument --layer-fractions: expected a finite number > 0 and <= 1"),
        (["--layer-fractions", "nan"], "argument --layer-fractions: expected a finite number"),
        (["--init-text", "  "], "argument --init-text: expected a non-empty text"),
        (["--push-to-hub", "a/b/c"], "argument --push-to-hub: expected a Hub repo id"),
        (["--negative-weight", "0"], "argument --negative-weight: expected a finite number > 0"),
        (["--hard-pixel-fraction", "1.5"], "argument --hard-pixel-fraction: expected a finite number > 0 and <= 1"),
        (["--hard-pixel-fraction", "0.1"], "`hard_pixel_fraction` ranks pixels by presence evidence"),
        (["--edit-mask-threshold", "0"], "argument --edit-mask-threshold: expected auto or a finite number > 0"),
        (["--edit-mask-threshold", "automatic"], "argument --edit-mask-threshold: expected auto or a finite number"),
        (["--edit-mask-threshold", "0.7"], "--edit-mask-threshold 0.7 exceeds the embedding's unsafe threshold (0.5)"),
        (["--select-layers"], "--select-layers chooses on validation images: pass --validation-data"),
        (
            ["--select-layers", "--edit-mask-threshold", "auto"],
            "--select-layers and --edit-mask-threshold auto choose on validation images: pass --validation-data",
        ),
    ],
)
def test_optimize_options_are_checked_at_parse_time(options, expected, tmp_path, capsys, no_model):
    argv = ["optimize", str(tmp_path / "data"), "--init-text", "red star", "--out", str(tmp_path / "e"), *options]
    assert expected in refused(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_optimization_config_refuses_nan_and_negative_values():
    """The library check behind `--lr` / `--base-scale`: `learning_rate <= 0` let NaN through."""
    for changes, field in [
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"learning_rate": math.inf}, "learning_rate"),
        ({"base_scale": -1.0}, "base_scale"),
        ({"base_scale": math.nan}, "base_scale"),
        ({"layer_fractions": (0.5, 2.0)}, "layer_fractions"),
        ({"layer_fractions": ()}, "layer_fractions"),
        ({"layers": ()}, "layers"),
        ({"layers": "up_blocks.1"}, "layers"),
    ]:
        with pytest.raises(ValueError, match=f"`{field}` must be"):
            OptimizationConfig(init_text="red star", **changes)


# 2. generate: --out is checked before any model work; --no-clobber


@pytest.mark.parametrize(
    ("setup", "out", "expected"),
    [
        (lambda root: (root / "afile").write_text("x"), "afile/x.png", "is a file, not a directory"),
        (lambda root: (root / "afile").write_text("x"), "afile/sub/x.png", "is a file, not a directory"),
        (lambda root: (root / "dir.png").mkdir(), "dir.png", "is a directory; name an image file"),
        (lambda root: None, "x.txt", "--out must name an image file"),
    ],
    ids=["parent-file", "ancestor-file", "directory", "suffix"],
)
def test_generate_refuses_unusable_out_before_loading(setup, out, expected, tmp_path, capsys, no_model):
    setup(tmp_path)
    assert expected in refused(["generate", "a red star", "--out", str(tmp_path / out)], capsys)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (unwritable even for root)")
def test_generate_refuses_unwritable_out(capsys, no_model):
    assert "cannot write in '/proc'" in refused(["generate", "a red star", "--out", "/proc/x.png"], capsys)


def test_generate_refuses_a_directory_among_the_siblings(tmp_path, capsys, no_model):
    (tmp_path / "x_compare.png").mkdir()
    err = refused(["generate", "a red star", "--out", str(tmp_path / "x.png"), "--compare"], capsys)
    assert "x_compare.png' is a directory" in err


@pytest.mark.parametrize(
    ("existing", "options"),
    [
        ("x.png", []),
        ("x_1.png", ["--num-images", "2"]),
        ("x_map.png", ["--save-maps"]),
        ("x_compare.png", ["--compare"]),
    ],
)
def test_no_clobber_refuses_any_file_it_would_write(existing, options, tmp_path, capsys, no_model):
    (tmp_path / existing).write_bytes(b"keep me")
    argv = ["generate", "a red star", "--out", str(tmp_path / "x.png"), "--no-clobber", *options]
    err = refused(argv, capsys)
    assert f"--no-clobber: {tmp_path / existing} already exists" in err
    assert (tmp_path / existing).read_bytes() == b"keep me"


def test_out_is_overwritten_without_no_clobber_as_help_says(tmp_path, capsys, tiny_model):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "Existing files are overwritten" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    main(["generate", "a red star", "--out", str(out), "--steps", "2", "--guidance", "off", "--model", "tiny"])
    assert out.read_bytes()[:4] == b"\x89PNG" and f"wrote {out}" in capsys.readouterr().out


def test_needs_an_embedding_for_other_models_before_loading(tmp_path, capsys, no_model):
    err = refused(["generate", "a red star", "--model", "org/model", "--out", str(tmp_path / "x.png")], capsys)
    assert "pass --embedding DIR_OR_HUB_ID, or --guidance off" in err
    argv = ["generate", "a red star", "--model", "./nope", "--guidance", "off", "--out", str(tmp_path / "x.png")]
    err = refused(argv, capsys)
    assert "--model './nope': no local directory of that name exists" in err


# 3. optimize: --out must be new or empty (or --overwrite), checked before any work


def test_optimize_refuses_a_file_or_a_non_empty_out(tmp_path, capsys, no_model):
    data = str(tmp_path / "data")
    (tmp_path / "file").write_text("keep me")
    err = refused(["optimize", data, "--init-text", "red star", "--out", str(tmp_path / "file")], capsys)
    assert "is a file; name a new or empty directory" in err
    err = refused(["optimize", data, "--init-text", "red star", "--out", str(tmp_path / "file" / "e")], capsys)
    assert "is a file, not a directory" in err
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / "README.md").write_text("# the model card\n")
    err = refused(["optimize", data, "--init-text", "red star", "--out", str(model)], capsys)
    assert "is not empty (README.md, model_index.json)" in err and "--overwrite" in err
    assert (model / "README.md").read_text() == "# the model card\n" and not (model / EMBEDDING_FILE).exists()


def test_optimize_overwrites_only_with_overwrite(tmp_path, capsys, tiny_model):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "embedding"
    argv = ["optimize", str(data), "--init-text", "red star", "--out", str(out), "--model", "tiny"]
    argv += ["--timesteps", "1", "--steps", "1", "--layer-fractions", "0.5"]
    main(argv)
    capsys.readouterr()
    first = (out / EMBEDDING_FILE).read_bytes()
    assert "is not empty" in refused([*argv, "--lr", "1"], capsys)
    assert (out / EMBEDDING_FILE).read_bytes() == first
    main([*argv, "--lr", "1", "--overwrite"])
    metadata = GuidelineEmbedding.from_pretrained(out).metadata
    assert metadata.training["learning_rate"] == 1.0 and metadata.edit_mask_threshold == 0.01
    assert f"wrote {out}" in capsys.readouterr().out
    main([*argv, "--overwrite", "--edit-mask-threshold", "0.2"])
    assert GuidelineEmbedding.from_pretrained(out).metadata.edit_mask_threshold == 0.2


# 4. Library errors during the command: one line, exit status 2; --debug re-raises


def test_library_errors_are_one_line(tmp_path, capsys, no_model):
    err = refused(["generate", "a red star", "--embedding", "a/b/c", "--out", str(tmp_path / "x.png")], capsys)
    assert "No local directory 'a/b/c' exists, and 'a/b/c' is not a valid Hub repo id" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / EMBEDDING_FILE).write_bytes(b"\x00" * 7)
    err = refused(["generate", "a red star", "--embedding", str(broken), "--out", str(tmp_path / "x.png")], capsys)
    assert f"{broken / EMBEDDING_FILE} is not a readable safetensors file" in err
    err = refused(
        ["optimize", str(tmp_path / "nodata"), "--init-text", "red star", "--out", str(tmp_path / "e")], capsys
    )
    assert "nodata is not a directory of annotated images" in err


def test_debug_reraises(tmp_path):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        main(["generate", "a red star", "--embedding", "a/b/c", "--out", str(tmp_path / "x.png"), "--debug"])
    (tmp_path / "d.png").mkdir()
    with pytest.raises(cli.CommandError, match="is a directory"):
        main(["generate", "a red star", "--out", str(tmp_path / "d.png"), "--debug"])


# 5. Clean output: no library notices or loading bars; --debug leaves the libraries' logging alone


def _library_state():
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    return (
        diffusers_logging.get_verbosity(),
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.get_verbosity(),
        transformers_logging.is_progress_bar_enabled(),
        are_progress_bars_disabled(),
    )


@pytest.mark.parametrize("debug", [False, True])
def test_library_logging_is_quiet_during_the_command_and_restored(debug, tmp_path, monkeypatch):
    import logging

    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)

    before = _library_state()
    seen = []
    monkeypatch.setattr(cli, "generate", lambda args: seen.append(_library_state()))
    main(["generate", "a red star", "--out", str(tmp_path / "x.png"), *(["--debug"] if debug else [])])
    if debug:
        assert seen == [before]
    else:
        assert seen == [(logging.ERROR, False, logging.ERROR, False, before[4])]  # Hub download bars stay
    assert _library_state() == before


def test_generation_prints_what_was_detected_and_written_and_nothing_else(tmp_path, capsys, components):
    from dag_safety import DAGStableDiffusionPipeline

    DAGStableDiffusionPipeline(**components).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    out = tmp_path / "x.png"
    main(
        [
            "generate",
            "a red star",
            "--model",
            str(tmp_path / "model"),
            "--guidance",
            "off",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n"
    for noise in ("Loading pipeline components", "Loading weights", "[transformers]", "deprecated", "Warning"):
        assert noise not in captured.err
