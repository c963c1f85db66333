"""GuidelineEmbedding against bad input: names that are neither a directory nor a cached / existing Hub repo,
damaged files, malformed headers, and save_pretrained into a directory that holds something else."""

import dataclasses
import json
import os
import pickle
import re
from unittest import mock

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError
from safetensors import safe_open
from safetensors.torch import save_file
from test_embedding import make_embedding

from dag_safety import guideline_embedding as embedding_module
from dag_safety.guideline_embedding import _HEADER_TYPES, EMBEDDING_FILE, EmbeddingMetadata, GuidelineEmbedding


@pytest.fixture
def saved(pipe, tmp_path):
    """A saved embedding directory, and its tensor and header."""
    directory = tmp_path / "saved"
    make_embedding(pipe).save_pretrained(directory)
    with safe_open(directory / EMBEDDING_FILE, framework="pt") as handle:
        return directory, handle.get_tensor("guideline_embeds"), handle.metadata()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no local directory of any name used below


# 1. Names: a local directory, else a Hub repo id


@pytest.mark.parametrize("name", ["a/b/c", "emb/red/star", "no such dir"])
def test_invalid_names_say_no_directory_and_no_repo_id(name, pipe, offline_cache):
    expected = f"No local directory {name!r} exists, and {name!r} is not a valid Hub repo id"
    with pytest.raises(ValueError, match=re.escape(expected)):
        GuidelineEmbedding.from_pretrained(name)
    with pytest.raises(ValueError, match=re.escape(expected)):
        pipe.enable_dag(name)
    assert pipe.dag_config is None


@pytest.mark.parametrize("name", ["nope-embedding", "someone/nope"])
def test_repo_ids_missing_from_the_offline_cache(name, offline_cache):
    with pytest.raises(ValueError, match=f"No local directory {name!r} exists.*offline cache.*hf download {name}"):
        GuidelineEmbedding.from_pretrained(name)
    with pytest.raises(ValueError, match="local_files_only=True.*hf download"):
        GuidelineEmbedding.from_pretrained(name, local_files_only=True)


def test_missing_local_paths_and_files(saved, tmp_path):
    with pytest.raises(ValueError, match="No guideline embedding directory exists at .*check the path"):
        GuidelineEmbedding.from_pretrained(str(tmp_path / "nope"))
    file = saved[0] / EMBEDDING_FILE
    with pytest.raises(ValueError, match="is a file, not a directory; pass the directory"):
        GuidelineEmbedding.from_pretrained(file)


def _response():
    return mock.Mock(headers={}, request=None, status_code=404)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RepositoryNotFoundError("404", response=_response()), "the Hugging Face Hub has no repo 'org/nope'"),
        (RemoteEntryNotFoundError("404", response=_response()), f"has no {EMBEDDING_FILE}"),
    ],
)
def test_online_not_found_on_the_hub(error, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(embedding_module, "hf_hub_download", mock.Mock(side_effect=error))
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        GuidelineEmbedding.from_pretrained("org/nope")
    assert "local directory 'org/nope' exists" in str(info.value)


def test_online_connection_errors_stay_connection_errors(monkeypatch, tmp_path):
    """Hub unreachable and not cached: a ConnectionError saying so (what huggingface_hub raises then)."""
    monkeypatch.chdir(tmp_path)

    def unreachable(**kwargs):
        try:
            raise ConnectionError("[Errno 111] Connection refused")
        except ConnectionError as cause:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from cause

    monkeypatch.setattr(embedding_module, "hf_hub_download", unreachable)
    with pytest.raises(ConnectionError, match="Could not reach the Hugging Face Hub.*Connection refused"):
        GuidelineEmbedding.from_pretrained("org/red-star")


# 2. Damaged files


def _pickle(path):
    path.write_bytes(pickle.dumps({"guideline_embeds": [[0.0] * 4] * 3}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
        lambda path: path.write_bytes(path.read_bytes()[:5]),
        lambda path: path.write_bytes(b""),
        lambda path: path.write_bytes(os.urandom(256)),
        _pickle,
    ],
    ids=["half", "5-bytes", "empty", "random", "pickle"],
)
def test_damaged_files_name_the_file(damage, saved, pipe):
    directory = saved[0]
    damage(directory / EMBEDDING_FILE)
    expected = f"{directory / EMBEDDING_FILE} is not a readable safetensors file"
    with pytest.raises(ValueError, match=re.escape(expected)):
        GuidelineEmbedding.from_pretrained(directory)
    with pytest.raises(ValueError, match=re.escape(expected)):
        pipe.enable_dag(directory)


def test_nan_rows_name_the_file(saved):
    directory, embeds, header = saved
    save_file({"guideline_embeds": torch.full_like(embeds, float("nan"))}, str(directory / EMBEDDING_FILE), header)
    with pytest.raises(ValueError, match=re.escape(str(directory / EMBEDDING_FILE)) + ".*NaN"):
        GuidelineEmbedding.from_pretrained(directory)


# 3. Malformed headers: every field is read through one function, by its declared type


def _rewrite(saved, **changes):
    directory, embeds, header = saved
    header = {key: value for key, value in {**header, **changes}.items() if value is not None}
    save_file({"guideline_embeds": embeds}, str(directory / EMBEDDING_FILE), metadata=header)
    return directory


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("layer_fractions", "notjson", "a JSON list of finite numbers"),
        ("layer_fractions", "0.5", "a JSON list of finite numbers"),
        ("layer_fractions", "[]", "a JSON list of finite numbers"),
        ("layer_fractions", '["a"]', "a JSON list of finite numbers"),
        ("layers", '"up_blocks.1"', "'null' or a JSON list of layer names"),
        ("layers", "[]", "'null' or a JSON list of layer names"),
        ("layers", "[1]", "'null' or a JSON list of layer names"),
        ("unsafe_threshold", '"0.5"', "a finite number"),
        ("unsafe_threshold", "NaN", "a finite number"),
        ("base_scale", "null", "a finite number"),
        ("edit_mask_threshold", "true", "a finite number"),
        ("format_version", "abc", "a positive integer"),
        ("format_version", "0", "a positive integer"),
        ("format_version", "1.5", "a positive integer"),
        ("training", "[]", "a JSON object"),
        ("detection_quality", "notjson", "a JSON object"),
        ("final_loss", '"low"', "a number or 'null'"),
        ("confirm_steps", "0", "a positive integer"),
        ("confirm_steps", "2.5", "a positive integer"),
    ],
)
def test_malformed_header_values_name_file_field_and_expectation(field, raw, expected, saved):
    directory = _rewrite(saved, **{field: raw})
    pattern = f"{re.escape(str(directory / EMBEDDING_FILE))}: the header field {field!r} is {re.escape(repr(raw))}"
    with pytest.raises(ValueError, match=pattern + ".*expected " + re.escape(expected)):
        GuidelineEmbedding.from_pretrained(directory)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"erase_mode": "paint"}, "The metadata's 'erase_mode' is 'paint'; expected one of"),
        ({"fill_region": "far"}, "The metadata's 'fill_region' is 'far'; expected one of"),
        ({"detection": "oracle"}, "The metadata's 'detection' is 'oracle'; expected one of"),
        ({"erase_mode": "fill_final"}, "the paper's detection rule as the default with erase settings beyond"),
        ({"hold_detection": "true"}, "the paper's detection rule as the default with erase settings beyond"),
        ({"components": "blob"}, "The metadata's 'components' is 'blob'; expected one of"),
        ({"components": "basin"}, "the paper's detection rule as the default with erase settings beyond"),
        ({"confirm_steps": "2"}, "the paper's detection rule as the default with erase settings beyond"),
    ],
)
def test_default_rule_and_erase_settings_must_be_usable(changes, message, saved):
    directory = _rewrite(saved, **changes)
    with pytest.raises(ValueError, match=re.escape(str(directory / EMBEDDING_FILE)) + ".*" + re.escape(message)):
        GuidelineEmbedding.from_pretrained(directory)


def test_missing_required_header_fields(saved):
    directory = _rewrite(saved, concept=None, base_model=None, base_model_fingerprint=None)
    with pytest.raises(ValueError, match="the header lacks the required fields 'concept' \\(a string\\)") as info:
        GuidelineEmbedding.from_pretrained(directory)
    assert str(directory / EMBEDDING_FILE) in str(info.value)
    assert "'base_model' (a string), 'base_model_fingerprint' (a string)" in str(info.value)
    directory = _rewrite(saved, format_version=None)
    with pytest.raises(ValueError, match="lacks the required field 'format_version' \\(a positive integer"):
        GuidelineEmbedding.from_pretrained(directory)


def test_every_field_is_parsed_by_its_declared_type(saved):
    """No field of EmbeddingMetadata escapes the validating parser: each declared type has one, and a value that
    does not parse as it is refused naming the field."""
    fields = dataclasses.fields(EmbeddingMetadata)
    assert all(item.type in _HEADER_TYPES for item in fields)
    for item in fields:
        if item.type == "str":
            continue
        directory = _rewrite(saved, **{item.name: '"a string"' if item.type != "dict" else "[1]"})
        with pytest.raises(ValueError, match=f"the header field {item.name!r}"):
            GuidelineEmbedding.from_pretrained(directory)


def test_newer_formats_and_unknown_fields(saved):
    assert GuidelineEmbedding.from_pretrained(_rewrite(saved, added_later="x")).metadata.concept == "red star"
    with pytest.raises(ValueError, match="format 2; this dag-safety reads up to 1"):
        GuidelineEmbedding.from_pretrained(_rewrite(saved, format_version="2"))


# 4. save_pretrained: only a guideline embedding is replaced without overwrite=True


@pytest.mark.parametrize(
    "files",
    [
        {"model_index.json": "{}", "README.md": "---\nlicense: mit\n---\n# A model\n"},
        {"unet.safetensors": ""},
        {"pytorch_model.bin": ""},
        {"README.md": "# my notes\n"},
        {"config.json": '{"_class_name": "UNet2DConditionModel"}'},
        {"notes.txt": "keep me"},
    ],
    ids=["model", "weights", "bin", "readme", "config", "other"],
)
def test_save_refuses_other_content_unless_overwrite(files, pipe, tmp_path):
    embedding = make_embedding(pipe)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="not a dag-safety guideline embedding.*overwrite=True"):
        embedding.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_text() for name in files} == files
    assert not (tmp_path / EMBEDDING_FILE).exists()
    embedding.save_pretrained(tmp_path, overwrite=True)
    assert GuidelineEmbedding.from_pretrained(tmp_path).metadata == embedding.metadata
    for name in set(files) - {"README.md", "config.json"}:
        assert (tmp_path / name).read_text() == files[name]  # the rest is left as is


def test_save_replaces_a_guideline_embedding_and_ignores_hidden_entries(pipe, tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    make_embedding(pipe).save_pretrained(tmp_path)
    second = make_embedding(pipe, concept="blue circle")
    second.save_pretrained(tmp_path)  # re-saving an embedding in place needs no overwrite
    assert GuidelineEmbedding.from_pretrained(tmp_path).metadata.concept == "blue circle"
    assert json.loads((tmp_path / "config.json").read_text())["concept"] == "blue circle"
    with pytest.raises(ValueError, match="is a file, not a directory"):
        second.save_pretrained(tmp_path / "config.json", overwrite=True)


def test_push_to_hub_still_works(pipe, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return mock.Mock(repo_id=repo_id)

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploaded[repo_id] = sorted(os.listdir(folder_path))
            return f"https://huggingface.co/{repo_id}/commit/1"

    import huggingface_hub.hub_mixin

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    assert make_embedding(pipe).push_to_hub("me/red-star") == "https://huggingface.co/me/red-star/commit/1"
    assert uploaded == {"me/red-star": ["README.md", "config.json", EMBEDDING_FILE]}
