"""`dag-safety generate` on the bundled mini model, mostly with plain generation (`--guidance off`; offline, seconds
on the CPU). The DAG options of the CLI are tested with the pipeline's tests, but for one run that shows they reach
`enable_dag`."""

import numpy as np
import pytest
from PIL import Image

from dag_safety.cli import build_parser, main
from dag_safety.mini import MODEL_PATH, detect


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_generate_one_image(tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["generate", "a red star and a blue circle on a white background", "--out", str(out), "--guidance", "off"]
    assert main(argv) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (64, 64, 3)
    assert img.std() > 10  # not a blank image
    assert str(out) in capsys.readouterr().out


def test_generate_several_images_is_seeded(tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = [
        "generate",
        "a green square on a black background",
        "--out",
        str(out),
        "--num-images",
        "3",
        "--steps",
        "10",
        "--seed",
        "5",
        "--model",
        MODEL_PATH,
        "--guidance",
        "off",
    ]
    main(args)
    printed = capsys.readouterr().out
    files = [tmp_path / f"grid_{i}.png" for i in range(3)]
    for f in [out, *files]:
        assert f.exists() and str(f) in printed
    assert Image.open(out).size == (3 * 64, 64)  # one row of 3
    first = np.asarray(Image.open(files[0]))
    # image i is seeded with seed + i: re-running one image alone reproduces it
    single = tmp_path / "single.png"
    main(
        [
            "generate",
            "a green square on a black background",
            "--out",
            str(single),
            "--steps",
            "10",
            "--seed",
            "5",
            "--guidance",
            "off",
        ]
    )
    np.testing.assert_allclose(np.asarray(Image.open(single)).astype(int), first.astype(int), atol=2)


def test_parser_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate"])
    # errors: one line `dag-safety: error: ...` on stderr, exit status 2 (more cases in test_cli_robustness.py)
    with pytest.raises(SystemExit) as info:
        main(["generate", "a red star on a gray background", "--out", str(tmp_path / "x.txt"), "--guidance", "off"])
    assert info.value.code == 2 and "dag-safety: error: --out" in capsys.readouterr().err
    for flag in ("--save-maps", "--compare"):  # refused before anything is loaded or written
        with pytest.raises(SystemExit) as info:
            main(["generate", "a red star", "--out", str(tmp_path / "y.png"), "--guidance", "off", flag])
        assert info.value.code == 2 and f"{flag} shows DAG's detection" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
    for flag, value in (("--detection", "head"), ("--erase-mode", "fill_final"), ("--fill-region", "basin")):
        with pytest.raises(SystemExit) as info:
            main(["generate", "a red star", "--out", str(tmp_path / "z.png"), "--guidance", "off", flag, value])
        assert (
            info.value.code == 2
            and f"{flag} configures DAG, which `--guidance off` turns off" in capsys.readouterr().err
        )


def test_generate_with_the_final_fill(tmp_path):
    """`--erase-mode` and `--fill-region` reach `enable_dag`: the README demo's red star goes, its blue circle stays."""
    out = tmp_path / "demo.png"
    argv = ["generate", "a red star and a blue circle on a white background", "--out", str(out), "--seed", "0"]
    main([*argv, "--erase-mode", "fill_final", "--fill-region", "basin"])
    found = {(d.color, d.shape) for d in detect(np.asarray(Image.open(out).convert("RGB")))}
    assert ("red", "star") not in found and ("blue", "circle") in found
    main([*argv, "--out", str(tmp_path / "plain.png"), "--guidance", "off"])
    found = {(d.color, d.shape) for d in detect(np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")))}
    assert ("red", "star") in found and ("blue", "circle") in found
