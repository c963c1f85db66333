"""GuidelineEmbedding: save / load / Hub cache, and its use in enable_dag."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_embedding
from safetensors import safe_open
from safetensors.torch import save_file

from dag_safety.config import SLD_SAFETY_CONCEPT
from dag_safety.guideline_embedding import EMBEDDING_FILE, GuidelineEmbedding, unet_fingerprint


def test_save_load_roundtrip(pipe, tmp_path):
    embedding = make_embedding(pipe)
    embedding.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", EMBEDDING_FILE]
    with safe_open(tmp_path / EMBEDDING_FILE, framework="pt") as handle:
        header = handle.metadata()
    assert header["format"] == "dag-safety/guideline-embedding" and header["token_layout"] == "sot+concept"
    assert json.loads(header["layer_fractions"]) == [0.5]
    assert json.loads((tmp_path / "config.json").read_text())["concept"] == "red star"
    assert "red star" in (tmp_path / "README.md").read_text()
    loaded = GuidelineEmbedding.from_pretrained(tmp_path)
    assert torch.equal(loaded.embeds, embedding.embeds)
    assert loaded.metadata == embedding.metadata


def test_loaded_rows_sit_in_aligned_memory_wherever_the_file_put_them(pipe, tmp_path):
    """The rows are read into torch's own (64-byte aligned) memory: read in place they would sit wherever the
    header's length put them, and the CPU kernels' last bits depend on that alignment, so the same rows saved with
    another header generated another image (measured on the mini model)."""
    in_file = set()
    for length in range(8):  # the header grows in steps of 8 bytes: every offset modulo 64
        folder = tmp_path / str(length)
        embedding = make_embedding(pipe, concept="red star" + " " * (8 * length))
        embedding.save_pretrained(folder)
        with safe_open(folder / EMBEDDING_FILE, framework="pt") as handle:
            in_file.add(handle.get_tensor("guideline_embeds").data_ptr() % 64)
        loaded = GuidelineEmbedding.from_pretrained(folder)
        assert loaded.embeds.data_ptr() % 64 == 0 and torch.equal(loaded.embeds, embedding.embeds)
    assert len(in_file) > 1  # the files did put the rows at other alignments


def test_from_hub_cache_offline(pipe, tmp_path, monkeypatch):
    """Loading by repo id resolves from a huggingface_hub cache with HF_HUB_OFFLINE=1 (no network)."""
    source = tmp_path / "source"
    make_embedding(pipe).save_pretrained(source)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--org--red-star"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    loaded = GuidelineEmbedding.from_pretrained("org/red-star", cache_dir=tmp_path / "hf_home" / "hub")
    assert loaded.metadata.concept == "red star"
    pipe.enable_dag("org/red-star")  # by repo id, through the default cache
    assert pipe.dag_config.layer_fractions == (0.5,)
    with pytest.raises(Exception, match="(?i)offline|cache|not found|couldn't"):
        GuidelineEmbedding.from_pretrained("org/not-cached")
    # a cache holding the embedding file alone (fetched with hf_hub_download) is enough: no config.json needed
    only_weights = tmp_path / "hf_home" / "hub" / "models--org--weights-only"
    (only_weights / "refs").mkdir(parents=True)
    (only_weights / "refs" / "main").write_text(commit)
    (only_weights / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(source / EMBEDDING_FILE, only_weights / "snapshots" / commit / EMBEDDING_FILE)
    assert GuidelineEmbedding.from_pretrained("org/weights-only").metadata.concept == "red star"


def test_from_pretrained_refuses_unknown_arguments(tmp_path, pipe):
    make_embedding(pipe).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="subfolder"):
        GuidelineEmbedding.from_pretrained(tmp_path, subfolder="other")


def test_model_card_front_matter_is_valid_yaml(pipe):
    """Any base-model name makes a valid card; only a Hub model id becomes the card's `base_model`."""
    from huggingface_hub import ModelCard

    embedding = make_embedding(pipe)
    for name, expected in (
        ("my sd: v2 #final", None),
        ("CompVis/stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4"),
    ):
        card = GuidelineEmbedding(embedding.embeds, dataclasses.replace(embedding.metadata, base_model=name))
        assert ModelCard(card.model_card()).data.to_dict().get("base_model") == expected


def test_enable_dag_by_path_uses_saved_defaults(pipe, tmp_path):
    make_embedding(pipe).save_pretrained(tmp_path)
    pipe.enable_dag(str(tmp_path))
    assert pipe.dag_config.layer_fractions == (0.5,)
    assert pipe.dag_config.unsafe_threshold == 0.6 and pipe.dag_config.edit_mask_threshold == 0.02
    assert pipe.dag_config.base_scale == 40.0
    pipe.enable_dag(tmp_path, unsafe_threshold=0.4, base_scale=5)  # explicit options win
    assert pipe.dag_config.unsafe_threshold == 0.4 and pipe.dag_config.base_scale == 5

    def generate():  # past DAG's 5-step warm-up, so that the settings are used
        kwargs = {"num_inference_steps": 8, "output_type": "np", "safety_concept": "a red star"}
        return pipe("a red star", generator=torch.manual_seed(0), **kwargs)

    pipe.enable_dag(tmp_path, unsafe_threshold=0.4, base_scale=5, max_edit_area=1.0)  # guide this random embedding
    saved = generate()
    embeds = GuidelineEmbedding.from_pretrained(tmp_path).embeds
    explicit_options = {"unsafe_threshold": 0.4, "edit_mask_threshold": 0.02, "base_scale": 5, "max_edit_area": 1.0}
    pipe.enable_dag(embeds, layer_fractions=(0.5,), **explicit_options)
    explicit = generate()
    pipe.enable_dag(embeds, max_edit_area=1.0)  # the package defaults: other layers and thresholds
    defaults = generate()
    assert saved.unsafe_detected == explicit.unsafe_detected == [True]
    assert np.array_equal(saved.images, explicit.images)
    assert not np.array_equal(saved.images, defaults.images)


def test_erase_settings_are_defaults_under_the_embeddings_own_rule_only(pipe, tmp_path):
    """A calibrated embedding's erase settings come with its default rule; choosing another rule (the paper's)
    starts from DAGConfig's own defaults, the paper's method, and explicit options win either way."""
    from dag_safety.config import DAGConfig

    saved = make_embedding(
        pipe, detection="presence", presence_threshold=0.3, hold_detection=True, fill_region="basin",
        erase_mode="fill_final", components="basin", confirm_steps=3,
    )  # fmt: skip
    saved.save_pretrained(tmp_path)
    loaded = GuidelineEmbedding.from_pretrained(tmp_path).metadata

    def settings(item):
        return (item.hold_detection, item.fill_region, item.erase_mode, item.components, item.confirm_steps)

    assert settings(loaded) == (True, "basin", "fill_final", "basin", 3)
    paper = DAGConfig()
    paper_settings = settings(paper)
    assert (paper.components, paper.confirm_steps) == ("threshold", 1)
    cases = [
        ({}, (True, "basin", "fill_final", "basin", 3)),
        ({"detection": "presence"}, (True, "basin", "fill_final", "basin", 3)),
        ({"erase_mode": "fill"}, (True, "basin", "fill", "basin", 3)),
        ({"confirm_steps": 1}, (True, "basin", "fill_final", "basin", 1)),
        ({"detection": "paper"}, paper_settings),
        ({"detection": "paper", "fill_region": "basin"}, (paper.hold_detection, "basin", *paper_settings[2:])),
    ]
    for options, expected in cases:
        pipe.enable_dag(tmp_path, **options)
        config = pipe.dag_config
        assert settings(config) == expected, options
        assert config.detection == options.get("detection", "presence")

    def generate():  # past the warm-up, with a random embedding's map guided
        kwargs = {"num_inference_steps": 8, "output_type": "np", "safety_concept": "a red star"}
        return pipe("a red star", generator=torch.manual_seed(0), **kwargs).images

    pipe.enable_dag(tmp_path, detection="paper", max_edit_area=1.0)
    by_name = generate()
    thresholds = {"unsafe_threshold": 0.6, "edit_mask_threshold": 0.02, "base_scale": 40.0, "max_edit_area": 1.0}
    pipe.enable_dag(saved.embeds, layer_fractions=(0.5,), **thresholds)  # the paper's method, spelled out
    assert np.array_equal(by_name, generate())
    pipe.disable_dag()


def test_named_layers_travel_with_the_embedding_and_override_its_fractions(pipe, tmp_path):
    from dag_safety.attention import cross_attention_layers

    half = sorted(
        {name.split(".transformer_blocks")[0] for name, f in cross_attention_layers(pipe.unet).items() if f == 2}
    )
    make_embedding(pipe, layers=tuple(half), layer_fractions=(0.25,)).save_pretrained(tmp_path)
    loaded = GuidelineEmbedding.from_pretrained(tmp_path)
    assert loaded.metadata.layers == tuple(half)
    assert str(half) in (tmp_path / "README.md").read_text()

    def generate():
        kwargs = {"num_inference_steps": 8, "output_type": "np", "safety_concept": "a red star"}
        return pipe("a red star", generator=torch.manual_seed(0), **kwargs)

    options = {"unsafe_threshold": 0.4, "edit_mask_threshold": 0.02, "base_scale": 5, "max_edit_area": 1.0}
    pipe.enable_dag(tmp_path, **options)
    assert pipe.dag_config.layers == tuple(half)
    by_name = generate()
    pipe.enable_dag(loaded.embeds, layer_fractions=(0.5,), **options)  # the same layers, by fraction
    by_fraction = generate()
    pipe.enable_dag(loaded.embeds, layer_fractions=(0.25,), **options)  # the saved fractions: other layers
    quarter = generate()
    assert by_name.unsafe_detected == [True]
    assert np.array_equal(by_name.images, by_fraction.images)
    assert not np.array_equal(by_name.images, quarter.images)


def test_fingerprint_and_width_checks(pipe, tmp_path):
    other = make_embedding(pipe, base_model_fingerprint="ffffffffffffffff")
    with pytest.raises(ValueError, match="fingerprint ffffffffffffffff.*check_fingerprint=False"):
        pipe.enable_dag(other)
    pipe.enable_dag(other, check_fingerprint=False)
    wide = GuidelineEmbedding(torch.randn(3, 64), make_embedding(pipe).metadata)
    with pytest.raises(ValueError, match="width 64"):
        pipe.enable_dag(wide, check_fingerprint=False)


def test_never_unpickles_and_rejects_foreign_files(pipe, tmp_path):
    (tmp_path / "pickled").mkdir()
    torch.save({"x": torch.zeros(2)}, tmp_path / "pickled" / "guideline_embeds.bin")
    with pytest.raises(ValueError, match="has no guideline_embeds.safetensors"):
        GuidelineEmbedding.from_pretrained(tmp_path / "pickled")
    (tmp_path / "foreign").mkdir()
    save_file({"guideline_embeds": torch.zeros(3, 32)}, str(tmp_path / "foreign" / EMBEDDING_FILE))
    with pytest.raises(ValueError, match="not a dag-safety guideline embedding"):
        GuidelineEmbedding.from_pretrained(tmp_path / "foreign")


def test_fingerprint_ignores_dtype_but_not_weights(components):
    unet = components["unet"]
    reference = unet_fingerprint(unet)
    assert unet_fingerprint(unet.to(torch.float16)) == reference
    unet.to(torch.float32)
    _, parameter = next((n, p) for n, p in unet.named_parameters() if ".attn2.to_k." in n)
    with torch.no_grad():
        parameter.add_(0.1)
    assert unet_fingerprint(unet) != reference


def test_bfloat16_pipeline_and_a_saved_embedding(pipe, tmp_path):
    """bfloat16 rounding changes the fingerprint: the error says so and how to proceed; enabling DAG first and
    converting afterwards runs in bfloat16 with the checked embedding."""
    embedding = make_embedding(pipe)
    pipe.enable_dag(embedding, max_edit_area=1.0, warmup_steps=1)
    pipe.to(dtype=torch.bfloat16)
    output = pipe("a red star", num_inference_steps=3, generator=torch.manual_seed(0), output_type="latent")
    assert output.unsafe_detected == [True]
    assert output.images.dtype == torch.bfloat16 and torch.isfinite(output.images).all()
    with pytest.raises(ValueError, match="bfloat16.*before converting to bfloat16.*check_fingerprint=False"):
        pipe.enable_dag(embedding)


def test_saved_safety_concept_is_the_call_default(pipe, tmp_path):
    make_embedding(pipe).save_pretrained(tmp_path)
    pipe.enable_dag(tmp_path, max_edit_area=1.0, warmup_steps=0)
    seen = []
    encode = pipe.encode_prompt

    def spy(*args, **kwargs):  # the safety concepts are encoded without classifier-free guidance
        if kwargs.get("do_classifier_free_guidance") is False:
            seen.append(kwargs["prompt"])
        return encode(*args, **kwargs)

    pipe.encode_prompt = spy
    pipe("a red star", num_inference_steps=2, output_type="np")
    pipe("a red star", num_inference_steps=2, output_type="np", safety_concept="a star")
    pipe.enable_dag(torch.randn(3, pipe.unet.config.cross_attention_dim))  # no metadata: SLD's concept text
    pipe("a red star", num_inference_steps=2, output_type="np")
    assert seen == [["a red star"], ["a star"], [SLD_SAFETY_CONCEPT]]


def test_training_record_with_numpy_and_torch_numbers(pipe, tmp_path):
    import numpy as np

    embedding = make_embedding(pipe, training={"final": np.float32(0.25), "lr": torch.tensor(2.0), "ts": np.arange(2)})
    embedding.save_pretrained(tmp_path)
    assert GuidelineEmbedding.from_pretrained(tmp_path).metadata.training == {"final": 0.25, "lr": 2.0, "ts": [0, 1]}
