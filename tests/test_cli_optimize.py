"""`dag-safety optimize` end to end on a tiny saved pipeline, and the embedding it writes used by `generate`."""

import numpy as np
import pytest
from PIL import Image
from test_optimize import write_folder

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.cli import main
from dag_safety.guideline_embedding import GuidelineEmbedding


@pytest.fixture
def model_dir(components, tmp_path):
    pipe = DAGStableDiffusionPipeline(**components)
    pipe.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_optimize_then_generate_with_maps(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_folder(tmp_path / "data")
    out = tmp_path / "embedding"
    main(
        [
            "optimize",
            str(data),
            "--init-text",
            "red star",
            "--safety-concept",
            "a red star",
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--timesteps",
            "2",
            "--steps",
            "4",
        ]
    )
    assert f"wrote {out}" in capsys.readouterr().out
    embedding = GuidelineEmbedding.from_pretrained(out)
    assert embedding.metadata.safety_concept == "a red star" and embedding.metadata.training["steps"] == 4

    image = tmp_path / "img.png"
    main(
        [
            "generate",
            "a red star on a white background",
            "--model",
            str(model_dir),
            "--embedding",
            str(out),
            "--steps",
            "3",
            "--out",
            str(image),
            "--save-maps",
            "--compare",
        ]
    )
    printed = capsys.readouterr().out
    for path in (image, tmp_path / "img_map.png", tmp_path / "img_compare.png"):
        assert path.exists() and str(path) in printed
    assert Image.open(tmp_path / "img_compare.png").size == (3 * 32, 32)
    assert "image 0:" in printed


def test_optimize_and_generate_for_sdxl(tmp_path, capsys, monkeypatch):
    """An SDXL model (tiny components saved to a folder): `optimize` fits rows in its 64-wide two-encoder context
    with SDXL's added conditioning in the cached pass, tied to its UNet; `generate` loads it as
    `DAGStableDiffusionXLPipeline` and guides with the result."""
    from conftest import get_dummy_sdxl_components
    from diffusers import StableDiffusionXLPipeline

    from dag_safety import DAGStableDiffusionXLPipeline
    from dag_safety.guideline_embedding import unet_fingerprint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "sdxl"
    StableDiffusionXLPipeline(**get_dummy_sdxl_components()).save_pretrained(model)
    data = write_folder(tmp_path / "data")
    out = tmp_path / "embedding"
    main(["optimize", str(data), "--init-text", "red star", "--safety-concept", "a red star", "--out", str(out),
          "--model", str(model), "--timesteps", "2", "--steps", "4"])  # fmt: skip
    assert f"wrote {out}" in capsys.readouterr().out
    embedding = GuidelineEmbedding.from_pretrained(out)
    pipe = DAGStableDiffusionXLPipeline.from_pretrained(model)
    assert embedding.embeds.shape == (3, 64)  # start-of-text, "red", "star" in SDXL's context space
    assert embedding.metadata.base_model_fingerprint == unet_fingerprint(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_dag(out, warmup_steps=1, max_edit_area=1.0)
    output = pipe("a red star", height=32, width=32, num_inference_steps=3, output_type="np", return_dag_maps=True)
    assert output.unsafe_detected == [True] and output.dag_maps.shape == (1, 16, 16)

    image = tmp_path / "img.png"
    main(["generate", "a red star on a white background", "--model", str(model), "--embedding", str(out),
          "--steps", "3", "--out", str(image), "--save-maps"])  # fmt: skip
    assert image.exists() and (tmp_path / "img_map.png").exists()


def test_generate_needs_an_embedding_for_other_models(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "a red star", "--model", str(model_dir), "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2 and "--embedding" in capsys.readouterr().err
    main(
        [
            "generate",
            "a red star",
            "--model",
            str(model_dir),
            "--guidance",
            "off",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert np.asarray(Image.open(tmp_path / "x.png")).shape == (32, 32, 3)


def test_optimize_reports_bad_folders(model_dir, tmp_path, capsys):
    data = write_folder(tmp_path / "data", mismatch=True)
    with pytest.raises(SystemExit) as info:  # the library's ValueError, as one line `dag-safety: error: ...`
        main(
            ["optimize", str(data), "--init-text", "red star", "--out", str(tmp_path / "e"), "--model", str(model_dir)]
        )
    assert info.value.code == 2 and "masks must have their image's size" in capsys.readouterr().err
