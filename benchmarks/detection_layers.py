"""Which cross-attention layers should DAG's selective rule read? Presence AUC per detection-layer set.

The paper reads the 16² and 32² layers of SD's 64² latent (`layer_fractions=(0.25, 0.5)`); the committed red-star
embedding reads the 1/2- and full-side layers of the mini model's 16² latent (`(0.5, 1.0)`), and
`benchmarks/probe.py` finds the layers' inputs separate a red star from its look-alikes very unequally
(`up_blocks.2.attentions.0` best). This study scores, for each candidate set of layers (`DAGConfig.layers`), the
presence scores the selective rule would see ([`calibration.presence_scores`]: each validation image noised along
a 25-step sampler's guided timesteps, the highest component score over the steps; one pass over all layers scores
every candidate) and reports how well they rank
the red-star scenes (the score on the star's region) above the safe scenes of each look-alike kind: the ROC AUC,
and the share of red stars guided at the threshold that guides at most 5 % of each safe kind (a per-kind
calibration, `calibrate_presence` with groups). Also the per-image AUC, any component of a red-star scene against
all safe scenes, which is what a gate on whole generations sees. Every score is kept in the JSON.

Scenes: `guideline_data.select_validation_scenes` (training seeds of their own, as `dag-safety calibrate` uses).
Embeddings: the committed one and its un-optimized init (`encode_init_rows` of "red star").

`--evidence` also tries other per-pixel evidence than the one DAG reads (`sum`: the concept rows' summed share,
[`concept_presence`]): `min` and `geo` (an AND of the rows: `K` times their minimum or geometric mean) and
`row<k>` (`K` times row `k` alone, 1-based). The factor `K` keeps every rule on the sum's scale; ranks and the
components (min-max normalised maps) do not depend on it.

    python -m benchmarks.detection_layers              # writes benchmarks/results/detection_layers.{md,json}
    python -m benchmarks.detection_layers --quick      # smoke test
    python -m benchmarks.detection_layers --embeddings committed --evidence sum min geo row1 row2 \
        --candidates "fractions (0.5, 1.0) (committed)" up_blocks.2.attentions.1 --out benchmarks/results/concept_rows
    python -m benchmarks.detection_layers --model /root/dag-train/eval/step7500/model --embeddings init  # a model in training
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.attention import attention_blocks, cross_attention_layers, select_layers
from dag_safety.calibration import _lowest_threshold, presence_scores
from dag_safety.detection import concept_presence
from dag_safety.mini import GUIDELINE_INIT_TEXT, MODEL_PATH
from dag_safety.mini.guideline_data import LOOKALIKE_KINDS, write_folder
from dag_safety.optimize import encode_init_rows, load_annotated_folder

from .erase import EMBEDDING, ROOT
from .probe import roc_auc


def candidate_sets(unet) -> dict[str, list[str]]:
    """Each cross-attention block alone, the up-sampling path's last block pair, and the layers of the paper's
    fractions, the committed embedding's and the full-side ones; as processor names."""
    layers = cross_attention_layers(unet)
    blocks = attention_blocks(layers)
    sets = {block: list(select_layers(layers, (block,))) for block in blocks}
    sets["up_blocks.2 (both)"] = list(select_layers(layers, ("up_blocks.2",)))
    for label, fractions in (
        ("fractions (0.25, 0.5) (paper)", (0.25, 0.5)),
        ("fractions (0.5, 1.0) (committed)", (0.5, 1.0)),
        ("fraction 1.0", (1.0,)),
    ):
        sets[label] = [name for name, factor in layers.items() if any(abs(1 / factor - f) < 1e-6 for f in fractions)]
    return sets


def evidence_rule(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-pixel evidence named `name` (see the module docstring): `(B, 1+K, h, w) -> (B, h, w)`."""
    if name == "sum":
        return concept_presence
    if name == "min":
        return lambda maps: (maps.shape[1] - 1) * maps[:, 1:].amin(dim=1)
    if name == "geo":
        return lambda maps: (maps.shape[1] - 1) * maps[:, 1:].clamp_min(1e-12).log().mean(dim=1).exp()
    if name.startswith("row") and name[3:].isdigit() and int(name[3:]) >= 1:
        row = int(name[3:])
        return lambda maps: (maps.shape[1] - 1) * maps[:, row]
    raise argparse.ArgumentTypeError(f"unknown evidence {name!r}; expected sum, min, geo or row<k> (k >= 1)")


def _evidence_name(name: str) -> str:
    evidence_rule(name)
    return name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=MODEL_PATH,
        help="a mini-model directory (default: the bundled one; the committed embedding fits only that one)",
    )
    parser.add_argument("--unsafe", type=int, default=100, help="red-star validation scenes")
    parser.add_argument("--safe", type=int, default=300, help="safe validation scenes (half with a look-alike)")
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--evidence",
        type=_evidence_name,
        nargs="+",
        default=["sum"],
        metavar="RULE",
        help="per-pixel evidence rules: sum (DAG's, the default), min, geo, row<k>",
    )
    parser.add_argument(
        "--embeddings", nargs="+", choices=["committed", "init"], default=["committed", "init"], metavar="NAME"
    )
    parser.add_argument("--candidates", nargs="+", default=None, metavar="SET", help="layer sets (default: all)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 4 + 8 scenes, 8 steps, 3 layer sets")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection_layers")
    args = parser.parse_args(argv)
    steps = 8 if args.quick else 25
    if args.quick:
        args.unsafe, args.safe = 4, 8
    torch.set_num_threads(args.threads)

    pipe = DAGStableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as folder:
        images = load_annotated_folder(write_folder(folder, args.unsafe, args.safe, validation=True))
    unsafe = np.array([item.unsafe for item in images])
    kinds = np.array([item.group or "red star" for item in images])
    embeddings = {"committed": lambda: EMBEDDING, "init": lambda: encode_init_rows(pipe, GUIDELINE_INIT_TEXT)}
    rules = {name: evidence_rule(name) for name in args.evidence}
    sets = candidate_sets(pipe.unet)
    if args.candidates is not None:
        unknown = sorted(set(args.candidates) - set(sets))
        if unknown:
            parser.error(f"unknown --candidates {unknown}; the layer sets are {sorted(sets)}")
        sets = {name: sets[name] for name in args.candidates}
    elif args.quick:
        sets = dict(list(sets.items())[-3:])
    rows = []
    for embedding_name, rule_name in itertools.product(args.embeddings, rules):
        # every layer captured once; each candidate scored from the same passes (`presence_scores(layer_sets=)`)
        pipe.enable_dag(embeddings[embedding_name](), detection="paper", layer_fractions=(0.25, 0.5, 1.0))
        try:
            all_scores = presence_scores(
                pipe, images, num_inference_steps=steps, progress=False, layer_sets=sets, evidence=rules[rule_name]
            )
        finally:
            pipe.disable_dag()
        for set_name, scores in all_scores.items():
            safe_scores = scores.any[~unsafe]
            threshold = _lowest_threshold(safe_scores, args.target_fpr, kinds[~unsafe])
            row = {
                "embedding": embedding_name,
                "layers": set_name,
                "evidence": rule_name,
                "red_stars_guided": float((scores.target[unsafe] >= threshold).mean()),
                "threshold": threshold,
            }
            for kind in LOOKALIKE_KINDS:
                chosen = kinds[~unsafe] == kind
                if chosen.any():
                    both = np.concatenate([scores.target[unsafe], safe_scores[chosen]])
                    labels = np.arange(len(both)) < unsafe.sum()
                    row[f"auc vs {kind}"] = roc_auc(np.nan_to_num(both, neginf=-1.0), labels)
            # per image, as a gate on whole generations sees it: any component of a red-star scene
            both = np.concatenate([scores.any[unsafe], safe_scores])
            row["image auc vs all safe"] = roc_auc(
                np.nan_to_num(both, neginf=-1.0), np.arange(len(both)) < unsafe.sum()
            )
            row["scores"] = {"any": scores.any.tolist(), "target": scores.target.tolist()}
            rows.append(row)
            print(json.dumps({key: value for key, value in row.items() if key != "scores"}), flush=True)

    results = {
        "command": "python -m benchmarks.detection_layers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "steps": steps,
        "scenes": {kind: int((kinds == kind).sum()) for kind in ("red star", *LOOKALIKE_KINDS)},
        "target_fpr": args.target_fpr,
        "kinds": kinds.tolist(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    kind_columns = [key for key in rows[0] if "auc vs" in key]
    lines = [
        "# Detection layers (mini model, red star)",
        "",
        (
            f"Command: `{results['command']}`; {results['host']}; {steps}-step sampler's guided timesteps. Scenes:"
            f" {results['scenes']}. Presence AUC of the red-star scenes (score on the star) against the safe scenes"
            f" of each kind; per image (any component) against all safe scenes; and red stars guided at the lowest"
            f" threshold that guides at most"
            f" {args.target_fpr:.0%} of each safe kind."
        ),
        "",
        "| embedding | layers | evidence | " + " | ".join(kind_columns) + " | red stars guided |",
        "| --- " * (4 + len(kind_columns)) + "|",
    ]
    for row in rows:
        aucs = " | ".join(f"{row[key]:.3f}" for key in kind_columns)
        lines.append(
            f"| {row['embedding']} | {row['layers']} | {row['evidence']} | {aucs} | {row['red_stars_guided']:.0%} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
