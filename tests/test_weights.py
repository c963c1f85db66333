"""Safety weights (`dag_safety.weights`): Focus-N-Fix LoRA adapters and SPF `attn2` weights on the tiny seeded
pipeline, with the committed fixtures trained on exactly these components (`examples/train_fixture_*.py --tiny`):

- `fixtures/lora_circle_blue/` (diffusers/PEFT format) and `fixtures/lora_circle_blue_kohya.safetensors` (the same
  LoRA in kohya keys): "circle" prompts trained toward a solid blue canvas (with this untrained VAE, the effect is
  measured on the latents: they move toward the latent of that canvas).
- `fixtures/spf_red_star_to_green_square.safetensors`: `attn2`-only fine-tune redirecting "a red star" to what the
  base model makes of "a green square", other prompts preserved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dag_safety.weights import LoadedSafetyWeights, SafetyWeightsKind, lora_to_kohya

FIXTURES = Path(__file__).parent / "fixtures"
LORA_DIR = FIXTURES / "lora_circle_blue"
LORA_FILE = LORA_DIR / "pytorch_lora_weights.safetensors"
LORA_KOHYA = FIXTURES / "lora_circle_blue_kohya.safetensors"
LORA_TARGET_RGB = (40, 80, 220)
SPF_FILE = FIXTURES / "spf_red_star_to_green_square.safetensors"
KEY = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def latents(pipe, prompt="a red circle", steps=4, **kwargs) -> torch.Tensor:
    generator = torch.manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs).images


def images(pipe, prompt="a red circle", steps=2, **kwargs) -> torch.Tensor:
    return pipe(prompt, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="pt", **kwargs).images


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def assert_state_equal(pipe, reference: dict[str, torch.Tensor]) -> None:
    state = pipe.unet.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


@torch.no_grad()
def blue_latent(pipe) -> torch.Tensor:
    """The latent the LoRA was trained toward: the VAE's scaled mean latent of a solid blue canvas, `(1, 4, 16, 16)`."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    canvas = torch.tensor(LORA_TARGET_RGB, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size) / 127.5 - 1
    return pipe.vae.encode(canvas).latent_dist.mean * pipe.vae.config.scaling_factor


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TestLoRA:
    def test_moves_output_toward_the_trained_colour_in_proportion_to_scale(self, pipe):
        target = blue_latent(pipe)
        base = latents(pipe)
        distances = [rms(base, target)]
        for scale in (0.5, 1.0):
            record = pipe.load_safety_weights(LORA_DIR, scale=scale, replace=True)
            distances.append(rms(latents(pipe), target))
        assert record == LoadedSafetyWeights(
            "focus_n_fix", SafetyWeightsKind.FOCUS_N_FIX, str(LORA_FILE), 1.0, record.detail
        )
        assert distances[2] < distances[1] < distances[0]
        assert distances[2] < 0.3 * distances[0]  # trained: ~4.5 -> ~0.7

    def test_scale_zero_is_the_base_output_and_unload_is_bit_identical(self, pipe):
        base, base_images, state = latents(pipe), images(pipe), unet_state(pipe)
        pipe.load_safety_weights(LORA_DIR, scale=0.0)
        assert torch.equal(latents(pipe), base)
        pipe.set_safety_weights_scale("focus_n_fix", 1.0)
        assert not torch.allclose(latents(pipe), base)
        pipe.unload_safety_weights()
        assert torch.equal(latents(pipe), base) and torch.equal(images(pipe), base_images)
        assert_state_equal(pipe, state)
        assert pipe.get_list_adapters() == {} and pipe.safety_weights == {}
        assert not any(hasattr(m, "base_layer") for m in pipe.unet.modules())

    def test_diffusers_kohya_and_peft_formats_agree(self, pipe, tmp_path):
        # A raw PEFT adapter (`PeftModel.save_pretrained`): base_model.model.<module> keys + adapter_config.json.
        metadata = json.loads(load_file_metadata(LORA_FILE)["lora_adapter_metadata"])
        peft_dir = tmp_path / "peft"
        peft_dir.mkdir()
        peft_state = {"base_model.model." + k.removeprefix("unet."): v for k, v in load_file(LORA_FILE).items()}
        save_file(peft_state, peft_dir / "adapter_model.safetensors")
        config = {k.removeprefix("unet."): v for k, v in metadata.items()}
        (peft_dir / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))

        outputs, details = [], []
        for source in (LORA_DIR, LORA_FILE, LORA_KOHYA, peft_dir):
            details.append(pipe.load_safety_weights(source, scale=0.7, replace=True).detail)
            outputs.append(latents(pipe))
        assert "diffusers keys" in details[0] and "kohya keys" in details[2] and "raw PEFT" in details[3]
        for output in outputs[1:]:
            torch.testing.assert_close(output, outputs[0], rtol=0, atol=1e-5)

    def test_kohya_conversion_keys(self):
        state = load_file(LORA_FILE)
        kohya = lora_to_kohya(state, 4.0)
        module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        original = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
        assert torch.equal(kohya[f"{module}.lora_down.weight"], state[f"{original}.lora_A.weight"])
        assert torch.equal(kohya[f"{module}.lora_up.weight"], state[f"{original}.lora_B.weight"])
        assert kohya[f"{module}.alpha"].item() == 4.0
        assert len(kohya) == len(state) // 2 * 3
        assert kohya.keys() == load_file(LORA_KOHYA).keys()
        with pytest.raises(ValueError, match="'unet.conv_in.weight'"):
            lora_to_kohya({"unet.conv_in.weight": torch.zeros(1)}, 4.0)

    def test_several_adapters_add_up_and_unload_one_by_one(self, pipe):
        base = latents(pipe)
        pipe.load_safety_weights(LORA_DIR, scale=0.5, adapter_name="first")
        half = latents(pipe)
        pipe.load_safety_weights(LORA_KOHYA, scale=0.5, adapter_name="second")
        both = latents(pipe)
        assert set(pipe.get_active_adapters()) == {"first", "second"}
        pipe.load_safety_weights(LORA_DIR, scale=1.0, adapter_name="full")
        pipe.set_safety_weights_scale("first", 0.0)
        pipe.set_safety_weights_scale("second", 0.0)
        full = latents(pipe)
        torch.testing.assert_close(both, full, rtol=0, atol=1e-4)  # 0.5 Δ + 0.5 Δ = Δ
        pipe.unload_safety_weights("full")
        pipe.set_safety_weights_scale("first", 0.5)
        pipe.unload_safety_weights("second")
        assert torch.equal(latents(pipe), half)
        assert list(pipe.safety_weights) == ["first"]
        pipe.unload_safety_weights("first")
        assert torch.equal(latents(pipe), base)

    def test_fusing_refuses_to_silence_other_active_adapters(self, pipe):
        pipe.load_lora_weights(LORA_DIR, adapter_name="user")  # the user's own adapter, active
        pipe.load_safety_weights(LORA_KOHYA, scale=0.8)
        assert set(pipe.get_active_adapters()) == {"user", "focus_n_fix"}
        with pytest.raises(ValueError, match=r"Other LoRA adapters \['user'\] are active"):
            pipe.fuse_safety_weights()
        pipe.set_adapters(["focus_n_fix"], [0.8])
        pipe.fuse_safety_weights()

    def test_fuse_then_unfuse_and_unload_restore_exactly(self, pipe):
        base, state = latents(pipe), unet_state(pipe)
        pipe.load_safety_weights(LORA_DIR, scale=0.8)
        unfused = latents(pipe)
        pipe.fuse_safety_weights()
        torch.testing.assert_close(latents(pipe), unfused, rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="fused"):
            pipe.load_safety_weights(LORA_KOHYA, adapter_name="second")
        pipe.unfuse_safety_weights()
        assert torch.equal(latents(pipe), unfused)
        pipe.fuse_safety_weights()
        with pytest.raises(ValueError, match=r"are already fused"):
            pipe.fuse_safety_weights()
        pipe.unload_safety_weights()  # unfuses first
        assert torch.equal(latents(pipe), base)
        assert_state_equal(pipe, state)

    def test_loading_twice_is_an_error_or_a_replace(self, pipe):
        pipe.load_safety_weights(LORA_DIR, scale=0.5)
        half = latents(pipe)
        with pytest.raises(ValueError, match="'focus_n_fix' is already loaded"):
            pipe.load_safety_weights(LORA_DIR)
        pipe.load_safety_weights(LORA_DIR, scale=1.0, replace=True)
        pipe.load_safety_weights(LORA_DIR, scale=0.5, replace=True)
        assert torch.equal(latents(pipe), half)
        assert pipe.get_list_adapters() == {"unet": ["focus_n_fix"]}

    def test_a_failed_replace_keeps_the_loaded_adapter(self, pipe, tmp_path):
        pipe.load_safety_weights(LORA_DIR, scale=0.5)
        half = latents(pipe)
        state = load_file(LORA_FILE)
        # shapes that cannot load
        broken = {k: v[..., :1].contiguous() if "lora_A" in k else v for k, v in state.items()}
        save_file(broken, tmp_path / "pytorch_lora_weights.safetensors")
        with pytest.raises(Exception):  # noqa: B017  # whatever peft/diffusers raise on a shape mismatch; the rollback is tested
            pipe.load_safety_weights(tmp_path, replace=True)
        assert set(pipe.safety_weights) == {"focus_n_fix"} and pipe.safety_weights["focus_n_fix"].scale == 0.5
        assert torch.equal(latents(pipe), half)

    def test_bad_adapter_names_and_adapters_removed_behind_our_back(self, pipe):
        for name in ("half", "my.lora", "train"):
            with pytest.raises(ValueError, match=f"`adapter_name={name!r}` cannot name a peft adapter"):
                pipe.load_safety_weights(LORA_DIR, adapter_name=name)
        assert pipe.get_list_adapters() == {}
        base = latents(pipe)
        pipe.load_safety_weights(LORA_DIR)
        pipe.unload_lora_weights()  # diffusers' own unload, not ours
        assert pipe.safety_weights == {}
        pipe.load_safety_weights(LORA_DIR, scale=0.0)
        assert torch.equal(latents(pipe), base)

    def test_other_adapters_are_left_alone(self, pipe):
        pipe.load_lora_weights(str(LORA_DIR), adapter_name="user")
        user = latents(pipe)
        pipe.load_safety_weights(LORA_KOHYA, scale=0.3)
        assert set(pipe.get_active_adapters()) == {"user", "focus_n_fix"}
        pipe.unload_safety_weights()
        assert pipe.get_list_adapters() == {"unet": ["user"]}
        assert torch.equal(latents(pipe), user)
        pipe.fuse_lora(adapter_names=["user"])
        for source in (LORA_KOHYA, SPF_FILE):
            with pytest.raises(ValueError, match=r"\['user'\] are fused; call `pipe.unfuse_lora\(\)` first"):
                pipe.load_safety_weights(source)


def load_file_metadata(path) -> dict[str, str]:
    from dag_safety.weights import read_safetensors_header

    return read_safetensors_header(path)[1]


def write_spf(path: Path, state: dict[str, torch.Tensor], fmt: str | None = "full") -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=None if fmt is None else {"format": fmt})
    return path


class TestSPF:
    def test_redirects_the_trained_prompt_in_proportion_to_scale(self, pipe):
        star, square, circle = (images(pipe, p) for p in ("a red star", "a green square", "a blue circle"))
        before = rms(star, square)
        distances = []
        for scale in (0.5, 1.0):
            record = pipe.load_safety_weights(SPF_FILE, kind="spf", scale=scale, replace=True)
            distances.append(rms(images(pipe, "a red star"), square))
        assert record.kind is SafetyWeightsKind.SPF and record.name == "spf" and "full weights, 35" in record.detail
        assert distances[1] < distances[0] < before
        assert distances[1] < 0.3 * before  # trained: ~0.027 -> ~0.004
        assert rms(images(pipe, "a blue circle"), circle) < 0.3 * before  # other prompts mostly preserved

    def test_full_weights_scale_one_and_zero_and_exact_unload(self, pipe):
        base, state = images(pipe, "a red star"), unet_state(pipe)
        trained = load_file(SPF_FILE)
        pipe.load_safety_weights(SPF_FILE)
        current = pipe.unet.state_dict()
        assert all(torch.equal(current[k], v) for k, v in trained.items())  # scale 1: exactly the trained W
        assert not torch.equal(images(pipe, "a red star"), base)
        pipe.unload_safety_weights("spf")
        assert torch.equal(images(pipe, "a red star"), base)
        assert_state_equal(pipe, state)
        pipe.load_safety_weights(SPF_FILE, scale=0.0)
        assert_state_equal(pipe, state)
        assert torch.equal(images(pipe, "a red star"), base)

    def test_delta_matches_full(self, pipe, tmp_path):
        base_state = pipe.unet.state_dict()
        delta = {k: v - base_state[k] for k, v in load_file(SPF_FILE).items()}
        delta_file = write_spf(tmp_path / "delta.safetensors", delta, "delta")
        pipe.load_safety_weights(SPF_FILE, scale=0.5)
        full = images(pipe, "a red star")
        record = pipe.load_safety_weights(delta_file, scale=0.5, replace=True)
        assert "delta weights" in record.detail and "metadata format='delta'" in record.detail
        torch.testing.assert_close(images(pipe, "a red star"), full, rtol=0, atol=1e-5)

    def test_replace_restores_before_applying(self, pipe):
        pipe.load_safety_weights(SPF_FILE, scale=0.5)
        half = images(pipe, "a red star")
        with pytest.raises(ValueError, match="already loaded.*replace=True"):
            pipe.load_safety_weights(SPF_FILE, scale=0.5)
        pipe.load_safety_weights(SPF_FILE, scale=1.0, replace=True)
        pipe.load_safety_weights(SPF_FILE, scale=0.5, replace=True)
        assert torch.equal(images(pipe, "a red star"), half)

    def test_dtype_follows_the_unet(self, pipe):
        pipe.unet.to(torch.float16)
        state = unet_state(pipe)
        pipe.load_safety_weights(SPF_FILE)
        assert pipe.unet.get_parameter(KEY).dtype == torch.float16
        torch.testing.assert_close(pipe.unet.get_parameter(KEY), load_file(SPF_FILE)[KEY].half())
        pipe.unload_safety_weights()
        assert_state_equal(pipe, state)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_device_and_dtype_follow_the_unet_on_gpu(self, pipe):
        pipe.to(device="cuda", dtype=torch.float16)
        state = unet_state(pipe)
        pipe.load_safety_weights(SPF_FILE, scale=0.5)
        param = pipe.unet.get_parameter(KEY)
        assert param.device.type == "cuda" and param.dtype == torch.float16
        pipe.load_safety_weights(LORA_DIR, scale=0.5)
        pipe.fuse_safety_weights()
        pipe.unload_safety_weights()
        assert_state_equal(pipe, state)

    def test_with_a_lora_on_the_same_layers(self, pipe):
        base, state = images(pipe, "a red star"), unet_state(pipe)
        pipe.load_safety_weights(LORA_DIR, scale=0.5)
        lora = images(pipe, "a red star")
        pipe.load_safety_weights(SPF_FILE)  # written into the LoRA layers' base weights
        assert not torch.equal(images(pipe, "a red star"), lora)
        pipe.unload_safety_weights("spf")
        assert torch.equal(images(pipe, "a red star"), lora)
        pipe.load_safety_weights(SPF_FILE, scale=0.5)
        pipe.unload_safety_weights()
        assert torch.equal(images(pipe, "a red star"), base)
        assert_state_equal(pipe, state)

    @pytest.mark.parametrize(
        "case, match",
        [
            ("unknown_key", r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_z\.weight' is not a"),
            ("wrong_shape", r"to_k\.weight' has shape \(8, 32\), the UNet's parameter has \(16, 32\)"),
            ("non_attn2", r"'conv_in\.weight' is not one\. Pass `allow_non_attn2=True`"),
            ("nan", r"holds NaN or Inf"),
            ("bad_format", r"Unknown SPF format='patch'"),
        ],
    )
    def test_validation_errors_leave_the_unet_untouched(self, pipe, tmp_path, case, match):
        state = unet_state(pipe)
        good = {KEY: state[KEY] + 0.1}
        bad = {
            "unknown_key": {**good, KEY.replace("to_k", "to_z"): state[KEY]},
            "wrong_shape": {KEY: torch.zeros(8, 32)},
            "non_attn2": {**good, "conv_in.weight": state["conv_in.weight"]},
            "nan": {KEY: torch.full_like(state[KEY], float("nan"))},
            "bad_format": good,
        }[case]
        path = write_spf(tmp_path / "bad.safetensors", bad, "patch" if case == "bad_format" else "full")
        with pytest.raises(ValueError, match=match):
            pipe.load_safety_weights(path, kind="spf")
        assert_state_equal(pipe, state)
        assert pipe.safety_weights == {}

    @pytest.mark.parametrize("fmt", ["full", "pt", None])
    def test_unet_prefixed_keys_and_framework_format_read_as_full(self, pipe, tmp_path, fmt):
        prefixed = {f"unet.{k}": v for k, v in load_file(SPF_FILE).items()}
        record = pipe.load_safety_weights(write_spf(tmp_path / "p.safetensors", prefixed, fmt), kind="spf")
        assert torch.equal(pipe.unet.get_parameter(KEY), load_file(SPF_FILE)[KEY]) and "full weights" in record.detail

    def test_non_attn2_keys_when_allowed(self, pipe, tmp_path):
        state = unet_state(pipe)
        path = write_spf(tmp_path / "w.safetensors", {"conv_in.bias": state["conv_in.bias"] + 1.0})
        pipe.load_safety_weights(path, kind="spf", allow_non_attn2=True)
        assert torch.equal(pipe.unet.conv_in.bias, state["conv_in.bias"] + 1.0)
        pipe.unload_safety_weights()
        assert_state_equal(pipe, state)


class TestFilesAndKinds:
    @pytest.mark.parametrize(
        "source, kind, why",
        [
            (LORA_DIR, SafetyWeightsKind.FOCUS_N_FIX, "keys contain 'lora'"),
            (LORA_KOHYA, SafetyWeightsKind.FOCUS_N_FIX, "keys contain 'lora'"),
            (SPF_FILE, SafetyWeightsKind.SPF, "metadata format='full'"),
        ],
    )
    def test_auto_says_what_it_decided(self, pipe, source, kind, why, caplog):
        import diffusers

        diffusers.utils.logging.set_verbosity_info()
        try:
            record = pipe.load_safety_weights(source)
        finally:
            diffusers.utils.logging.set_verbosity_warning()
        assert record.kind is kind and why in record.detail

    def test_auto_without_metadata_and_undecidable(self, pipe, tmp_path):
        weight = pipe.unet.get_parameter(KEY).detach()
        record = pipe.load_safety_weights(write_spf(tmp_path / "a.safetensors", {KEY: weight}, None))
        assert record.kind is SafetyWeightsKind.SPF and "all 1 keys are attn2" in record.detail
        path = write_spf(tmp_path / "b.safetensors", {"conv_in.bias": torch.zeros(8)}, None)
        with pytest.raises(ValueError, match="Cannot tell.*'conv_in.bias'.*kind='spf'"):
            pipe.load_safety_weights(path)
        with pytest.raises(ValueError, match="Unknown `kind='lora'`"):
            pipe.load_safety_weights(SPF_FILE, kind="lora")
        with pytest.raises(ValueError, match=r"holds no LoRA keys .*first key 'down_blocks.*kind='spf'"):
            pipe.load_safety_weights(SPF_FILE, kind="focus-n-fix")
        with pytest.raises(ValueError, match=r"'unet.conv_in.lora_A.weight' is not one"):
            pipe.load_safety_weights(LORA_DIR, kind="spf", replace=True)

    def test_pickles_are_refused_never_unpickled(self, pipe, tmp_path):
        class Boom:
            def __reduce__(self):
                return (pytest.fail, ("unpickled",))

        import pickle

        (tmp_path / "weights.bin").write_bytes(pickle.dumps(Boom()))
        with pytest.raises(ValueError, match="weights.bin' is a pickled checkpoint"):
            pipe.load_safety_weights(tmp_path / "weights.bin")
        with pytest.raises(ValueError, match="pickled checkpoint"):
            pipe.load_safety_weights(tmp_path)  # a directory with only a .bin
        with pytest.raises(ValueError, match="pickled checkpoint"):
            pipe.load_safety_weights(tmp_path, weight_name="weights.bin")

    def test_missing_and_ambiguous_files(self, pipe, tmp_path):
        with pytest.raises(ValueError, match="neither an existing file or directory nor a Hub repo id"):
            pipe.load_safety_weights(tmp_path / "missing.safetensors")
        shutil.copy(SPF_FILE, tmp_path / "one.safetensors")
        shutil.copy(SPF_FILE, tmp_path / "two.safetensors")
        with pytest.raises(ValueError, match=r"several safetensors files \['one.safetensors', 'two.safetensors'\]"):
            pipe.load_safety_weights(tmp_path)
        assert pipe.load_safety_weights(tmp_path, weight_name="two.safetensors").kind is SafetyWeightsKind.SPF
        with pytest.raises(ValueError, match="No safety weights named 'nope'"):
            pipe.unload_safety_weights("nope")

    def test_hub_peft_adapter_brings_its_config(self, pipe, tmp_path, monkeypatch):
        """From the Hub only the asked-for file is downloaded: a raw PEFT adapter's `adapter_config.json` (its
        `lora_alpha`) must be asked for too, or the adapter would load at the wrong strength."""
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError

        metadata = json.loads(load_file_metadata(LORA_FILE)["lora_adapter_metadata"])
        repo = tmp_path / "remote"
        repo.mkdir()
        save_file(
            {"base_model.model." + k.removeprefix("unet."): v for k, v in load_file(LORA_FILE).items()},
            repo / "adapter_model.safetensors",
        )
        config = {k.removeprefix("unet."): v for k, v in metadata.items()}
        (repo / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
        snapshot, calls = tmp_path / "snapshot", []
        snapshot.mkdir()

        def download(repo_id, filename, **kwargs):
            calls.append(filename)
            if not (repo / filename).is_file():
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            return shutil.copy(repo / filename, snapshot / filename)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        pipe.load_safety_weights(repo, scale=0.7)
        reference = latents(pipe)
        pipe.unload_safety_weights()
        pipe.load_safety_weights("someone/peft-adapter", scale=0.7)
        assert calls == ["pytorch_lora_weights.safetensors", "adapter_model.safetensors", "adapter_config.json"]
        torch.testing.assert_close(latents(pipe), reference, rtol=0, atol=0)

    def test_hub_connection_failure_is_an_error_not_the_next_file(self, pipe, monkeypatch):
        """Online, a file that cannot be fetched (no connection) must not make the loader try the next file name,
        which could be another kind of weights."""
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError

        calls = []

        def download(repo_id, filename, **kwargs):
            calls.append(filename)
            raise LocalEntryNotFoundError("Connection error, and the file is not in the cache.")

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(LocalEntryNotFoundError, match="Connection error"):
            pipe.load_safety_weights("someone/focus-n-fix-lora")
        assert calls == ["pytorch_lora_weights.safetensors"]

    def test_hub_repo_id_not_cached_offline(self, pipe, tmp_path):
        with pytest.raises(ValueError, match=r"local cache \(offline\) holds none of"):
            pipe.load_safety_weights("someone/not-cached", cache_dir=tmp_path, local_files_only=True)

    def test_hub_repo_id_offline(self, pipe, tmp_path):
        """A repo id goes through `hf_hub_download` with the hub kwargs; here a pre-filled cache, offline."""
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo = tmp_path / "models--someone--focus-n-fix-lora"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        shutil.copy(LORA_FILE, repo / "snapshots" / commit / "pytorch_lora_weights.safetensors")
        base = latents(pipe)
        record = pipe.load_safety_weights("someone/focus-n-fix-lora", cache_dir=tmp_path, local_files_only=True)
        assert record.path.startswith(str(repo)) and record.kind is SafetyWeightsKind.FOCUS_N_FIX
        assert not torch.equal(latents(pipe), base)
        pipe.unload_safety_weights()
        assert torch.equal(latents(pipe), base)


def test_mixin_on_a_plain_stable_diffusion_pipeline(components):
    from diffusers import StableDiffusionPipeline

    from dag_safety.weights import SafetyWeightsMixin

    class _Pipe(SafetyWeightsMixin, StableDiffusionPipeline):
        pass

    pipe = _Pipe(**components)
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe, "a red star")
    pipe.load_safety_weights(LORA_KOHYA, scale=0.5)
    pipe.load_safety_weights(SPF_FILE)
    assert set(pipe.safety_weights) == {"focus_n_fix", "spf"}
    assert not torch.equal(images(pipe, "a red star"), base)
    pipe.unload_safety_weights()
    assert torch.equal(images(pipe, "a red star"), base)


class TestWithDAG:
    @pytest.fixture
    def star_embedding(self, components):
        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        ids = tokenizer("red star", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            return encoder(ids.input_ids)[0][0, :3]

    def test_detection_keeps_the_projections_of_enable_dag(self, pipe, star_embedding):
        """SPF weights change attn2 `to_q` / `to_k` of the detection layers; for the same captured hidden states,
        the map is unchanged until DAG is enabled again (which snapshots the new projections)."""
        pipe.enable_dag(star_embedding)
        captured = {}

        state = pipe._dag

        def detect(latent_size, normalize=True):  # keeps the hidden states the detection layers saw
            captured.update(state.capture.store.queries)
            return type(state).detect(state, latent_size, normalize)

        state.detect = detect
        noisy = torch.randn((1, 4, 16, 16), generator=torch.manual_seed(0))
        before = pipe.dag_map(noisy, 500, prompt="a red star and a blue circle")
        del state.detect
        assert captured and before.shape == (1, 16, 16)

        def detect_again():
            pipe._dag.capture.store.queries = dict(captured)
            return pipe._dag.detect((16, 16))

        assert torch.equal(detect_again(), before)
        pipe.load_safety_weights(SPF_FILE)
        changed = load_file(SPF_FILE)
        layers = [name.removesuffix(".processor") for name in pipe._dag.projections]
        assert all(f"{name}.to_q.weight" in changed and f"{name}.to_k.weight" in changed for name in layers)
        assert torch.equal(detect_again(), before)
        pipe.enable_dag(star_embedding)  # a new snapshot, of the loaded weights
        assert not torch.allclose(detect_again(), before)

    @pytest.mark.parametrize("source", [LORA_DIR, SPF_FILE])
    def test_dag_with_weights_then_unload_is_dag_alone(self, pipe, star_embedding, source):
        prompt = "a red star and a blue circle on a white background"
        plain = images(pipe, prompt, steps=4)
        pipe.enable_dag(star_embedding, max_edit_area=1.0, warmup_steps=1)
        dag = pipe(
            prompt,
            num_inference_steps=4,
            generator=torch.manual_seed(0),
            output_type="pt",
            safety_concept="a red star",
            return_dag_maps=True,
        )
        assert not torch.equal(dag.images, plain)
        pipe.load_safety_weights(source)
        both = pipe(
            prompt,
            num_inference_steps=4,
            generator=torch.manual_seed(0),
            output_type="pt",
            safety_concept="a red star",
            return_dag_maps=True,
        )
        assert both.unsafe_detected is not None and both.dag_maps.shape == (1, 16, 16)
        assert not torch.equal(both.images, dag.images)
        pipe.unload_safety_weights()
        again = pipe(
            prompt,
            num_inference_steps=4,
            generator=torch.manual_seed(0),
            output_type="pt",
            safety_concept="a red star",
        )
        assert torch.equal(again.images, dag.images)
