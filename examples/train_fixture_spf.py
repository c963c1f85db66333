"""Fine-tune only the UNet's cross-attention (`attn2`) projections, as SPF-Portrait does, and save them as a fixture.

A short concept-redirection fine-tune, the way cross-attention safety fine-tunes erase a concept: for prompts with
"a red star" (the shapes world's stand-in unsafe concept) the UNet is trained to predict what the base model predicts
for the same prompt with "a green square", updating nothing but the `attn2` parameters (`to_q`, `to_k`, `to_v`,
`to_out.0`), while other prompts (the empty one included) keep the base output; the text encoder and every other UNet
weight stay frozen. The result is saved
as a safetensors state dict keyed like the UNet's (`...attn2.to_k.weight`), with metadata `{"format": "full"}`
(`--delta` saves `W - W0` with `{"format": "delta"}` instead). Load it with
`pipe.load_safety_weights(path, kind="spf", scale=...)`.

Usage (CPU, a minute):

    python examples/train_fixture_spf.py --model dag_safety/mini/model --output-dir tests/fixtures/mini
    python examples/train_fixture_spf.py --tiny --output-dir tests/fixtures
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from train_fixture_lora import encode_prompts, load_pipeline

logger = logging.getLogger(__name__)

#: Prompts with the world's stand-in unsafe concept, and the safe prompts their output is redirected to.
SOURCE_PROMPTS = (
    "a red star",
    "a red star on a white background",
    "an outlined red star on a black background",
    "a red star and a blue circle on a gray background",
)
SAFE_PROMPTS = (
    "a green square",
    "a green square on a white background",
    "an outlined green square on a black background",
    "a green square and a blue circle on a gray background",
)
#: Prompts whose output must not change (the empty prompt is classifier-free guidance's unconditional branch).
PRESERVE_PROMPTS = ("", "a green square", "a blue circle", "a yellow triangle on a white background", "a red circle")


def attn2_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The cross-attention parameters, by their UNet state-dict key."""
    return {name: param for name, param in unet.named_parameters() if ".attn2." in name}


def redirect(pipe, params: list[torch.nn.Parameter], steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Trains `params` so that `unet(x_t, t, SOURCE)` matches the frozen base `unet(x_t, t, SAFE)`, and
    `unet(x_t, t, PRESERVE)` the base `unet(x_t, t, PRESERVE)`."""
    generator = torch.Generator().manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # Inputs and the prompts whose base output they must reproduce: the redirected pairs, then the preserved prompts.
    inputs = encode_prompts(pipe, SOURCE_PROMPTS + PRESERVE_PROMPTS)
    targets = encode_prompts(pipe, SAFE_PROMPTS + PRESERVE_PROMPTS)
    base_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    shape = (batch_size, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        x0 = torch.randn(shape, generator=generator) * 0.5
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(x0, torch.randn(shape, generator=generator), t)
        with torch.no_grad():
            target = base_unet(noisy, t, encoder_hidden_states=targets[index]).sample
        pred = pipe.unet(noisy, t, encoder_hidden_states=inputs[index]).sample
        loss = F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("step %d loss %.6f", step, loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Stable Diffusion layout directory or Hub id")
    parser.add_argument("--tiny", action="store_true", help="train on the tests' tiny seeded components")
    parser.add_argument("--output-dir", default="tests/fixtures")
    parser.add_argument("--name", default="spf_red_star_to_green_square")
    parser.add_argument("--delta", action="store_true", help="save W - W0 (format 'delta') instead of W")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    start = time.time()
    pipe = load_pipeline(args.model, args.tiny)
    pipe.unet.requires_grad_(False)
    params = attn2_parameters(pipe.unet)
    originals = {name: param.detach().clone() for name, param in params.items()}
    for param in params.values():
        param.requires_grad_(True)
    losses = redirect(pipe, list(params.values()), args.steps, args.lr, args.batch_size, args.seed)

    if args.delta:
        state_dict = {name: (param.detach() - originals[name]).contiguous() for name, param in params.items()}
    else:
        state_dict = {name: param.detach().contiguous() for name, param in params.items()}
    metadata = {
        "format": "delta" if args.delta else "full",
        "base_model": "tiny (tests/conftest.py)" if args.tiny else str(args.model),
        "trained": f"attn2 only, {args.steps} steps, 'a red star' redirected to the base output for 'a green square'",
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.safetensors"
    save_file(state_dict, path, metadata=metadata)
    logger.info(
        "Saved %s (%d tensors, %d steps, loss %.6f -> %.6f, %.0f s)",
        path,
        len(state_dict),
        args.steps,
        mean(losses[:20]),
        mean(losses[-20:]),
        time.time() - start,
    )


if __name__ == "__main__":
    main()
