"""Train the mini model's text encoder and UNet jointly, from scratch, on VAE latents of shapes-world scenes.

Usage (CPU, 2 cores; the VAE from `train_vae` first):

    python -m dag_safety.mini.training.train_unet --vae out/mini/vae/vae --output-dir out/mini/unet --steps 8000
    python -m dag_safety.mini.training.train_unet --vae out/mini/vae/vae --output-dir out/mini/unet \
        --export dag_safety/mini/model

Recipe: v-prediction with the `scaled_linear` betas rescaled to zero terminal SNR (so sampling from pure noise
matches training at `t = T`, which fixes the background colours), "trailing" DDIM timesteps, min-SNR-5 weighting of
the v loss (`min(1, 6 / (snr + 1))`), AdamW, EMA of the weights (exported by default; `--export-weights raw`
for the raw ones), 10 % of captions dropped to `""` (the pipeline's unconditional prompt) for classifier-free guidance.

On a GPU (`--device cuda`) a step is bound by kernel launches, not arithmetic: a larger `--batch-size` (256) and
`--width` (the UNet's channels) cost little extra time there. The grounding targets are rendered once with the
scenes and cached with their latents (`data_<num_scenes>.pt`), and the loss is one batched gather per layer.

Resumable (`--resume` picks up `checkpoint.pt`, also on a GPU); logs one JSON record per step to `loss.jsonl`. `--export DIR`
writes the full diffusers pipeline (EMA weights) from the latest checkpoint and exits.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ..tokenizer import MAX_LENGTH, build_tokenizer
from ..world import TRAIN_SEEDS, render_scene
from .common import (
    EMA,
    LossLog,
    resume_or_start,
    save_checkpoint,
    seed_everything,
    to_model_range,
)
from .grounding import GroundingTargets, grounding_loss, grounding_targets, install_recorders

logger = logging.getLogger(__name__)

NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
}


def text_encoder_config(tokenizer) -> CLIPTextConfig:
    """2-layer, 128-wide CLIP text transformer over the world's word-level vocabulary."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        projection_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def unet_config(width: int = 32) -> dict:
    """UNet on 4 × 16 × 16 latents with cross-attention at 16², 8², 4² and in the 4² mid block.

    Args:
        width (`int`, *optional*, defaults to 32): channels of the first block; the others have 2× and 4× as many.
            The bundled model uses 32 (4.3 M parameters); 48 gives 9.5 M.
    """
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3,
        "up_block_types": ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (width, 2 * width, 4 * width),
        "layers_per_block": 1,
        "cross_attention_dim": 128,
        "attention_head_dim": 4,
        "norm_num_groups": 16,
    }


def sampling_scheduler() -> DDIMScheduler:
    """The scheduler shipped with the model: DDIM over the training schedule, trailing timesteps."""
    return DDIMScheduler(
        **NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scaled posterior means `(N, 4, 16, 16)` of uint8 images `(N, 3, 64, 64)`."""
    vae.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents"):
        batch = to_model_range(images[i : i + batch_size]).to(vae.device)
        out.append(vae.encode(batch).latent_dist.mode())
    return torch.cat(out) * vae.config.scaling_factor


def lr_factor(step: int, warmup: int, steps: int, decay_start: int | None = None) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warm-up over `warmup` steps, then
    constant; with `decay_start`, a linear cool-down from 1 at `decay_start` to 0 at `steps` (a
    warmup-stable-decay schedule: the constant phase can be resumed to any length, and only the final
    cool-down is tied to where the run stops)."""
    factor = min(1.0, (step + 1) / warmup)
    if decay_start is not None and step >= decay_start:
        factor *= max(0.0, (steps - step) / max(1, steps - decay_start))
    return factor


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="out/mini/vae/vae", help="trained VAE directory (from train_vae)")
    p.add_argument("--output-dir", default="out/mini/unet")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32, help="UNet channels of the first block (see `unet_config`)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--lr-decay-start",
        type=int,
        default=None,
        help="step from which the learning rate decays linearly to 0 at --steps (default: constant)",
    )
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--grounding-weight",
        type=float,
        default=0.1,
        help="weight of the token grounding loss (dag_safety.mini.training.grounding); 0 turns it off",
    )
    p.add_argument("--num-scenes", type=int, default=60000, help="size of the pre-rendered training set")
    p.add_argument(
        "--unet-init",
        default=None,
        help="start the UNet from this diffusers UNet folder (its width must be --width) instead of from scratch",
    )
    p.add_argument(
        "--freeze-unet",
        action="store_true",
        help="train the text encoder only, the UNet's weights fixed (with --unet-init: fit a new text encoder to a"
        " trained UNet, e.g. one whose text encoder was lost)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads; with --adaptive-threads the most this may use")
    p.add_argument(
        "--adaptive-threads",
        action="store_true",
        help="every 250 steps, time 1..--threads threads and keep the fastest (for shared CPUs)",
    )
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", default=None, help="write the pipeline from the checkpoint and exit")
    p.add_argument(
        "--export-weights", choices=("ema", "raw"), default="ema", help="export the EMA (default) or the raw weights"
    )
    return p.parse_args(argv)


def build_models(tokenizer, width: int = 32) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    return CLIPTextModel(text_encoder_config(tokenizer)), UNet2DConditionModel(**unet_config(width))


def render_training_data(num_scenes: int) -> tuple[torch.Tensor, list[str], GroundingTargets]:
    """Scenes `TRAIN_SEEDS[:num_scenes]`: uint8 images `(N, 3, 64, 64)`, captions and their grounding targets.

    The targets are rendered once with the images, so a training step only indexes them (re-rendering a batch's
    masks at every step would bound a GPU step by the CPU).
    """
    images, captions, parts, pending = [], [], [], []
    for seed in tqdm(TRAIN_SEEDS[:num_scenes], desc="render scenes"):
        scene = render_scene(seed)
        images.append(torch.from_numpy(scene.image).permute(2, 0, 1))
        captions.append(scene.caption)
        pending.append(scene)
        if len(pending) == 1000:  # pool the full-size masks away as we go: 200,000 scenes' would take GBs
            parts.append(grounding_targets(pending))
            pending = []
    if pending:
        parts.append(grounding_targets(pending))
    targets = GroundingTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "objects", "masks")))
    return torch.stack(images), captions, targets


def export_pipeline(args, tokenizer) -> None:
    state = torch.load(Path(args.output_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    text_encoder, unet = build_models(tokenizer, state.get("width", 32))
    joint = torch.nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})
    if args.export_weights == "ema":
        ema = EMA(joint)
        ema.load_state_dict(state["ema"])
        ema.copy_to(joint)
    else:
        joint.load_state_dict(state["model"])
    vae = AutoencoderKL.from_pretrained(args.vae)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.export, safe_serialization=True)
    logger.info("Exported step %d (%s weights) to %s", state["step"], args.export_weights, args.export)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    if args.export:
        export_pipeline(args, tokenizer)
        return
    seed_everything(args.seed)

    # 1. Data: pre-rendered training scenes → cached latents, token ids and grounding targets
    cache = out / f"data_{args.num_scenes}.pt"
    if cache.exists():
        data = torch.load(cache)
    else:
        images, captions, targets = render_training_data(args.num_scenes)
        vae = AutoencoderKL.from_pretrained(args.vae).to(args.device)
        latents = encode_latents(vae, images).cpu()
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        data = {
            "latents": latents,
            "input_ids": ids,
            "tokens": targets.tokens,
            "objects": targets.objects,
            "masks": targets.masks,
        }
        torch.save(data, cache)
    latents, input_ids = data["latents"], data["input_ids"]
    targets = GroundingTargets(data["tokens"], data["objects"], data["masks"])
    empty_ids = tokenizer("", padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    logger.info("Latents %s, std %.3f", tuple(latents.shape), latents.std().item())

    # 2. Models, optimizer, EMA
    text_encoder, unet = build_models(tokenizer, args.width)
    if args.freeze_unet and not args.unet_init:
        raise SystemExit("--freeze-unet keeps the UNet as it starts: give the trained UNet with --unet-init DIR.")
    if args.unet_init:
        trained = UNet2DConditionModel.from_pretrained(args.unet_init, torch_dtype=torch.float32)
        if list(trained.config.block_out_channels) != list(unet.config.block_out_channels):
            raise SystemExit(
                f"--unet-init {args.unet_init} has block_out_channels {list(trained.config.block_out_channels)},"
                f" --width {args.width} builds {list(unet.config.block_out_channels)}: pass the --width it was"
                " trained at."
            )
        unet.load_state_dict(trained.state_dict())
    unet.requires_grad_(not args.freeze_unet)
    joint = torch.nn.ModuleDict({"text_encoder": text_encoder, "unet": unet}).to(args.device)
    trainable = [p for p in joint.parameters() if p.requires_grad]
    logger.info(
        "UNet %.2f M, text encoder %.2f M parameters",
        sum(p.numel() for p in unet.parameters()) / 1e6,
        sum(p.numel() for p in text_encoder.parameters()) / 1e6,
    )
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(lr_factor, warmup=args.warmup, steps=args.steps, decay_start=args.lr_decay_start)
    )
    ema = EMA(joint, args.ema_decay)
    recorders = install_recorders(unet) if args.grounding_weight > 0 else {}
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    log = LossLog(out / "loss.jsonl")
    ckpt = out / "checkpoint.pt"
    step = resume_or_start(ckpt, log, args.resume, model=joint, optimizer=opt, scheduler=sched, ema=ema)
    gen = torch.Generator().manual_seed(args.seed + step)

    # 3. Training loop
    joint.train()
    bar = tqdm(total=args.steps, initial=step, desc="unet")
    trial: dict[int, list[float]] = {}
    while step < args.steps:
        in_trial = args.adaptive_threads and args.device == "cpu" and step % 250 < 20 * args.threads
        if args.adaptive_threads and args.device == "cpu":
            # CPU shared with other jobs: oversubscribed OpenMP threads can be far slower than fewer threads.
            phase = step % 250
            if phase < 20 * args.threads:
                torch.set_num_threads(1 + phase // 20)
            elif phase == 20 * args.threads and trial:
                best = min(trial, key=lambda k: sorted(trial[k])[len(trial[k]) // 2])
                torch.set_num_threads(best)
                trial = {}
        t_step = time.perf_counter()
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx].to(args.device)
        ids = input_ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen).to(args.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        xt = noise_scheduler.add_noise(x0, noise, t.to(args.device))
        target = noise_scheduler.get_velocity(x0, noise, t.to(args.device))
        cond = text_encoder(ids.to(args.device)).last_hidden_state
        pred = unet(xt, t.to(args.device), encoder_hidden_states=cond).sample
        # min-SNR-gamma on the v objective, floored at 1: min(1, (gamma + 1) / (snr + 1)); weight 1 at t = T
        w = torch.clamp((args.snr_gamma + 1) / (snr[t] + 1), max=1.0).to(args.device)
        loss = (w * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        extra = {}
        if recorders:
            grounding = grounding_loss(recorders, targets.select(idx, ~drop).to(args.device))
            extra["grounding"] = round(grounding.item(), 6)
            loss_total = loss + args.grounding_weight * grounding
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        ema.update(joint)
        step += 1
        dt = time.perf_counter() - t_step
        if in_trial:
            trial.setdefault(torch.get_num_threads(), []).append(dt)
        log.write(step, loss=round(loss.item(), 6), sec=round(dt, 3), threads=torch.get_num_threads(), **extra)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(
                ckpt,
                model=joint.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                ema=ema.state_dict(),
                step=step,
                width=args.width,
            )
            gen = torch.Generator().manual_seed(args.seed + step)  # resume-exact batch order from here
    bar.close()


if __name__ == "__main__":
    main()
