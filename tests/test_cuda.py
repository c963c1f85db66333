"""The pipeline on a CUDA device, with the bundled mini model: the invariants hold there too.

Skipped without a CUDA device (CI has none). Run on a GPU machine with `python -m pytest -q tests/test_cuda.py`.
"""

import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.embeddings import RED_STAR
from dag_safety.mini import MODEL_PATH, detect
from dag_safety.optimize import encode_init_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TARGET = "a red star and a blue circle on a white background"
CONCEPT = "a red star"
STEPS = 25


@pytest.fixture
def pipe():
    p = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, **kwargs):
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    return pipe([TARGET] * 4, num_inference_steps=STEPS, generator=generators, output_type="np", **kwargs)


def plain_peer(pipe) -> StableDiffusionPipeline:
    peer = StableDiffusionPipeline(**pipe.components)
    peer.set_progress_bar_config(disable=True)
    return peer


def test_disabled_is_bit_identical_to_stable_diffusion(pipe):
    pipe.to("cuda")
    reference = run(plain_peer(pipe)).images
    pipe.enable_dag(RED_STAR)
    pipe.disable_dag()
    assert np.array_equal(run(pipe).images, reference)


def test_nothing_detected_is_bit_identical(pipe):
    """Concept rows equal to the start-of-text row give a flat map: the safety pass is skipped at every step."""
    pipe.to("cuda")
    reference = run(plain_peer(pipe)).images
    rows = encode_init_rows(pipe, "red star")
    pipe.enable_dag(rows[:1].repeat(rows.shape[0], 1))
    output = run(pipe, safety_concept=CONCEPT)
    assert output.unsafe_detected == [False] * 4
    assert np.array_equal(output.images, reference)


def count_synchronisations(pipe, **kwargs) -> int:
    """Host-device synchronisations in one `run`, as `torch.cuda.set_sync_debug_mode("warn")` reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(pipe, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def test_one_synchronisation_per_detection_step(pipe):
    """DAG copies the concept share to the host once per detection step (for the connected components) and computes
    the scale map there; nothing else waits for the GPU. (The safety concept's encoding may add a copy or two.)"""
    pipe.to("cuda")
    plain = count_synchronisations(plain_peer(pipe))
    pipe.enable_dag(RED_STAR)
    detection_steps = STEPS - pipe.dag_config.warmup_steps
    assert count_synchronisations(pipe, safety_concept=CONCEPT) - plain <= detection_steps + 2


def test_dag_on_cuda_matches_the_cpu(pipe):
    """Same detections and nearly the same images as on the CPU (kernels differ, so not bit for bit). Measured on an
    H100: mean map difference 0.0010, mean image difference 0.0005-0.016 per image."""
    pipe.enable_dag(RED_STAR)
    on_cpu = run(pipe, safety_concept=CONCEPT, return_dag_maps=True)
    pipe.to("cuda")
    on_gpu = run(pipe, safety_concept=CONCEPT, return_dag_maps=True)
    print(
        "cpu vs cuda: mean |map diff|",
        (on_cpu.dag_maps - on_gpu.dag_maps).abs().mean().item(),
        "mean |image diff| per image",
        np.abs(on_cpu.images - on_gpu.images).mean(axis=(1, 2, 3)),
    )
    assert on_gpu.unsafe_detected == on_cpu.unsafe_detected
    assert on_gpu.dag_maps.device.type == "cpu"
    assert (on_cpu.dag_maps - on_gpu.dag_maps).abs().mean() < 0.05
    assert np.abs(on_cpu.images - on_gpu.images).mean() < 0.05


def test_float16_on_cuda(pipe):
    """DAG + SEGA in float16 with the committed (float32-fitted) embedding erases red stars as it does in float32
    (`test_mini_model.py::test_dag_erases_the_red_star`, same prompts and seeds). Images are not compared with the
    float32 run: on an H100 the mini model's float16 images differ from its float32 ones as much without DAG (mean
    absolute difference 0.073 over 8 images) as with it (0.070), against 0.02 for float16 on the CPU."""
    prompts = ["a red star on a white background", "an outlined red star and a blue square on a gray background"]
    batch = [p for p in prompts for _ in range(4)]
    pipe.to("cuda", torch.float16)

    def generate():
        generators = [torch.Generator().manual_seed(50 + i) for i in range(len(batch))]
        return pipe(batch, num_inference_steps=STEPS, generator=generators, output_type="np")

    def stars(images):
        return sum(any(d.is_target for d in detect((image * 255).round().astype(np.uint8))) for image in images)

    undefended = stars(generate().images)
    pipe.enable_dag(RED_STAR)
    out = generate()
    print("float16 red stars: undefended", undefended, "DAG + SEGA", stars(out.images))
    assert np.isfinite(out.images).all()
    assert undefended >= 6
    assert stars(out.images) <= 0.6 * undefended
    assert sum(out.unsafe_detected) >= undefended


def test_training_resumes_on_cuda(tmp_path):
    """The recipe's grounded phase resumes the plain phase's checkpoint: that must work with `--device cuda`."""
    import json
    from pathlib import Path

    from dag_safety.mini.training.train_unet import main

    def train(steps, *extra):
        main([
            "--vae", str(Path(MODEL_PATH) / "vae"), "--output-dir", str(tmp_path), "--steps", str(steps),
            "--num-scenes", "64", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cuda", *extra,
        ])  # fmt: skip

    train(2, "--grounding-weight", "0")
    train(4, "--resume")
    steps = [json.loads(line)["step"] for line in (tmp_path / "loss.jsonl").open()]
    assert steps == [1, 2, 3, 4]
