"""How selective is a model's cross-attention input for the target concept? A linear probe per layer.

DAG's detection score at a query pixel is a softmax over dot products of the layer's query `to_q(h)` with the
guideline keys: a linear function of the layer input `h`, per head. So how well a linear function of one layer's `h`
separates a red star from a red circle or a blue star indicates how well that layer can serve a guideline embedding.
It is an indication, not a bound: the detection map averages softmaxes over heads and layers and then thresholds,
so layers selective for different attributes (colour here, shape there) can combine into more than each gives
alone, and a held-out AUC is itself an estimate. This script measures it on held-out rendered scenes, per
cross-attention layer:

1. render `--scenes` held-out scenes, encode them with the VAE and noise them to each timestep (fixed seed);
2. run the UNet once with each scene's caption and record every cross-attention layer's input `h` `(N, C)`;
3. average `h` over each object's mask (area-pooled to the layer's resolution): one feature vector per object;
4. fit an L2-regularised logistic probe on the objects of the first half of the scenes, with the classes
   balanced, and report the ROC AUC on the second half: red star against red non-stars (same attribute), against
   non-red stars (same object), against every other object, and the attributes `red` and `star` on their own.

An AUC of 1 means some linear read-out separates every held-out red star from every distractor of that kind;
0.5 is chance. Pooling over the mask gives the probe the object's average feature, which is easier to separate
than the single pixels a detection map thresholds.

    python -m benchmarks.probe                                  # the bundled mini model, t = 100 / 300 / 600
    python -m benchmarks.probe --model DIR --timesteps 300 --out benchmarks/results/probe_other
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

from dag_safety.mini import HELDOUT_SEEDS, MODEL_PATH, TARGET_CONCEPT, render_scene
from dag_safety.presence_head import fit_logistic, roc_auc

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"red non-star": "R", "non-red star": "S", "other": "O"}


def object_kind(color: str, shape: str) -> str:
    """`T` red star, `R` red non-star, `S` non-red star, `O` anything else."""
    if (color, shape) == TARGET_CONCEPT:
        return "T"
    if color == TARGET_CONCEPT[0]:
        return "R"
    return "S" if shape == TARGET_CONCEPT[1] else "O"


@torch.no_grad()
def layer_inputs(pipe, scenes: list, timestep: int, batch: int = 250) -> dict[str, torch.Tensor]:
    """Every cross-attention layer's input `(N, h·w, C)` for the scenes noised to `timestep` (seed = timestep)."""
    device = pipe.device
    pixels = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = (
        torch.cat(
            [
                pipe.vae.encode(pixels[i : i + batch].to(device)).latent_dist.mode()
                for i in range(0, len(scenes), batch)
            ]
        )
        * pipe.vae.config.scaling_factor
    )
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(timestep)).to(device)
    noisy = pipe.scheduler.add_noise(latents, noise, torch.full((len(scenes),), timestep, device=device))
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in pipe.unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):

            def hook(module, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                captured.setdefault(name, []).append(hidden.float().cpu())

            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for i in range(0, len(scenes), batch):
            embeds, _ = pipe.encode_prompt([s.caption for s in scenes[i : i + batch]], device, 1, False)
            pipe.unet(noisy[i : i + batch], timestep, encoder_hidden_states=embeds)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def probe_layers(pipe, scenes: list, timestep: int) -> list[dict]:
    """One row per cross-attention layer: its resolution and the held-out AUCs (see the module docstring)."""
    objects = [(i, obj, mask) for i, s in enumerate(scenes) for obj, mask in zip(s.objects, s.masks)]
    kinds = np.array([object_kind(obj.color, obj.shape) for _, obj, _ in objects])
    scene_index = torch.tensor([i for i, _, _ in objects])
    masks = torch.from_numpy(np.stack([m for _, _, m in objects])).float()[:, None]
    train = (scene_index < len(scenes) // 2).numpy()
    test = ~train
    attributes = {
        "red": np.array([obj.color == TARGET_CONCEPT[0] for _, obj, _ in objects]),
        "star": np.array([obj.shape == TARGET_CONCEPT[1] for _, obj, _ in objects]),
        "red star": kinds == "T",
    }
    rows = []
    for name, hidden in sorted(layer_inputs(pipe, scenes, timestep).items()):
        side = round(hidden.shape[1] ** 0.5)
        pooled = F.adaptive_avg_pool2d(masks, side).flatten(1)  # (O, h·w)
        features = torch.einsum("op,opc->oc", pooled, hidden[scene_index]) / pooled.sum(1, keepdim=True)
        features = (features - features.mean(0)) / (features.std(0) + 1e-6)
        row = {"layer": name.removesuffix(".transformer_blocks.0.attn2"), "side": side}
        scores = {}
        for attribute, labels in attributes.items():
            weight, bias = fit_logistic(features[train], torch.from_numpy(labels[train]).float())
            scores[attribute] = (features @ weight + bias).numpy()
        target = scores["red star"]
        for label, kind in KINDS.items():
            chosen = test & ((kinds == "T") | (kinds == kind))
            row[f"red star vs {label}"] = roc_auc(target[chosen], kinds[chosen] == "T")
        row["red"] = roc_auc(scores["red"][test], attributes["red"][test])
        row["star"] = roc_auc(scores["star"][test], attributes["star"][test])
        rows.append(row)
    return rows


def write_report(results: dict, out: Path, command: str) -> None:
    columns = ["red star vs red non-star", "red star vs non-red star", "red star vs other", "red", "star"]
    lines = [
        "# Linear probe of the cross-attention inputs (red star)",
        "",
        (
            f"Command: `{command}`. {results['objects']} (held-out objects, half of the scenes train the probe,"
            " the other half are scored). ROC AUC of an L2-regularised logistic probe on each layer's input"
            " averaged over the object's mask; 0.5 is chance, 1 is perfectly separable. See the script's docstring."
        ),
    ]
    for timestep, rows in results["timesteps"].items():
        lines += ["", f"t = {timestep}", "", "| layer | side | " + " | ".join(columns) + " |"]
        lines.append("| --- | --- |" + " --- |" * len(columns))
        for row in rows:
            lines.append(f"| {row['layer']} | {row['side']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL_PATH)
    parser.add_argument("--scenes", type=int, default=3000, help="held-out scenes (about 6,000 objects)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 600])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None).to(args.device)
    scenes = [render_scene(HELDOUT_SEEDS[i]) for i in range(args.scenes)]
    kinds = [object_kind(o.color, o.shape) for s in scenes for o in s.objects]
    names = {"T": "red star", "R": "red non-star", "S": "non-red star", "O": "other"}
    results = {
        "model": str(args.model),
        "objects": ", ".join(f"{kinds.count(k)} {names[k]}" for k in "TRSO"),
        "timesteps": {str(t): probe_layers(pipe, scenes, t) for t in args.timesteps},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shown = [a if " " not in a else f'"{a}"' for a in sys.argv[1:]] if argv is None else argv
    write_report(results, args.out, " ".join(["python -m benchmarks.probe", *shown]))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
