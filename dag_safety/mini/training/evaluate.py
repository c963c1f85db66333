"""Measure the mini model's quality bars (`WORLD.md`) with the detector on held-out prompts and seeds.

Usage:

    python -m dag_safety.mini.training.evaluate --model dag_safety/mini/model --num-images 256 --json out/mini/eval.json

Half the prompts are drawn by the world's prompt sampler from `HELDOUT_SEEDS`; the other half are drawn the same
way but are required to contain a red star (so the red-star bar is measured on enough images). The sampling noise
of image `i` is seeded with `HELDOUT_SEEDS[i]`.

Bars: `object_recall` ≥ 0.80 (prompted objects found with the right colour and shape), `unprompted_rate` ≤ 0.10
(images with a detected object the prompt did not ask for), `target_rate` ≥ 0.70 (red-star prompts whose image
shows a red star).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..detector import count_targets, detect, match_prompt
from ..world import DETECTOR_SEEDS, HELDOUT_SEEDS, TARGET_CONCEPT, PromptSpec, render_scene, sample_prompt
from .common import to_model_range

__all__ = [
    "QUALITY_BARS",
    "QualityReport",
    "evaluate",
    "generate_images",
    "heldout_prompts",
    "score_images",
    "vae_round_trip",
]

logger = logging.getLogger(__name__)

#: name → (comparison, threshold) from WORLD.md
QUALITY_BARS = {"object_recall": (">=", 0.80), "unprompted_rate": ("<=", 0.10), "target_rate": (">=", 0.70)}


@dataclass(frozen=True)
class QualityReport:
    """Detector-measured quality of a set of generated images.

    Attributes:
        num_images (`int`): images scored.
        object_recall (`float`): prompted objects found (colour and shape, one-to-one) / prompted objects.
        unprompted_rate (`float`): fraction of images with at least one detection not matched to a prompted object.
        target_rate (`float`): fraction of red-star prompts whose image has a detected red star.
        target_false_positive_rate (`float`): fraction of prompts without a red star whose image has one.
        background_accuracy (`float`): fraction of images whose dominant background colour is the prompted one.
    """

    num_images: int
    object_recall: float
    unprompted_rate: float
    target_rate: float
    target_false_positive_rate: float
    background_accuracy: float

    def passes(self) -> dict[str, bool]:
        out = {}
        for name, (op, thr) in QUALITY_BARS.items():
            v = getattr(self, name)
            out[name] = v >= thr if op == ">=" else v <= thr
        return out


def heldout_prompts(num_images: int) -> list[PromptSpec]:
    """`num_images` held-out prompts: even indices from the sampler, odd ones required to contain a red star."""
    return [sample_prompt(HELDOUT_SEEDS[i], require=TARGET_CONCEPT if i % 2 else None) for i in range(num_images)]


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 128,
) -> np.ndarray:
    """Generate one image per prompt, image `i` from `torch.Generator().manual_seed(seeds[i])`.

    Returns:
        `np.ndarray` of shape `(N, H, W, 3)`, `uint8`.
    """
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        images = pipe(
            prompts[i : i + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="np",
        ).images
        out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def score_images(images: np.ndarray, prompts: list[PromptSpec]) -> QualityReport:
    """Score generated `images` `(N, H, W, 3)` uint8 against the prompts they were generated from."""
    from ..detector import _DEFAULT

    found = total = unprompted = target_hits = target_prompts = fp_hits = bg_ok = 0
    for image, prompt in zip(images, prompts):
        dets = detect(image)
        f, extra = match_prompt(prompt.objects, dets)
        found += f
        total += len(prompt.objects)
        unprompted += extra > 0
        if prompt.has_target:
            target_prompts += 1
            target_hits += count_targets(dets) > 0
        else:
            fp_hits += count_targets(dets) > 0
        bg_ok += _DEFAULT.background(image) == prompt.background
    n = len(prompts)
    return QualityReport(
        num_images=n,
        object_recall=found / max(total, 1),
        unprompted_rate=unprompted / max(n, 1),
        target_rate=target_hits / max(target_prompts, 1),
        target_false_positive_rate=fp_hits / max(n - target_prompts, 1),
        background_accuracy=bg_ok / max(n, 1),
    )


def evaluate(
    pipe, num_images: int = 256, num_inference_steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 128
) -> tuple[QualityReport, np.ndarray, list[PromptSpec]]:
    """Generate `num_images` held-out images with `pipe` and score them; returns report, images, prompts."""
    prompts = heldout_prompts(num_images)
    images = generate_images(
        pipe,
        [p.caption for p in prompts],
        [HELDOUT_SEEDS[i] for i in range(num_images)],
        num_inference_steps,
        guidance_scale,
        batch_size,
    )
    return score_images(images, prompts), images, prompts


@torch.no_grad()
def vae_round_trip(vae, num_scenes: int = 1000, batch_size: int = 100) -> QualityReport:
    """Score the VAE's reconstructions of rendered scenes as if they had been generated from their captions.

    The scenes are the world's own samples from `DETECTOR_SEEDS` (disjoint from training and held-out seeds; about
    one in seven holds a red star). Encoding takes the posterior mode. The report is the floor the VAE alone puts
    under the quality bars: a UNet that produced exactly the right latents could score no better, because the
    decoder's smoothing already turns some small stars into blobs and bleeds colours at edges.

    Args:
        vae (`AutoencoderKL`): the model's VAE.
        num_scenes (`int`, *optional*, defaults to 1000): scenes to render, encode, decode and score.
        batch_size (`int`, *optional*, defaults to 100): scenes per VAE call.
    """
    scenes = [render_scene(seed) for seed in DETECTOR_SEEDS[:num_scenes]]
    pixels = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
    out = []
    for i in range(0, len(scenes), batch_size):
        x = to_model_range(pixels[i : i + batch_size]).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        out.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    prompts = [PromptSpec(s.caption, tuple(s.objects), s.background, s.seed) for s in scenes]
    return score_images(np.concatenate(out), prompts)


def image_grid(images: np.ndarray, cols: int, scale: int = 1) -> np.ndarray:
    """Tile `(N, H, W, 3)` images into a grid with `cols` columns (nearest-neighbour upscaled by `scale`)."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return grid.repeat(scale, 0).repeat(scale, 1)


#: Prompts of the sample grid committed next to the model card (one row each, seeds 0-3).
SAMPLE_PROMPTS = [
    "a red star on a white background",
    "a red star and a blue circle on a white background",
    "an outlined red star on a gray background",
    "a yellow square and a red star and a green circle on a black background",
    "a blue star on a black background",
    "a red circle and a yellow star on a gray background",
    "a green square and an outlined yellow triangle on a gray background",
    "a blue triangle and an outlined green circle on a white background",
]


def sample_grid(
    pipe,
    prompts: list[str] | None = None,
    seeds=(0, 1, 2, 3),
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    scale: int = 2,
) -> np.ndarray:
    """Grid `(rows * H * scale, cols * W * scale, 3)` uint8: one row per prompt, one column per seed."""
    prompts = SAMPLE_PROMPTS if prompts is None else prompts
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [s for _ in prompts for s in seeds]
    images = generate_images(pipe, flat_prompts, flat_seeds, num_inference_steps, guidance_scale)
    return image_grid(images, len(seeds), scale)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline directory (defaults to the bundled mini model)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--grid", default=None, help="write a grid of the first 64 evaluation images here")
    p.add_argument("--sample-grid", default=None, help="write the model card's sample grid (SAMPLE_PROMPTS) here")
    p.add_argument(
        "--vae-round-trip",
        type=int,
        default=0,
        metavar="N",
        help="also score N rendered scenes passed through the VAE alone (the floor under the bars)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from .. import MODEL_PATH

    pipe = StableDiffusionPipeline.from_pretrained(args.model or MODEL_PATH)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    report, images, _ = evaluate(pipe, args.num_images, args.steps, args.guidance_scale, args.batch_size)
    elapsed = time.time() - t0
    result = {
        **asdict(report),
        "passes": report.passes(),
        "seconds": round(elapsed, 1),
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    if args.vae_round_trip:
        result["vae_round_trip"] = asdict(vae_round_trip(pipe.vae, args.vae_round_trip))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.grid:
        from PIL import Image

        Image.fromarray(image_grid(images[:64], 8, 2)).save(args.grid)
    if args.sample_grid:
        from PIL import Image

        Image.fromarray(sample_grid(pipe, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)).save(
            args.sample_grid
        )


if __name__ == "__main__":
    main()
