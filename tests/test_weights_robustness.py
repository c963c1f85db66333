"""Bad inputs to the safety-weights loaders (`dag_safety.weights`), from the bad-inputs review of 2026-11-29 (D1, D2b,
D3, D4c, D8g, D10): every refusal is a `ValueError` that names the file or option and the fix, and a load that fails,
whether in our checks or inside diffusers / peft, leaves the pipeline exactly as it was.

Run on the bundled mini model (loaded once for the module), with the LoRA fixtures of `tests/fixtures/mini/` and,
as the LoRA "made for another model", the tiny test model's `tests/fixtures/lora_circle_blue*`.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dag_safety.guideline_embedding import unet_fingerprint
from dag_safety.weights import read_safetensors_header

FIXTURES = Path(__file__).parent / "fixtures"
TINY_LORA_DIR = FIXTURES / "lora_circle_blue"
TINY_KOHYA = FIXTURES / "lora_circle_blue_kohya.safetensors"
MINI_LORA_DIR = FIXTURES / "mini" / "lora_circle_blue"
MINI_LORA_FILE = MINI_LORA_DIR / "pytorch_lora_weights.safetensors"
MINI_KOHYA = FIXTURES / "mini" / "lora_circle_blue_kohya.safetensors"
MINI_SPF = FIXTURES / "mini" / "spf_red_star_to_green_square.safetensors"
TO_V_B = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight"
Q_PROJ = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def mini(mini_pipe):
    return mini_pipe


@pytest.fixture(autouse=True)
def _clean(mini):
    yield
    mini.unload_safety_weights()
    if mini.get_list_adapters():
        mini.unload_lora_weights()


# ---------------------------------------------------------------------------------------------- fixture builders


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, path, metadata=metadata)
    return path


def mini_lora_copy(folder: Path, **changes: torch.Tensor) -> Path:
    """The mini LoRA (diffusers format, with its LoRA metadata) with some tensors replaced; returns the folder."""
    tensors = {**load_file(MINI_LORA_FILE), **changes}
    write(folder / "pytorch_lora_weights.safetensors", tensors, read_safetensors_header(MINI_LORA_FILE)[1])
    return folder


def mini_peft_adapter(folder: Path, **changes: torch.Tensor) -> Path:
    """The mini LoRA as a raw PEFT adapter (`base_model.model.` keys + adapter_config.json); returns the folder."""
    tensors = {"base_model.model." + k.removeprefix("unet."): v for k, v in load_file(MINI_LORA_FILE).items()}
    write(folder / "adapter_model.safetensors", {**tensors, **changes})
    metadata = json.loads(read_safetensors_header(MINI_LORA_FILE)[1]["lora_adapter_metadata"])
    config = {k.removeprefix("unet."): v for k, v in metadata.items()}
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    return folder


def with_text_encoder_lora(path: Path, rank: int = 4, width: int = 128) -> Path:
    """The mini LoRA plus a LoRA on the text encoder's first q_proj (`width` 128 fits the mini model), no metadata."""
    generator = torch.manual_seed(0)
    tensors = {
        **load_file(MINI_LORA_FILE),
        f"{Q_PROJ}.lora_A.weight": torch.randn(rank, width, generator=generator),
        f"{Q_PROJ}.lora_B.weight": torch.randn(128, rank, generator=generator),
    }
    return write(path, tensors)


# ---------------------------------------------------------------------------------------------- state checks


def state(pipe) -> dict:
    """Everything a LoRA load can change: module trees, state dicts, adapters, the guideline fingerprint."""
    return {
        "fingerprint": unet_fingerprint(pipe.unet),
        "modules": [name for model in (pipe.unet, pipe.text_encoder) for name, _ in model.named_modules()],
        "unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()},
        "text_encoder": {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()},
        "adapters": pipe.get_list_adapters(),
        "active": pipe.get_active_adapters(),
        "safety_weights": dict(pipe.safety_weights),
    }


def assert_unchanged(pipe, before: dict) -> None:
    after = state(pipe)
    for key in ("fingerprint", "modules", "adapters", "active", "safety_weights"):
        assert after[key] == before[key], key
    for model in ("unet", "text_encoder"):
        assert after[model].keys() == before[model].keys(), model
        assert all(torch.equal(after[model][k], before[model][k]) for k in before[model]), model


def assert_loads_and_unloads_cleanly(pipe, before: dict, source: Path = MINI_LORA_DIR) -> None:
    """After a failed load, a valid one still works and unloading it gives the state from before both."""
    pipe.load_safety_weights(source, adapter_name="valid")
    assert "valid" in pipe.get_list_adapters()["unet"]
    pipe.unload_safety_weights("valid")
    assert_unchanged(pipe, before)


# ---------------------------------------------------------------------------------------------- D1: atomic loads


class TestLoRAForAnotherModel:
    @pytest.mark.parametrize(
        "source, key",
        [(TINY_LORA_DIR, "unet.conv_in.lora_B.weight"), (TINY_KOHYA, "lora_unet_conv_in.lora_up.weight")],
    )
    def test_refused_before_peft_touches_the_unet(self, mini, source, key):
        before = state(mini)
        with pytest.raises(ValueError) as error:
            mini.load_safety_weights(source)
        message = str(error.value)
        assert f"{key!r} in '{source}" in message
        assert "has shape (8, 4, 1, 1)" in message and "weight of shape (32, 4, 3, 3)" in message
        assert "the file was made for another model" in message
        assert_unchanged(mini, before)
        assert not any(hasattr(module, "base_layer") for module in mini.unet.modules())
        assert_loads_and_unloads_cleanly(mini, before)

    def test_one_wrong_shaped_tensor_is_named(self, mini, tmp_path):
        before = state(mini)
        wrong = load_file(MINI_LORA_FILE)[TO_V_B][:, :2]
        source = mini_lora_copy(tmp_path, **{TO_V_B: wrong})
        expected = (
            r"has shape \(64, 2\), but .* weight of shape \(64, 128\) and takes a LoRA tensor of shape \(64, 4\)"
        )
        with pytest.raises(ValueError, match=rf"'{TO_V_B}' in '{re.escape(str(tmp_path))}.*' {expected}"):
            mini.load_safety_weights(source)
        assert_unchanged(mini, before)

    def test_text_encoder_keys_are_checked_too(self, mini, tmp_path):
        before = state(mini)
        source = with_text_encoder_lora(tmp_path / "te.safetensors", width=32)
        with pytest.raises(
            ValueError, match=rf"'{Q_PROJ}.lora_A.weight' .* has shape \(4, 32\), but the text encoder"
        ):
            mini.load_safety_weights(source)
        assert_unchanged(mini, before)

    def test_keys_naming_no_layer_are_refused(self, mini, tmp_path):
        before = state(mini)
        renamed = {k.replace("attn2.to_v", "attn2.to_z"): v for k, v in load_file(MINI_LORA_FILE).items()}
        source = write(tmp_path / "renamed.safetensors", renamed)
        with pytest.raises(
            ValueError, match=r"attn2.to_z.lora_A.weight' in .* names no layer of this pipeline's UNet"
        ):
            mini.load_safety_weights(source)
        assert_unchanged(mini, before)


class TestFailureInsidePeft:
    """Whatever goes wrong once peft has started injecting, its layers are taken out again, and the adapters loaded
    before keep theirs (peft's own failure leaves empty LoRA layers that rename the UNet's parameters)."""

    @staticmethod
    def fail_after_injecting(monkeypatch):
        import peft

        def fail(*args, **kwargs):
            raise RuntimeError("failed after injecting the LoRA layers")

        monkeypatch.setattr(peft, "set_peft_model_state_dict", fail)

    @pytest.mark.parametrize("source, user", [("diffusers", False), ("kohya", True), ("peft", True)])
    def test_the_unet_is_as_before(self, mini, tmp_path, monkeypatch, source, user):
        if (
            user
        ):  # an adapter of the user's own, on the attn2 layers only: it must survive, and the others be unwrapped
            attn2 = {k: v for k, v in load_file(MINI_LORA_FILE).items() if ".attn2." in k}
            mini.load_lora_weights(write(tmp_path / "user" / "attn2.safetensors", attn2), adapter_name="user")
            mini.set_adapters(["user"], [0.3])
        path = {"diffusers": MINI_LORA_DIR, "kohya": MINI_KOHYA, "peft": mini_peft_adapter(tmp_path)}[source]
        before = state(mini)
        self.fail_after_injecting(monkeypatch)
        with pytest.raises(RuntimeError, match="failed after injecting"):
            mini.load_safety_weights(path)
        assert_unchanged(mini, before)
        monkeypatch.undo()
        assert_loads_and_unloads_cleanly(mini, before, path)

    def test_unet_and_text_encoder_as_before_when_the_text_encoder_fails(self, mini, tmp_path, monkeypatch):
        import diffusers.loaders.lora_base

        def fail(*args, **kwargs):
            raise RuntimeError("text encoder failed")

        source = with_text_encoder_lora(tmp_path / "te.safetensors")
        before = state(mini)
        monkeypatch.setattr(diffusers.loaders.lora_base, "scale_lora_layers", fail)  # after both models got layers
        with pytest.raises(RuntimeError, match="text encoder failed"):
            mini.load_safety_weights(source)
        assert_unchanged(mini, before)
        monkeypatch.undo()
        mini.load_safety_weights(source)
        assert mini.get_list_adapters() == {"unet": ["focus_n_fix"], "text_encoder": ["focus_n_fix"]}
        mini.unload_safety_weights()
        assert_unchanged(mini, before)


# ---------------------------------------------------------------------------------------------- D8g: scale


def test_set_scale_refuses_what_load_refuses(mini):
    mini.load_safety_weights(MINI_LORA_DIR, scale=0.5)
    for scale in (float("nan"), float("inf"), -float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match=r"`scale` must be a finite number .*, got "):
            mini.set_safety_weights_scale("focus_n_fix", scale)
        with pytest.raises(ValueError, match=r"`scale` must be a finite number .*, got "):
            mini.load_safety_weights(MINI_LORA_DIR, adapter_name="second", scale=scale)
    assert mini.safety_weights["focus_n_fix"].scale == 0.5 and mini.get_list_adapters() == {"unet": ["focus_n_fix"]}


# ---------------------------------------------------------------------------------------------- D10: NaN / Inf


@pytest.mark.parametrize(
    "fmt, key, value",
    [
        ("diffusers", TO_V_B, float("nan")),
        ("kohya", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha", float("inf")),
        ("peft", "base_model.model." + TO_V_B.removeprefix("unet."), -float("inf")),
    ],
)
def test_lora_with_nan_or_inf_is_refused(mini, tmp_path, fmt, key, value):
    """Every tensor is checked, the kohya alphas included (SPF files: test_weights.py)."""
    if fmt == "kohya":
        tensors = load_file(MINI_KOHYA)
        path = write(tmp_path / "kohya.safetensors", {**tensors, key: torch.full_like(tensors[key], value)})
    else:
        bad = {key: torch.full_like(load_file(MINI_LORA_FILE)[TO_V_B], value)}
        path = mini_lora_copy(tmp_path, **bad) if fmt == "diffusers" else mini_peft_adapter(tmp_path, **bad)
    before = state(mini)
    with pytest.raises(ValueError, match=rf"'{re.escape(key)}' in '{re.escape(str(tmp_path))}.*' holds NaN or Inf"):
        mini.load_safety_weights(path)
    assert_unchanged(mini, before)


# ---------------------------------------------------------------------------------------------- D3, D2b: unreadable


class _Unpickled:
    def __reduce__(self):
        return (pytest.fail, ("the file was unpickled",))


@pytest.mark.parametrize(
    "case, kind",
    [
        ("empty", "auto"),
        ("random", "auto"),
        ("pickle", "auto"),
        ("truncated", "auto"),
        ("truncated", "focus-n-fix"),
        ("truncated", "spf"),
    ],
)
def test_unreadable_files_are_named(mini, tmp_path, case, kind):
    source = MINI_SPF if kind == "spf" else MINI_LORA_FILE
    content = {
        "empty": b"",
        "random": random.Random(0).randbytes(4096),
        "pickle": pickle.dumps(_Unpickled()),
        "truncated": source.read_bytes()[: source.stat().st_size // 2],
    }[case]
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(
        ValueError, match=rf"'{re.escape(str(path))}' is not a readable safetensors file .*Download it again"
    ):
        mini.load_safety_weights(path, kind=kind)
    assert mini.get_list_adapters() == {} and mini.safety_weights == {}


# ---------------------------------------------------------------------------------------------- D4c: same LoRA twice


@pytest.mark.parametrize("again", ["kohya", "peft"])
def test_the_same_lora_under_another_name_is_loaded_with_a_warning(mini, tmp_path, caplog, again):
    """Warned, not refused: stacking copies of one LoRA under several names is how `test_weights.py` checks that
    adapters add up (0.5 + 0.5 = 1), and a way to apply a LoRA above weight 1.0. Compared by content, across formats."""
    mini.load_safety_weights(MINI_LORA_DIR, scale=0.5)
    with caplog.at_level(logging.WARNING, logger="dag_safety.weights"):
        record = mini.load_safety_weights(
            MINI_KOHYA if again == "kohya" else mini_peft_adapter(tmp_path), adapter_name="again", scale=0.5
        )
    assert "holds the same LoRA tensors as the loaded adapter 'focus_n_fix'" in caplog.text
    assert "adapter_name='focus_n_fix', replace=True" in caplog.text
    assert record.detail.endswith("same tensors as adapter 'focus_n_fix'")


def test_another_lora_or_a_replace_is_not_a_copy(mini, tmp_path, caplog):
    mini.load_safety_weights(MINI_LORA_DIR, scale=0.5)
    other = {TO_V_B: load_file(MINI_LORA_FILE)[TO_V_B] * 0.5}  # one tensor differs
    with caplog.at_level(logging.WARNING, logger="dag_safety.weights"):
        record = mini.load_safety_weights(mini_lora_copy(tmp_path, **other), adapter_name="other")
        mini.load_safety_weights(MINI_LORA_DIR, replace=True)  # the same name: a replace, not a second copy
    assert "same LoRA tensors" not in caplog.text and "same tensors" not in record.detail


def test_a_damaged_peft_config_is_named(mini, tmp_path):
    """A PEFT adapter whose adapter_config.json is not JSON: an error naming the file, the pipeline as before."""
    folder = mini_peft_adapter(tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    before = state(mini)
    with pytest.raises(ValueError, match="adapter_config.json' is not a JSON object"):
        mini.load_safety_weights(folder)
    assert_unchanged(mini, before)
