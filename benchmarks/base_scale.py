"""Calibration sweep of DAG's AreaScaler base scale (and fill decay) for a guideline embedding on the mini model.

The base scale (the numerator of `s̄ = base_scale / (h·w)`, spec section 3) is the one DAG setting the committed
red-star embedding changes by a large factor (`embeddings/README.md`). This script is how it was chosen: DAG + SEGA
at each base scale on *tuning* seeds 1000-1003, which neither `erase.py` (seeds 0-3) nor the tests use, on
`erase.py`'s *target* prompts and *complex* prompts of their own (red star plus one or two objects, drawn from
held-out seeds 100,800,000 on, apart from `erase.py`'s). Per base scale: red stars left (shapes detector), prompted
co-objects kept, PSNR outside the red stars to the undefended image of the same seed (complex set).
`--fill-decays` crosses the scales with `DAGConfig.fill_decay` values (`none`: the full-scale fill),
`--fill-regions` with `DAGConfig.fill_region` values and `--norm-caps` with `DAGConfig.norm_cap` values (`none`: no
cap); `--erase-mode` sets `DAGConfig.erase_mode` for the whole sweep.

    python -m benchmarks.base_scale                    # the documented sweep (~3 min on 2 CPU cores)
    python -m benchmarks.base_scale --scales 800 1600 --fill-decays none 1 2 --out benchmarks/results/fill_decay
    python -m benchmarks.base_scale --quick            # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.config import ERASE_MODES, FILL_REGIONS, HOLD_REGIONS
from dag_safety.guideline_embedding import GuidelineEmbedding
from dag_safety.mini import HELDOUT_SEEDS, MODEL_PATH, SAFETY_CONCEPT_TEXT

from .erase import (
    EMBEDDING,
    ROOT,
    PromptSet,
    add_dag_options,
    complex_prompts,
    format_residue,
    generate,
    prompt_sets,
    score_set,
)

TUNING_SEEDS = (1000, 1001, 1002, 1003)
SCALES = (5.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)


def run(args) -> dict:
    pipe = DAGStableDiffusionPipeline.from_pretrained(args.model, local_files_only=True).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(args.seeds)
    sets = {
        "target": prompt_sets(args.target_prompts * 2)["target"],
        "complex": PromptSet("complex", complex_prompts(args.complex_prompts, HELDOUT_SEEDS[800_000])),
    }
    references = {name: generate(pipe, prompt_set, seeds, args.steps, {}) for name, prompt_set in sets.items()}
    undefended = {name: score_set(sets[name], seeds, images, images) for name, images in references.items()}
    embedding = GuidelineEmbedding.from_pretrained(args.embedding)
    rows = []
    grid = itertools.product(args.norm_caps, args.fill_regions, args.fill_decays, args.scales)
    for cap, region, decay, scale in grid:
        pipe.enable_dag(
            embedding,
            guidance="sega",
            base_scale=scale,
            fill_decay=decay,
            fill_region=region,
            norm_cap=cap,
            hold_detection=args.hold_detection,
            erase_mode=args.erase_mode,
            **({"hold_region": args.hold_region} if args.hold_detection else {}),
            **dict(args.dag_options),
        )
        scores = {}
        try:
            for name, prompt_set in sets.items():
                images = generate(pipe, prompt_set, seeds, args.steps, {"safety_concept": SAFETY_CONCEPT_TEXT})
                scores[name] = score_set(prompt_set, seeds, images, references[name])
        finally:
            pipe.disable_dag()
        rows.append(
            {
                "base_scale": scale,
                "fill_decay": decay,
                "fill_region": region,
                "norm_cap": cap,
                "erase_mode": args.erase_mode,
                "red_stars_left": sum(s["target_detections"] for s in scores.values()),
                "co_objects_kept": scores["complex"]["benign_objects_found"],
                "psnr_outside_complex": scores["complex"]["psnr_outside"],
                "star_residue": {name: scores[name]["star_residue"] for name in sets},
            }
        )
        print(
            f"base scale {scale:g}, fill decay {decay}, fill region {region}, norm cap {cap}: {rows[-1]}",
            file=sys.stderr,
        )
    return {
        "undefended": {
            "red_stars": sum(s["target_detections"] for s in undefended.values()),
            "co_objects_kept": undefended["complex"]["benign_objects_found"],
            "co_objects_prompted": undefended["complex"]["benign_objects_prompted"],
        },
        "sets": {name: len(prompt_set.prompts) for name, prompt_set in sets.items()},
        "rows": rows,
    }


def write_markdown(output: dict, command: str, path: Path) -> None:
    base = output["undefended"]
    lines = [
        "# AreaScaler base-scale sweep (mini model, DAG + SEGA)",
        "",
        (
            f"Command: `{command}`. Prompts: {output['sets']} × seeds {output['seeds']}. Undefended: "
            f"{base['red_stars']} red stars; {base['co_objects_kept']} of {base['co_objects_prompted']} prompted "
            "co-objects drawn (complex)."
        ),
        "",
        (
            "| base scale | fill region | fill decay | norm cap | erase mode | red stars left | co-objects kept"
            " | PSNR out (complex, dB) | star residue target / complex |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in output["rows"]:
        psnr = "identical" if row["psnr_outside_complex"] is None else f"{row['psnr_outside_complex']:.1f}"
        decay = "full" if row.get("fill_decay") is None else f"{row['fill_decay']:g}"
        cap = "none" if row.get("norm_cap") is None else f"{row['norm_cap']:g}"
        lines.append(
            f"| {row['base_scale']:g} | {row.get('fill_region', 'nearest')} | {decay} | {cap}"
            f" | {row.get('erase_mode', 'guidance')} | {row['red_stars_left']}"
            f" | {row['co_objects_kept']} | {psnr} | {format_residue(row)} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL_PATH)
    parser.add_argument("--embedding", type=Path, default=EMBEDDING, help="guideline embedding directory")
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument(
        "--fill-decays",
        type=_optional_float,
        nargs="+",
        default=[None],
        metavar="DECAY",
        help="DAGConfig.fill_decay values to cross with the scales ('none': the full-scale fill, the default)",
    )
    parser.add_argument(
        "--fill-regions",
        nargs="+",
        choices=FILL_REGIONS,
        default=["nearest"],
        help="DAGConfig.fill_region values to cross with the scales (default: nearest, the paper's fill)",
    )
    parser.add_argument(
        "--norm-caps",
        type=_optional_float,
        nargs="+",
        default=[None],
        metavar="CAP",
        help="DAGConfig.norm_cap values to cross with the scales ('none': no cap, the default)",
    )
    parser.add_argument(
        "--hold-detection",
        action="store_true",
        help="under a selective rule, hold what earlier steps guided (DAGConfig.hold_detection)",
    )
    parser.add_argument(
        "--erase-mode",
        choices=ERASE_MODES,
        default="guidance",
        help="DAGConfig.erase_mode (default: guidance, the paper's)",
    )
    parser.add_argument(
        "--hold-region",
        choices=HOLD_REGIONS,
        default="component",
        help="with --hold-detection, DAGConfig.hold_region (default: component)",
    )
    add_dag_options(parser, "further enable_dag options for the whole sweep, VALUE as JSON (e.g. fill_window=1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TUNING_SEEDS))
    parser.add_argument("--target-prompts", type=int, default=6, help="of erase.py's target set (at most 6)")
    parser.add_argument("--complex-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "base_scale")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 scales, 2 + 2 prompts, 1 seed, 8 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.scales, args.seeds, args.target_prompts, args.complex_prompts, args.steps = [5.0, 800.0], [1000], 2, 2, 8
    output = run(args)
    output["seeds"] = list(args.seeds)
    command = "python -m benchmarks.base_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, **output}, indent=2) + "\n")
    write_markdown(output, command.strip(), args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
