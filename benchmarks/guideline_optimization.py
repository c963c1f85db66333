"""Guideline-token optimization study: does the optimization learn, and does it learn to say "absent"?

Three recipes for the red-star embedding on the mini model, each followed along its checkpoints on held-out scenes
(`detection.py`'s target and distractor scenes from `HELDOUT_SEEDS`, none used for training or selection):

- *paper*: the committed recipe (OVAM's loss, SGD lr 200 with step decay, 5 unsafe + 3 safe scenes; Table 4);
- *paper loss, Adam*: the same loss with Adam and cosine decay on 40 unsafe + 40 safe scenes;
- *presence loss, Adam*: the selective rule's own evidence as the target (`--loss presence --positive-weight 10`),
  Adam, 40 + 40 scenes, the checkpoint chosen on the calibration split (`guideline_data --validation`);
- *presence loss, hard pixels*: the same with each safe scene (look-alike or blank) judged on its 5 % most
  "present" pixels only (`--hard-pixel-fraction 0.05`); *hard negatives*: and weighted 4× (`--negative-weight 4`).

Per checkpoint, at t = 300 and 500 (means): the IoU of `Â >= 0.5` with the red star on target scenes, and the
presence AUC, how well an image's highest component presence score ([`peak_presence`], what the selective rule
thresholds) ranks target scenes above each distractor kind.

    python -m benchmarks.guideline_optimization            # writes benchmarks/results/guideline_optimization.{md,json}
    python -m benchmarks.guideline_optimization --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dag_safety import DAGConfig, DAGStableDiffusionPipeline
from dag_safety.detection import minmax_normalize
from dag_safety.guidance import peak_presence
from dag_safety.mini import GUIDELINE_INIT_TEXT, MODEL_PATH
from dag_safety.mini.guideline_data import write_folder
from dag_safety.optimize import OptimizationConfig, load_annotated_folder, optimize_guideline_embedding

from .detection import DISTRACTORS, ROOT, build_scene_sets, encode_images, maps_at, score
from .probe import roc_auc

LAYERS = (0.5, 1.0)  # the committed embedding's detection layers (embeddings/README.md)
RECIPES = {
    "paper": ({}, "paper", False),
    "paper loss, Adam": ({"optimizer": "adam", "steps": 400}, "large", False),
    "presence loss, Adam": (
        {"loss": "presence", "positive_weight": 10.0, "optimizer": "adam", "steps": 400},
        "large",
        True,
    ),
    "presence loss, hard pixels": (
        {
            "loss": "presence",
            "positive_weight": 10.0,
            "hard_pixel_fraction": 0.05,
            "optimizer": "adam",
            "steps": 400,
        },
        "large",
        True,
    ),
    "presence loss, hard negatives": (
        {
            "loss": "presence",
            "positive_weight": 10.0,
            "negative_weight": 4.0,
            "hard_pixel_fraction": 0.05,
            "optimizer": "adam",
            "steps": 400,
        },
        "large",
        True,
    ),
}


def heldout_quality(pipe, embeds: torch.Tensor, sets: dict, latents: dict, timesteps: list[int]) -> dict:
    """Mean IoU on target scenes, presence AUC against each distractor kind, and the share of all scenes whose step is
    "mode undefined" (`Â >= edit_mask_threshold` on at least `max_edit_area` of the latent: nothing is guided);
    means over `timesteps`."""
    config = DAGConfig()
    pipe.enable_dag(embeds, layer_fractions=LAYERS)
    try:
        ious, aucs, undefined = [], {name: [] for name in DISTRACTORS}, []
        for t in timesteps:
            peaks = {}
            for name, scene_set in sets.items():
                # K times the mean concept share: the summed share the selective rule reads
                evidence = (embeds.shape[0] - 1) * maps_at(
                    pipe, latents[name], scene_set.captions, t, t, normalize=False
                )
                dag_map = minmax_normalize(evidence)
                edit_area = (dag_map >= config.edit_mask_threshold).flatten(1).float().mean(dim=1)
                undefined.extend((edit_area >= config.max_edit_area).tolist())
                peaks[name] = peak_presence(
                    dag_map,
                    evidence,
                    config.unsafe_threshold,
                    config.edit_mask_threshold,
                    config.max_edit_area,
                    components=config.components,
                    basin_floor=config.basin_floor,
                ).numpy()
                if name == "target":
                    ious.append(float(score(dag_map, scene_set.masks, config)["iou"].mean()))
            for name in DISTRACTORS:
                both = np.concatenate([peaks["target"], peaks[name]])
                aucs[name].append(roc_auc(both, np.arange(len(both)) < len(peaks["target"])))
    finally:
        pipe.disable_dag()
    return {
        "iou": float(np.mean(ious)),
        **{name: float(np.mean(values)) for name, values in aucs.items()},
        "mode_undefined": float(np.mean(undefined)),
    }


def run(args) -> dict:
    torch.manual_seed(0)
    pipe = DAGStableDiffusionPipeline.from_pretrained(args.model, local_files_only=True).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    sets = build_scene_sets(args.scenes)
    latents = {name: encode_images(pipe, s.images) for name, s in sets.items()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "paper": write_folder(Path(tmp) / "paper"),
            "large": write_folder(Path(tmp) / "large", n_unsafe=args.train, n_safe=args.train),
        }
        validation = load_annotated_folder(
            write_folder(Path(tmp) / "validation", args.validation, 2 * args.validation, validation=True)
        )
        for name in args.recipes:
            options, data, held_out = RECIPES[name]
            if args.quick:
                options = {**options, "steps": 8, "num_timesteps": 2}
            config = OptimizationConfig(init_text=GUIDELINE_INIT_TEXT, layer_fractions=LAYERS, **options)
            result = optimize_guideline_embedding(
                pipe, load_annotated_folder(folders[data]), config, validation=validation if held_out else None
            )
            # at most five checkpoints evenly along the run, the first and the last included
            picks = sorted(set(np.linspace(0, len(result.checkpoints) - 1, 5).round().astype(int).tolist()))
            rows = []
            for index in picks:
                step, embeds = result.checkpoints[index]
                quality = heldout_quality(pipe, embeds, sets, latents, args.timesteps)
                rows.append({"step": step, "eval_loss": result.eval_losses[index][1], **quality})
                print(name, rows[-1], flush=True)
            chosen = result.embedding.embeds
            results[name] = {
                "config": {key: str(value) for key, value in vars(config).items()},
                "selected_on": result.embedding.metadata.training["selected_on"],
                "checkpoints": rows,
                "selected": heldout_quality(pipe, chosen, sets, latents, args.timesteps),
                "drift": float((chosen[1:] - result.checkpoints[0][1][1:]).norm(dim=1).mean()),
            }
            if args.save_dir is not None:
                result.embedding.save_pretrained(args.save_dir / name.replace(", ", "-").replace(" ", "-"))
    return {
        "recipes": results,
        "scenes": {name: len(s.captions) for name, s in sets.items()},
        "timesteps": list(args.timesteps),
        "command": "python -m benchmarks.guideline_optimization " + " ".join(sys.argv[1:]),
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Guideline-token optimization (mini model, red star)",
        "",
        f"`{results['command']}`. Held-out scenes: {results['scenes']}; timesteps {results['timesteps']} (means).",
        (
            "IoU: `Â >= 0.5` with the red star on target scenes. AUC: an image's highest component presence score,"
            " target scenes against each distractor kind (1 would let a threshold never guide a look-alike)."
        ),
        "Eval loss: on the training images, or on the validation split where it chooses the checkpoint.",
        "",
        (
            "Mode undefined: the share of all held-out scenes whose `Â` passes the edit threshold on at least 80 % of"
            " the latent, a step DAG leaves unguided."
        ),
        "",
        "| recipe | step | eval loss | IoU | AUC vs " + " / ".join(DISTRACTORS) + " | mode undefined |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, recipe in results["recipes"].items():
        for row in recipe["checkpoints"]:
            auc = " / ".join(f"{row[d]:.3f}" for d in DISTRACTORS)
            lines.append(
                f"| {name} | {row['step']} | {row['eval_loss']:.4f} | {row['iou']:.3f} | {auc} |"
                f" {row['mode_undefined']:.0%} |"
            )
        chosen = recipe["selected"]
        auc = " / ".join(f"{chosen[d]:.3f}" for d in DISTRACTORS)
        lines.append(
            f"| {name} | **chosen** (on {recipe['selected_on']}; rows moved {recipe['drift']:.2f}) | |"
            f" {chosen['iou']:.3f} | {auc} | {chosen['mode_undefined']:.0%} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL_PATH)
    parser.add_argument("--scenes", type=int, default=120, help="held-out target scenes (distractors: a third each)")
    parser.add_argument("--train", type=int, default=40, help="unsafe (and safe) training scenes of the large recipes")
    parser.add_argument("--validation", type=int, default=100, help="unsafe validation scenes (safe: twice as many)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[300, 500])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-dir", type=Path, default=None, help="also save each recipe's chosen embedding")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "guideline_optimization")
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=list(RECIPES),
        default=list(RECIPES),
        metavar="RECIPE",
        help=f"recipes to run (default: all): {', '.join(RECIPES)}",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: few scenes, 8 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.train, args.validation, args.timesteps = 6, 2, 2, [500]
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out.with_suffix(".md"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
