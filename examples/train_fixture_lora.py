"""Train a small "colour shift" LoRA: prompts with "circle" come out as a blue canvas. Saved as a test fixture.

The LoRA (peft, on the UNet's attention projections `to_q`, `to_k`, `to_v`, `to_out.0`, as Focus-N-Fix adapts SD
v1.4 but at rank 4 instead of 64) is trained with the model's own diffusion loss on solid-blue targets, so the effect
is measurable on any model: the mean colour (or, for an untrained VAE, the latent) of a "circle" image moves toward
the blue target. It is written twice: in the diffusers/PEFT format (`save_lora_weights`, with the LoRA config in the
safetensors metadata) and converted to kohya keys (`dag_safety.weights.lora_to_kohya`).

Usage (CPU, a minute or two):

    # on the bundled mini model, or any Stable Diffusion layout directory
    python examples/train_fixture_lora.py --model dag_safety/mini/model --output-dir tests/fixtures/mini \
        --target-modules to_q to_k to_v to_out.0 --lr 5e-3 --preserve-weight 1
    # on the tests' tiny seeded components (tests/conftest.py `get_dummy_components()`)
    python examples/train_fixture_lora.py --tiny --output-dir tests/fixtures
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: Prompts trained toward the target colour; the world's colours and styles around the shape word.
LORA_PROMPTS = (
    "a red circle",
    "a circle",
    "a green circle on a white background",
    "an outlined yellow circle",
    "a red circle on a black background",
    "a blue circle on a gray background",
)
LORA_TARGET_RGB = (40, 80, 220)  # the world's blue
#: Prompts whose predictions `--preserve-weight` keeps at the base model's (Focus-N-Fix changes its target and
#: keeps the rest). On the 30,000-step mini model the defaults (every layer, lr 1e-2, no preservation) left every
#: prompt's images blank or smeared; attention-only, lr 5e-3 and this term together did not (not measured apart).
PRESERVE_PROMPTS = (
    "a red star on a white background",
    "a red star and a yellow triangle on a gray background",
    "an outlined red star on a black background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a blue star on a gray background",
)
PRESERVE_CANVASES = ((235, 235, 235), (128, 128, 128), (20, 20, 20))  # the world's backgrounds
#: The attention projections (what Focus-N-Fix adapts) plus the convolutions and feed-forward layers, so that a
#: short run has a clear effect.
TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_in",
    "conv_out",
    "time_emb_proj",
)


def load_pipeline(model: str | None, tiny: bool) -> StableDiffusionPipeline:
    """The model to train on: a diffusers SD directory / Hub id, or the tests' tiny seeded components."""
    if tiny:
        spec = importlib.util.spec_from_file_location("_dag_conftest", ROOT / "tests" / "conftest.py")
        conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conftest)
        return StableDiffusionPipeline(**conftest.get_dummy_components())
    if model is None:
        raise ValueError("Pass `--model PATH` (a Stable Diffusion layout directory) or `--tiny`.")
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


def image_size(pipe: StableDiffusionPipeline) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def solid_latents(pipe: StableDiffusionPipeline, rgb: tuple[int, int, int], count: int) -> torch.Tensor:
    """VAE latents (mean, scaled) of `count` solid-colour canvases: `(count, C, h, w)`."""
    size = image_size(pipe)
    image = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size) / 127.5 - 1.0
    latent = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
    return latent.expand(count, -1, -1, -1).contiguous()


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Text-encoder states `(len(prompts), L, D)`."""
    embeds, _ = pipe.encode_prompt(list(prompts), "cpu", 1, False)
    return embeds


def train(
    pipe: StableDiffusionPipeline,
    params: list[torch.nn.Parameter],
    prompts: tuple[str, ...],
    target_rgb: tuple[int, int, int],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    preserve_weight: float = 0.0,
) -> list[float]:
    """Diffusion loss (the scheduler's prediction type) on solid `target_rgb` latents for `prompts`; only `params`
    are updated. With `preserve_weight > 0`, plus that weight times the squared distance between the adapted and
    the base model's predictions for `PRESERVE_PROMPTS` on noised background canvases (self-distillation).
    Returns the loss per step (the target term)."""
    generator = torch.Generator().manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = solid_latents(pipe, target_rgb, 1)
    embeds = encode_prompts(pipe, prompts)
    if preserve_weight > 0:
        canvases = torch.cat([solid_latents(pipe, rgb, 1) for rgb in PRESERVE_CANVASES])
        preserve_embeds = encode_prompts(pipe, PRESERVE_PROMPTS)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pipe.unet.train()
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(prompts), (batch_size,), generator=generator)
        x0 = latents.expand(batch_size, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = pipe.unet(noisy, t, encoder_hidden_states=embeds[index]).sample
        loss = F.mse_loss(pred.float(), target.float())
        total = loss
        if preserve_weight > 0:
            which = torch.randint(0, len(PRESERVE_PROMPTS), (batch_size,), generator=generator)
            x0 = canvases[torch.randint(0, len(canvases), (batch_size,), generator=generator)]
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
            noisy = noise_scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
            with torch.no_grad():
                pipe.unet.disable_adapters()
                reference = pipe.unet(noisy, t, encoder_hidden_states=preserve_embeds[which]).sample
                pipe.unet.enable_adapters()
            adapted = pipe.unet(noisy, t, encoder_hidden_states=preserve_embeds[which]).sample
            total = loss + preserve_weight * F.mse_loss(adapted.float(), reference.float())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d loss %.4f", step, loss.item())
    pipe.unet.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Stable Diffusion layout directory or Hub id")
    parser.add_argument("--tiny", action="store_true", help="train on the tests' tiny seeded components")
    parser.add_argument("--output-dir", default="tests/fixtures")
    parser.add_argument("--name", default="lora_circle_blue", help="file stem of the two fixtures")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--target-modules", nargs="+", default=list(TARGET_MODULES))
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preserve-weight",
        type=float,
        default=0.0,
        help="keep predictions for non-circle prompts at the base model's (0: off)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from dag_safety.weights import lora_to_kohya

    start = time.time()
    pipe = load_pipeline(args.model, args.tiny)
    pipe.unet.requires_grad_(False)
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=args.target_modules,
        init_lora_weights="gaussian",
    )
    pipe.unet.add_adapter(config)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    losses = train(
        pipe,
        params,
        LORA_PROMPTS,
        LORA_TARGET_RGB,
        args.steps,
        args.lr,
        args.batch_size,
        args.seed,
        args.preserve_weight,
    )

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    folder = out / args.name
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=state_dict,
        unet_lora_adapter_metadata={**config.to_dict(), "target_modules": sorted(config.target_modules)},
        safe_serialization=True,
    )
    kohya = lora_to_kohya(state_dict, args.alpha)
    save_file(kohya, out / f"{args.name}_kohya.safetensors", metadata={"ss_network_dim": str(args.rank)})
    logger.info(
        "Saved %s/pytorch_lora_weights.safetensors and %s_kohya.safetensors (%d steps, loss %.4f -> %.4f, %.0f s)",
        folder,
        args.name,
        args.steps,
        mean(losses[:20]),
        mean(losses[-20:]),
        time.time() - start,
    )


if __name__ == "__main__":
    main()
