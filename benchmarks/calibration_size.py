"""How many validation captions a generation calibration needs for its false-detection rate to hold on new prompts.

`dag-safety calibrate --calibrate-on generations` chooses the lowest presence threshold that guides at most
`target_fpr` of the safe validation captions' unguided generations. With few captions that tail quantile is noisy:
at 5 % of 200 captions it rests on the 10th highest score. This benchmark scores, once each, the unguided
generations of

- `--safe` safe validation captions (`guideline_data.select_validation_scenes`, training seeds), and
- `--heldout` benign prompts drawn as `erase.py` draws its benign set, from held-out seeds of their own
  (`HELDOUT_SEEDS[950_000:]`, apart from every benchmark's),

then, for each calibration size `n`, draws `--draws` bootstrap samples of `n` safe captions, calibrates on each
(the calibration's own rule, `calibration._lowest_threshold`) and reports the thresholds' median and 5–95 % range
and the share of held-out benign generations each threshold would guide (the per-generation false-detection rate).

It then compares, on all the safe captions, the pooled calibration with one that bounds the rate on each
look-alike kind (`guideline_data.LOOKALIKE_KINDS`) separately, per kind of held-out benign prompt, and what each
costs: the share of `--heldout` held-out red-star prompts (`erase.py`'s *complex* kind) whose generations it guides.
The embedding's own threshold (from `dag-safety calibrate` on its validation folder) is scored the same way, so that
embeddings calibrated alike can be compared on prompts none of them saw (`--embedding`). Every score is kept in the JSON.

    python -m benchmarks.calibration_size                 # 1,000 + 200 generations (~10 min on one core)
    python -m benchmarks.calibration_size --quick         # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.calibration import _lowest_threshold, generation_presence_scores
from dag_safety.mini import HELDOUT_SEEDS, MODEL_PATH
from dag_safety.mini.guideline_data import LOOKALIKE_KINDS, lookalike_kind, select_validation_scenes

from .erase import EMBEDDING, ROOT, benign_prompts, complex_prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedding", type=Path, default=EMBEDDING, help="guideline embedding directory")
    parser.add_argument("--safe", type=int, default=1000, help="safe validation captions scored")
    parser.add_argument("--heldout", type=int, default=200, help="held-out benign prompts scored")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 500, 1000])
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap samples per size")
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument(
        "--layers", nargs="+", default=None, help="detection layers by name (default: the embedding's own)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 16 + 8 generations, 4 steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_size")
    args = parser.parse_args(argv)
    steps = 4 if args.quick else 25
    if args.quick:
        args.safe, args.heldout, args.sizes, args.draws = 16, 8, [8, 16], 50
    torch.set_num_threads(args.threads)

    pipe = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_dag(str(args.embedding), **({} if args.layers is None else {"layers": tuple(args.layers)}))
    _, safe_scenes = select_validation_scenes(n_unsafe=0, n_safe=args.safe)
    heldout = benign_prompts(args.heldout, HELDOUT_SEEDS[950_000])
    safe = generation_presence_scores(pipe, [scene.caption for scene in safe_scenes], num_inference_steps=steps)
    held = generation_presence_scores(pipe, [spec.caption for spec in heldout], num_inference_steps=steps, seed=10**6)
    stars = complex_prompts(args.heldout, HELDOUT_SEEDS[950_000])
    star_scores = generation_presence_scores(
        pipe, [spec.caption for spec in stars], num_inference_steps=steps, seed=2 * 10**6
    )
    safe_kinds = np.array([lookalike_kind(scene.objects) for scene in safe_scenes])
    held_kinds = np.array([lookalike_kind(spec.objects) for spec in heldout])

    rng = np.random.default_rng(0)
    rows = []
    for size in sorted(s for s in args.sizes if s <= len(safe)):
        thresholds = np.array(
            [_lowest_threshold(rng.choice(safe, size, replace=True), args.target_fpr) for _ in range(args.draws)]
        )
        rates = (held[None, :] >= thresholds[:, None]).mean(axis=1)
        rows.append(
            {
                "captions": size,
                "threshold_median": float(np.median(thresholds)),
                "threshold_5_95": [float(np.quantile(thresholds, 0.05)), float(np.quantile(thresholds, 0.95))],
                "heldout_fpr_median": float(np.median(rates)),
                "heldout_fpr_5_95": [float(np.quantile(rates, 0.05)), float(np.quantile(rates, 0.95))],
                "heldout_fpr_above_twice_target": float((rates > 2 * args.target_fpr).mean()),
            }
        )
    full = _lowest_threshold(safe, args.target_fpr)
    per_kind = max(
        _lowest_threshold(safe[safe_kinds == kind], args.target_fpr) for kind in LOOKALIKE_KINDS if kind in safe_kinds
    )
    rules = []
    own = pipe.dag_config.presence_threshold
    for name, threshold in (("pooled", full), ("per look-alike kind", per_kind), ("the embedding's own", own)):
        rules.append(
            {
                "rule": name,
                "threshold": threshold,
                "validation_guided": float((safe >= threshold).mean()),
                "heldout_guided": float((held >= threshold).mean()),
                "heldout_guided_by_kind": {
                    kind: [float((held[held_kinds == kind] >= threshold).mean()), int((held_kinds == kind).sum())]
                    for kind in LOOKALIKE_KINDS
                    if kind in held_kinds
                },
                "red_star_guided": float((star_scores >= threshold).mean()),
            }
        )
    results = {
        "command": "python -m benchmarks.calibration_size " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "steps": steps,
        "safe_captions": len(safe),
        "heldout_prompts": len(held),
        "target_fpr": args.target_fpr,
        "layers": pipe.dag_config.layers,
        "embedding_threshold": pipe.dag_config.presence_threshold,
        "all_captions_threshold": full,
        "all_captions_heldout_fpr": float((held >= full).mean()),
        "rows": rows,
        "rules": rules,
        "scores": {
            "safe": safe.tolist(),
            "safe_kinds": safe_kinds.tolist(),
            "heldout": held.tolist(),
            "heldout_kinds": held_kinds.tolist(),
            "red_star": star_scores.tolist(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Calibration size (mini model, red star)",
        "",
        (
            f"Command: `{results['command']}`; {results['host']}; {steps} steps, CFG 7.5. {len(safe)} safe"
            " validation"
            f" captions and {len(held)} held-out benign prompts, each generated once unguided and scored; target"
            f" {args.target_fpr:.0%} of generations guided. All {len(safe)} captions: threshold {full:.4f}, held-out"
            f" benign generations guided {results['all_captions_heldout_fpr']:.1%} (the embedding's"
            f" threshold: {results['embedding_threshold']}). Detection layers:"
            f" {list(args.layers) if args.layers else 'the embedding' + chr(39) + 's own'}."
        ),
        "",
        "| captions | threshold, median (5–95 %) | held-out benign guided, median (5–95 %) | draws guiding > 2 × target |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        low, high = row["threshold_5_95"]
        fpr_low, fpr_high = row["heldout_fpr_5_95"]
        lines.append(
            f"| {row['captions']} | {row['threshold_median']:.4f} ({low:.4f} – {high:.4f}) |"
            f" {row['heldout_fpr_median']:.1%} ({fpr_low:.1%} – {fpr_high:.1%}) |"
            f" {row['heldout_fpr_above_twice_target']:.0%} |"
        )
    kinds = [kind for kind in LOOKALIKE_KINDS if kind in held_kinds]
    lines += [
        "",
        (
            f"Pooled against per-kind calibration, on all {len(safe)} captions, and the embedding's own threshold;"
            " held-out benign generations guided,"
            f" by kind (prompts); held-out red-star prompts' generations guided ({len(star_scores)})."
        ),
        "",
        "| rule | threshold | validation guided | held-out benign guided | "
        + " | ".join(f"{kind} ({int((held_kinds == kind).sum())})" for kind in kinds)
        + " | red-star generations guided |",
        "| --- " * (5 + len(kinds)) + "|",
    ]
    for rule in rules:
        by_kind = " | ".join(f"{rule['heldout_guided_by_kind'][kind][0]:.1%}" for kind in kinds)
        lines.append(
            f"| {rule['rule']} | {rule['threshold']:.4f} | {rule['validation_guided']:.1%} |"
            f" {rule['heldout_guided']:.1%} | {by_kind} | {rule['red_star_guided']:.1%} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
