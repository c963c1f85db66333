"""Reproduce the bundled mini model from scratch with one command: the exact recipe of its model card.

    python -m dag_safety.mini.reproduce --output-dir out/mini-repro                 # CPU, about 3.5 h on 2 cores
    python -m dag_safety.mini.reproduce --output-dir out/mini-repro --device cuda   # minutes on a GPU

Phases (each one the training script's own command, so `--resume` continues an interrupted run where it stopped):

1. VAE, 2,000 steps (`train_vae`);
2. text encoder + UNet, plain diffusion loss, steps 0 - 9,500 (`train_unet --grounding-weight 0`);
3. the same run resumed with the token grounding loss to 25,000 steps, then a linear learning-rate cool-down to
   0 at 30,000 (`train_unet --grounding-weight 0.1 --lr-decay-start 25000`);
4. export of the EMA weights in diffusers layout to `<output-dir>/model`;
5. the quality report (`evaluate`, 256 held-out images) to `<output-dir>/eval.json`.

A rerun matches the committed weights statistically, not bit for bit: CPU kernels round differently with
another thread count (and GPU kernels differ again), and the committed run was made in pieces (model card).
`--smoke` runs every phase with a few steps and scenes, to check the chain itself in seconds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import evaluate, train_unet, train_vae

logger = logging.getLogger(__name__)

VAE_STEPS = 2000
PLAIN_STEPS = 9500
GROUNDED_STEPS = 30000
DECAY_START = 25000
NUM_SCENES = 60000
VAE_SCENES = 20000
EVAL_IMAGES = 256


def phases(output_dir: Path, device: str, threads: int, smoke: bool = False) -> list[tuple[str, object, list[str]]]:
    """The recipe as `(name, module, argv)` per phase; `smoke` shrinks every count to a few steps."""
    scale = (lambda n: max(2, n // 2500)) if smoke else (lambda n: n)
    vae_dir, unet_dir, model_dir = output_dir / "vae", output_dir / "unet", output_dir / "model"
    common = ["--device", device, "--threads", str(threads)]
    unet_common = [
        "--vae", str(vae_dir / "vae"), "--output-dir", str(unet_dir), "--batch-size", "16",
        "--num-scenes", str(scale(NUM_SCENES) * (16 if smoke else 1)), "--resume", *common,
    ]  # fmt: skip
    return [
        ("vae", train_vae, [
            "--output-dir", str(vae_dir), "--steps", str(scale(VAE_STEPS)),
            "--num-scenes", str(scale(VAE_SCENES) * (16 if smoke else 1)), "--resume", *common,
        ]),
        ("unet (plain)", train_unet, [
            *unet_common, "--steps", str(scale(PLAIN_STEPS)), "--grounding-weight", "0",
        ]),
        ("unet (grounded, cool-down)", train_unet, [
            *unet_common, "--steps", str(scale(GROUNDED_STEPS)), "--grounding-weight", "0.1",
            "--lr-decay-start", str(scale(DECAY_START)),
        ]),
        ("export", train_unet, [
            "--vae", str(vae_dir / "vae"), "--output-dir", str(unet_dir), "--export", str(model_dir),
        ]),
        ("evaluate", evaluate, [
            "--model", str(model_dir), "--num-images", str(4 if smoke else EVAL_IMAGES),
            "--steps", str(2 if smoke else 25), "--threads", str(threads),
            "--json", str(output_dir / "eval.json"),
        ]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="out/mini-repro")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the committed run used 1-2)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per phase: checks the chain, not the model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    output_dir = Path(args.output_dir)
    for name, module, phase_argv in phases(output_dir, args.device, args.threads, args.smoke):
        logger.info("Phase %s: python -m %s %s", name, module.__name__, " ".join(phase_argv))
        module.main(phase_argv)
    logger.info("Model in %s, quality report in %s", output_dir / "model", output_dir / "eval.json")


if __name__ == "__main__":
    main()
