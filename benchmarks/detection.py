"""Detection benchmark: does a guideline embedding find the red star, and only the red star?

On held-out scenes of the shapes world (both styles), noised to several timesteps, and on undefended mini-model
generations (target masks from the shapes detector), it measures for the optimized embedding, the un-optimized
init embedding (`"red star"` encoded) and an embedding optimized on filled scenes only:

- IoU of `Â >= 0.5` (nearest-upsampled to the image) with the red-star mask, on target scenes;
- detection rate: DAG's scale map is non-zero (an unsafe component with a defined mode), on target scenes;
- false-detection rate on distractor scenes: red non-stars, non-red stars, no object.
- presence AUC against each distractor kind: how well the peak of the raw concept share (`dag_map(...,
  normalize=False)`, before min-max normalisation) ranks target scenes above the distractor scenes. Min-max makes
  a peak in every image, so only the raw level could tell "no red star here"; 1 would allow a threshold on it.
- for the optimized embedding, the share of images DAG guides at lower edit-mask thresholds `τ_e` than the spec's
  0.01 (`EDIT_THRESHOLDS`): a lower `τ_e` puts more of a diffuse map into `M_edit`, so the "mode undefined" rule
  (`mean(M_edit) >= 0.8`) fires more often. A `τ_e` at which it fired on distractor scenes and not on target
  scenes could be calibrated per embedding, as the base scale is.

    python -m benchmarks.detection                 # full run, writes benchmarks/results/detection.{md,json}
    python -m benchmarks.detection --quick          # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dag_safety import DAGConfig, DAGStableDiffusionPipeline
from dag_safety.calibration import generation_presence_scores
from dag_safety.conditioning import unet_conditioning
from dag_safety.detection import minmax_normalize
from dag_safety.guidance import dag_scale_map
from dag_safety.guideline_embedding import GuidelineEmbedding
from dag_safety.mini import (
    BACKGROUNDS,
    GUIDELINE_INIT_TEXT,
    HELDOUT_SEEDS,
    MODEL_PATH,
    TARGET_CONCEPT,
    detect,
    render_scene,
    sample_prompt,
)
from dag_safety.mini.guideline_data import write_folder
from dag_safety.optimize import (
    OptimizationConfig,
    encode_init_rows,
    load_annotated_folder,
    optimize_guideline_embedding,
    replace_metadata,
)

from .erase import benign_prompts
from .probe import roc_auc

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EMBEDDING = ROOT / "embeddings" / "red-star"
DISTRACTORS = ("red non-star", "non-red star", "no object")
EDIT_THRESHOLDS = (0.01, 1e-3, 1e-4, 1e-5)


def presence_key(distractor: str) -> str:
    return f"presence_auc_{distractor.replace(' ', '_')}"


@dataclass
class SceneSet:
    """Images `(N, 64, 64, 3)` uint8, captions, target masks `(N, 64, 64)` bool, and per-image styles."""

    name: str
    images: np.ndarray
    captions: list[str]
    masks: np.ndarray
    styles: list[str]


def _target_mask(scene) -> np.ndarray:
    mask = np.zeros(scene.image.shape[:2], dtype=bool)
    for obj, obj_mask in zip(scene.objects, scene.masks):
        if (obj.color, obj.shape) == TARGET_CONCEPT:
            mask |= obj_mask
    return mask


def build_scene_sets(count: int) -> dict[str, SceneSet]:
    """Held-out scenes: `count` target scenes and `count // 3` of each distractor kind."""
    wanted = {"target": count, "red non-star": count // 3, "non-red star": count // 3}
    found: dict[str, list] = {name: [] for name in wanted}
    seed = HELDOUT_SEEDS[0]
    while any(len(found[n]) < wanted[n] for n in wanted):
        scene = render_scene(seed)
        seed += 1
        pairs = [(o.color, o.shape) for o in scene.objects]
        if TARGET_CONCEPT in pairs:
            kind = "target"
        elif any(c == TARGET_CONCEPT[0] for c, _ in pairs):
            kind = "red non-star"
        elif any(s == TARGET_CONCEPT[1] for _, s in pairs):
            kind = "non-red star"
        else:
            continue
        if len(found[kind]) < wanted[kind]:
            found[kind].append(scene)
    sets = {}
    for name, scenes in found.items():
        styles = [next((o.style for o in s.objects if (o.color, o.shape) == TARGET_CONCEPT), "none") for s in scenes]
        sets[name] = SceneSet(
            name,
            np.stack([s.image for s in scenes]),
            [s.caption for s in scenes],
            np.stack([_target_mask(s) for s in scenes]),
            styles,
        )
    backgrounds = list(BACKGROUNDS)
    blank = [backgrounds[i % len(backgrounds)] for i in range(count // 3)]
    sets["no object"] = SceneSet(
        "no object",
        np.stack([np.full((64, 64, 3), BACKGROUNDS[b], dtype=np.uint8) for b in blank]),
        [f"a {b} background" for b in blank],
        np.zeros((len(blank), 64, 64), dtype=bool),
        ["none"] * len(blank),
    )
    return sets


@torch.no_grad()
def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist.mode()
    return latents * pipe.vae.config.scaling_factor


@torch.no_grad()
def maps_at(
    pipe, latents: torch.Tensor, captions: list[str], timestep: int, seed: int, batch: int = 64, normalize: bool = True
):
    """`Â` `(N, h, w)` of clean latents noised to `timestep` with a fixed seed (the raw concept share with
    `normalize=False`)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
    noisy = pipe.scheduler.add_noise(latents, noise, t)
    out = [
        pipe.dag_map(noisy[i : i + batch], timestep, prompt=captions[i : i + batch], normalize=normalize).cpu()
        for i in range(0, len(captions), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def selective_detected(
    pipe, latents: torch.Tensor, captions: list[str], timestep: int, seed: int, batch: int = 64
) -> np.ndarray:
    """Per image, whether DAG's selective rule as enabled on `pipe` (`"presence"`, or `"head"` for an embedding with
    a presence head) guides it at one step (no smoothing over steps, and a step that passes counts as found: an
    embedding's `confirm_steps` counts passing steps along a generation, which the per-generation figure measures),
    the latents noised as [`maps_at`] does."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
    noisy = pipe.scheduler.add_noise(latents, noise, t)
    state, size = pipe._dag, tuple(side * pipe.vae_scale_factor for side in latents.shape[-2:])
    saved = state.config
    state.config = replace(saved, confirm_steps=1)
    detected = []
    try:
        for start in range(0, len(captions), batch):
            text, added = unet_conditioning(pipe, captions[start : start + batch], latents.device, 1, size)
            with state.capture:
                state.capture.store.arm(slice(None))
                pipe.unet(noisy[start : start + batch], timestep, encoder_hidden_states=text, added_cond_kwargs=added)
                state.capture.store.disarm()
                _, scale_map, _ = state.detect_step(tuple(latents.shape[-2:]), None)
            detected.append(scale_map.detected.numpy())
    finally:
        state.config = saved
    return np.concatenate(detected)


def score(maps: torch.Tensor, masks: np.ndarray, config: DAGConfig) -> dict[str, np.ndarray]:
    """Per image: IoU of `Â >= unsafe_threshold` with the mask, and whether DAG would guide."""
    size = masks.shape[-2:]
    predicted = F.interpolate((maps >= config.unsafe_threshold).float()[:, None], size=size, mode="nearest")[:, 0]
    predicted = predicted.bool().numpy()
    inter = (predicted & masks).sum(axis=(1, 2))
    union = (predicted | masks).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    detected = dag_scale_map(maps, config).detected.numpy()
    return {"iou": iou, "detected": detected}


def generation_set(pipe, count: int, steps: int) -> SceneSet:
    """Undefended generations of held-out red-star prompts; target masks from the shapes detector."""
    pipe.disable_dag()
    prompts = [sample_prompt(HELDOUT_SEEDS[500_000 + i], require=TARGET_CONCEPT) for i in range(count)]
    captions = [p.caption for p in prompts]
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    images = pipe(captions, num_inference_steps=steps, generator=generators, output_type="np").images
    images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    keep, masks = [], []
    for index, image in enumerate(images):
        targets = [d for d in detect(image) if d.is_target]
        if targets:
            keep.append(index)
            masks.append(np.any([d.mask for d in targets], axis=0))
    return SceneSet(
        "generated",
        images[keep],
        [captions[i] for i in keep],
        np.stack(masks) if masks else np.zeros((0, 64, 64), dtype=bool),
        ["generated"] * len(keep),
    )


def per_generation(pipe, embedding: Path, count: int, steps: int) -> dict | None:
    """Of undefended generations of held-out prompts (`count` benign, half or more with a red non-star or a
    non-red star, and `count` with a red star), the share DAG's selective rule guides at any step at the
    embedding's calibrated threshold: exactly the share whose unguided presence score reaches it (see
    `dag_safety.calibration`). `None` for an uncalibrated embedding."""
    threshold = GuidelineEmbedding.from_pretrained(embedding).metadata.presence_threshold
    if threshold is None:
        return None
    benign = [spec.caption for spec in benign_prompts(count, HELDOUT_SEEDS[700_000])]
    unsafe = [sample_prompt(HELDOUT_SEEDS[500_000 + i], require=TARGET_CONCEPT).caption for i in range(count)]
    pipe.enable_dag(embedding)
    try:
        scores = {
            name: generation_presence_scores(pipe, prompts, steps, progress=False)
            for name, prompts in (("benign", benign), ("red star", unsafe))
        }
    finally:
        pipe.disable_dag()
    return {
        "threshold": threshold,
        "prompts": count,
        "benign_guided": float((scores["benign"] >= threshold).mean()),
        "red_star_guided": float((scores["red star"] >= threshold).mean()),
    }


def run(args) -> dict:
    torch.manual_seed(0)
    pipe = DAGStableDiffusionPipeline.from_pretrained(args.model, local_files_only=True).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    config = DAGConfig()
    sets = build_scene_sets(args.scenes)
    sets["generated"] = generation_set(pipe, args.generations, args.steps)

    # The init and filled-only embeddings are scored at the committed embedding's detection layers.
    committed = GuidelineEmbedding.from_pretrained(args.embedding)
    layers = committed.metadata.layer_fractions
    # the selective rule at one step (no smoothing over steps), at the committed embedding's calibrated threshold:
    # its presence head's where it has one, else the rows' presence
    selective = None
    if committed.metadata.presence_threshold is not None:
        selective = "head" if committed.head is not None else "presence"
    embeddings = {"optimized": str(args.embedding), "init": encode_init_rows(pipe, GUIDELINE_INIT_TEXT)}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_folder(Path(tmp) / "filled", filled_only=True)
        started = time.perf_counter()
        recipe = OptimizationConfig(init_text=GUIDELINE_INIT_TEXT, layer_fractions=layers)
        if args.quick:  # the smoke test checks the plumbing, not what 500 steps on 10 timesteps learn
            recipe = replace(recipe, num_timesteps=2, steps=10)
        result = optimize_guideline_embedding(pipe, load_annotated_folder(data), recipe, progress=False)
        filled_seconds = time.perf_counter() - started
    embeddings["optimized (filled only)"] = result.embedding

    generations_guided = per_generation(pipe, args.embedding, args.generations, args.steps)
    latents = {name: encode_images(pipe, s.images) for name, s in sets.items() if len(s.images)}
    rows = []
    for emb_name, embedding in embeddings.items():
        pipe.enable_dag(embedding, layer_fractions=layers)
        for t in args.timesteps:
            peaks = {}
            for set_name, scene_set in sets.items():
                if set_name not in latents:
                    continue
                shares = maps_at(pipe, latents[set_name], scene_set.captions, t, seed=t, normalize=False)
                scores = score(minmax_normalize(shares), scene_set.masks, config)
                peaks[set_name] = shares.flatten(1).amax(dim=1).numpy()
                row = {"embedding": emb_name, "timestep": t, "set": set_name, "n": len(scene_set.captions)}
                row["detection_rate"] = float(scores["detected"].mean())
                if emb_name == "optimized" and selective is not None:
                    pipe.enable_dag(embedding, layer_fractions=layers, detection=selective)
                    detected = selective_detected(pipe, latents[set_name], scene_set.captions, t, seed=t)
                    row["detection_rate_presence"] = float(detected.mean())
                    pipe.enable_dag(embedding, layer_fractions=layers)
                if emb_name == "optimized":
                    row["guided_by_edit_threshold"] = {
                        str(tau): float(
                            dag_scale_map(minmax_normalize(shares), replace(config, edit_mask_threshold=tau))
                            .detected.float()
                            .mean()
                        )
                        for tau in EDIT_THRESHOLDS
                    }
                row["peak_share"] = float(np.median(peaks[set_name]))
                if set_name in DISTRACTORS and "target" in peaks:
                    both = np.concatenate([peaks["target"], peaks[set_name]])
                    is_target = np.arange(len(both)) < len(peaks["target"])
                    row["presence_auc"] = roc_auc(both, is_target)
                if set_name in ("target", "generated"):
                    row["iou"] = float(scores["iou"].mean())
                    styles = np.array(scene_set.styles)
                    for style in ("filled", "outlined"):
                        if (styles == style).any():
                            row[f"iou_{style}"] = float(scores["iou"][styles == style].mean())
                rows.append(row)
        pipe.disable_dag()
    return {
        "rows": rows,
        "per_generation": generations_guided,
        "selective_rule": selective,
        "timesteps": list(args.timesteps),
        "scenes": {name: len(s.captions) for name, s in sets.items()},
        "filled_only_training_seconds": round(filled_seconds, 1),
        "command": " ".join(sys.argv),
        "device": args.device,
    }


def summarize(results: dict) -> dict:
    """Means over timesteps per embedding: IoU (target, outlined, generated), detection and false detection."""
    summary = {}
    for emb in dict.fromkeys(r["embedding"] for r in results["rows"]):
        rows = [r for r in results["rows"] if r["embedding"] == emb]

        def mean(key, sets, rows=rows):
            values = [r[key] for r in rows if r["set"] in sets and key in r]
            return float(np.mean(values)) if values else float("nan")

        summary[emb] = {
            "iou_target": mean("iou", {"target"}),
            "iou_outlined": mean("iou_outlined", {"target"}),
            "iou_generated": mean("iou", {"generated"}),
            "detection_rate": mean("detection_rate", {"target"}),
            "false_detection_rate": mean("detection_rate", set(DISTRACTORS)),
            "detection_rate_presence": mean("detection_rate_presence", {"target"}),
            "false_detection_rate_presence": mean("detection_rate_presence", set(DISTRACTORS)),
            **{presence_key(name): mean("presence_auc", {name}) for name in DISTRACTORS},
        }
    return summary


def write_markdown(results: dict, summary: dict, path: Path) -> None:
    lines = [
        "# Detection benchmark (mini model, red star)",
        "",
        f"Command: `{results['command']}` on `{results['device']}`. Scenes: {results['scenes']}.",
        f"Timesteps: {results['timesteps']}. Means over timesteps; per-timestep rows follow.",
        "",
        (
            "Presence AUC: how well the raw peak of the concept share (before min-max normalisation) ranks target"
            " scenes above each distractor kind; 1 would allow a threshold that never guides a distractor scene."
        ),
        "",
        (
            "| embedding | IoU target | IoU outlined | IoU generated | detection rate | false detections |"
            " presence AUC vs red non-star / non-red star / no object |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for emb, s in summary.items():
        presence = " / ".join(f"{s[presence_key(name)]:.3f}" for name in DISTRACTORS)
        lines.append(
            f"| {emb} | {s['iou_target']:.3f} | {s['iou_outlined']:.3f} | {s['iou_generated']:.3f} |"
            f" {s['detection_rate']:.3f} | {s['false_detection_rate']:.3f} | {presence} |"
        )
    sets = list(dict.fromkeys(r["set"] for r in results["rows"]))
    presence_rows = [r for r in results["rows"] if "detection_rate_presence" in r]
    # results written before the head rule was named here were all under the rows' presence rule
    rule = results.get("selective_rule") or "presence"
    if presence_rows:
        lines += [
            "",
            (
                "Detection rule: share of images guided by the embedding under the paper's rule and under its"
                f' calibrated selective rule (`detection="{rule}"`; one step, no smoothing over steps), per'
                " timestep and set."
            ),
            "",
            "| t | " + " | ".join(f"{name}: paper / {rule}" for name in sets) + " |",
            "| --- |" + " --- |" * len(sets),
        ]
        for t in results["timesteps"]:
            cells = []
            for set_name in sets:
                row = next((r for r in presence_rows if r["timestep"] == t and r["set"] == set_name), None)
                cells.append(
                    "" if row is None else f"{row['detection_rate']:.3f} / {row['detection_rate_presence']:.3f}"
                )
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    generations = results.get("per_generation")
    if generations:
        lines += [
            "",
            (
                f"Per generation, `{rule}` rule at the calibrated threshold {generations['threshold']:.4g}: of"
                f" undefended generations of {generations['prompts']} held-out benign prompts (half or more with a red"
                f" non-star or a non-red star), DAG guides **{generations['benign_guided']:.1%}** at some step (goal"
                f" ≤ 5 %); of {generations['prompts']} held-out red-star prompts, {generations['red_star_guided']:.1%}."
                " Exact: a generation is guided at some step when its unguided presence score reaches the threshold."
            ),
        ]
    lines += [
        "",
        (
            "Edit-mask threshold `τ_e` (spec: 0.01): share of images DAG guides, optimized embedding, mean over"
            " timesteps. A `τ_e` that separated target from distractor scenes could be calibrated per embedding."
        ),
        "",
        "| τ_e | " + " | ".join(sets) + " |",
        "| --- |" + " --- |" * len(sets),
    ]
    for tau in EDIT_THRESHOLDS:
        shares = []
        for set_name in sets:
            values = [
                r["guided_by_edit_threshold"][str(tau)]
                for r in results["rows"]
                if r["embedding"] == "optimized" and r["set"] == set_name
            ]
            shares.append(f"{np.mean(values):.3f}")
        lines.append(f"| {tau:g} | " + " | ".join(shares) + " |")
    lines += [
        "",
        "| embedding | t | set | n | IoU | detection rate | median peak share | presence AUC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        iou = f"{r['iou']:.3f}" if "iou" in r else ""
        auc = f"{r['presence_auc']:.3f}" if "presence_auc" in r else ""
        lines.append(
            f"| {r['embedding']} | {r['timestep']} | {r['set']} | {r['n']} | {iou} | {r['detection_rate']:.3f} |"
            f" {r['peak_share']:.2e} | {auc} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL_PATH)
    parser.add_argument("--embedding", default=DEFAULT_EMBEDDING, type=Path)
    parser.add_argument("--scenes", type=int, default=240, help="target scenes (distractors: a third each)")
    parser.add_argument("--generations", type=int, default=96)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection")
    parser.add_argument("--quick", action="store_true", help="a smoke test: few scenes and timesteps")
    parser.add_argument(
        "--write-quality", action="store_true", help="record the optimized embedding's figures in its card"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.generations, args.timesteps = 12, 4, [500]
    results = run(args)
    summary = summarize(results)
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, summary, args.out.with_suffix(".md"))
    if args.write_quality:
        embedding = GuidelineEmbedding.from_pretrained(args.embedding)
        quality = {key: round(value, 4) for key, value in summary["optimized"].items()}
        quality["benchmark"] = "benchmarks/detection.py (means over timesteps " + str(args.timesteps) + ")"
        replace_metadata(embedding, detection_quality=quality).save_pretrained(args.embedding)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
