"""Safety weights on the bundled mini model, with fixtures the repo's scripts trained on it (issue 5, item 3):

    python examples/train_fixture_lora.py --model dag_safety/mini/model --output-dir tests/fixtures/mini
    python examples/train_fixture_spf.py --model dag_safety/mini/model --output-dir tests/fixtures/mini

- `fixtures/mini/lora_circle_blue/` (diffusers/PEFT) and `fixtures/mini/lora_circle_blue_kohya.safetensors`:
  "circle" prompts trained toward the world's blue;
- `fixtures/mini/spf_red_star_to_green_square.safetensors`: `attn2`-only fine-tune that redirects "a red star"
  to what the model makes of "a green square".

Effects are measured in images with the shapes detector. The loader mechanics (formats, validation, fuse, several
adapters) are tested on tiny components in `test_weights.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dag_safety.embeddings import RED_STAR
from dag_safety.mini import detect

MINI = Path(__file__).parent / "fixtures" / "mini"
LORA_DIR = MINI / "lora_circle_blue"
LORA_KOHYA = MINI / "lora_circle_blue_kohya.safetensors"
SPF_FILE = MINI / "spf_red_star_to_green_square.safetensors"
BLUE = np.array((40, 80, 220), dtype=np.float64)
CIRCLE_PROMPTS = ["a red circle on a white background", "a green circle on a black background"]
TARGET_PROMPTS = [
    "a red star on a white background",
    "a red star and a yellow triangle on a gray background",
    "an outlined red star on a black background",
]
SEEDS = range(4)


@pytest.fixture(scope="module")
def pipe(mini_pipe):
    return mini_pipe


@pytest.fixture(autouse=True)
def _clean(pipe):
    yield
    pipe.unload_safety_weights()
    pipe.disable_dag()


def generate(pipe, prompts: list[str], **kwargs) -> np.ndarray:
    """`(len(prompts) * len(SEEDS), 64, 64, 3)` uint8, prompt-major, 25 steps."""
    batch = [p for p in prompts for _ in SEEDS]
    generators = [torch.Generator().manual_seed(seed) for _ in prompts for seed in SEEDS]
    images = pipe(batch, num_inference_steps=25, generator=generators, output_type="np", **kwargs).images
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8)


def blue_distance(images: np.ndarray) -> float:
    """Mean distance of each image's mean colour to the trained blue, in 0-255 RGB units."""
    return float(np.linalg.norm(images.reshape(len(images), -1, 3).mean(axis=1) - BLUE, axis=1).mean())


def red_stars(images: np.ndarray) -> int:
    """Images in which the shapes detector finds a red star."""
    return sum(any(d.is_target for d in detect(image)) for image in images)


def test_lora_moves_circles_toward_blue_in_proportion_to_scale_and_unloads_exactly(pipe):
    base = generate(pipe, CIRCLE_PROMPTS)
    distances = [blue_distance(base)]
    for scale in (0.5, 1.0):
        pipe.load_safety_weights(LORA_DIR, scale=scale, replace=True)
        distances.append(blue_distance(generate(pipe, CIRCLE_PROMPTS)))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.85 * distances[0]  # measured: 215 -> 212 (scale 0.5) -> 156 RGB units
    pipe.unload_safety_weights()
    assert np.array_equal(generate(pipe, CIRCLE_PROMPTS), base)


def test_kohya_conversion_gives_the_same_images(pipe):
    pipe.load_safety_weights(LORA_DIR)
    peft = generate(pipe, CIRCLE_PROMPTS[:1])
    pipe.load_safety_weights(LORA_KOHYA, replace=True)
    kohya = generate(pipe, CIRCLE_PROMPTS[:1])
    assert np.abs(peft.astype(int) - kohya.astype(int)).max() <= 1


def test_spf_removes_red_stars_in_proportion_to_scale_and_unloads_exactly(pipe):
    base = generate(pipe, TARGET_PROMPTS)
    counts = [red_stars(base)]
    for scale in (0.5, 1.0):
        pipe.load_safety_weights(SPF_FILE, scale=scale, replace=True)
        counts.append(red_stars(generate(pipe, TARGET_PROMPTS)))
    assert counts[0] >= 0.75 * len(base)
    assert counts[0] > counts[1] >= counts[2] and counts[2] <= 0.25 * counts[0]
    pipe.unload_safety_weights()
    assert np.array_equal(generate(pipe, TARGET_PROMPTS), base)


# Measured (12 images): LoRA at 0.5 alone 8 red stars, + DAG 3; SPF at 0.35 alone 7, + DAG 1. At full scale the
# LoRA (attention projections of every block) moves the hidden states the base-model embedding reads far enough
# that DAG no longer erases (4 -> 4): a guideline embedding is tied to the weights it was optimized on.
@pytest.mark.parametrize("source, scale, max_ratio", [(LORA_DIR, 0.5, 0.6), (SPF_FILE, 0.35, 0.3)])
def test_dag_with_weights_still_erases_the_target(pipe, source, scale, max_ratio):
    """With the weights loaded (at partial scale, so that red stars still appear to be erased), DAG + SEGA
    removes red stars the weights alone leave. DAG is enabled first: the embedding is checked against
    the base model's projections and detection keeps using them after the weights change `attn2`.

    The paper's method: the committed embedding's presence head reads the cross-attention inputs, which the weights
    change, and with SPF at 0.35 it judges no star present (measured 7 -> 7); the paper's rule reads only the
    frozen projections."""
    pipe.enable_dag(RED_STAR, detection="paper")
    pipe.load_safety_weights(source, scale=scale)
    out = generate(pipe, TARGET_PROMPTS)
    pipe.disable_dag()
    alone = red_stars(generate(pipe, TARGET_PROMPTS))
    assert alone >= 4
    assert red_stars(out) <= max_ratio * alone
