"""Train the mini model's `AutoencoderKL` (64 × 64 RGB ↔ 4 × 16 × 16 latents) on rendered shapes-world scenes.

Usage (CPU, ~10 min on 2 cores):

    python -m dag_safety.mini.training.train_vae --output-dir out/mini/vae --steps 2000

Resumable (`--resume` picks up `checkpoint.pt` in the output dir). Writes `loss.jsonl` (one record per step) and,
at the end, `vae/` (diffusers `save_pretrained` layout) whose `scaling_factor` makes the latent std ≈ 1.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from .common import (
    LossLog,
    render_training_set,
    resume_or_start,
    save_checkpoint,
    seed_everything,
    to_model_range,
)

logger = logging.getLogger(__name__)


def vae_config() -> dict:
    """Architecture of the mini VAE: 3 resolutions (64, 32, 16) → `vae_scale_factor` 4, 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "mid_block_add_attention": False,
    }


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """`1 / std` of the posterior means of `images` (uint8 `(N, 3, 64, 64)`)."""
    vae.eval()
    latents = [
        vae.encode(to_model_range(images[i : i + batch_size])).latent_dist.mode()
        for i in range(0, len(images), batch_size)
    ]
    return float(1.0 / torch.cat(latents).std())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="out/mini/vae")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--num-scenes", type=int, default=20000, help="size of the pre-rendered training set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    images, _ = render_training_set(args.num_scenes)
    vae = AutoencoderKL(**vae_config()).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * max(0.0, 1 - s / args.steps))
    )
    log = LossLog(out / "loss.jsonl")
    ckpt = out / "checkpoint.pt"
    step = resume_or_start(ckpt, log, args.resume, model=vae, optimizer=opt, scheduler=sched)
    gen = torch.Generator().manual_seed(args.seed + step)
    logger.info("VAE parameters: %.2f M", sum(p.numel() for p in vae.parameters()) / 1e6)
    vae.train()
    bar = tqdm(total=args.steps, initial=step, desc="vae")
    while step < args.steps:
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        x = to_model_range(images[idx]).to(args.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        log.write(step, loss=round(loss.item(), 6), rec=round(rec_loss.item(), 6), kl=round(kl.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
        bar.update(1)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(
                ckpt, model=vae.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step
            )
            gen = torch.Generator().manual_seed(args.seed + step)  # resume-exact batch order from here
    bar.close()
    vae = vae.cpu()
    factor = latent_scaling_factor(vae, images[:4096])
    vae.register_to_config(scaling_factor=factor)
    vae.save_pretrained(out / "vae")
    logger.info("Saved %s (scaling_factor %.4f)", out / "vae", factor)


if __name__ == "__main__":
    main()
