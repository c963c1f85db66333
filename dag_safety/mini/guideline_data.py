"""Annotated training folders for the red-star guideline embedding, rendered from the shapes world.

As the paper picks its 5 unsafe + 3 safe images: the unsafe scenes vary in style and background and carry
distractor objects next to the red star; the safe scenes hold only distractors of the same attribute (red
non-stars) or object (non-red stars). Scenes come from `TRAIN_SEEDS`, never from the held-out range.

Usage:

    python -m dag_safety.mini.guideline_data out/red-star-data [--filled-only]

writes the folder layout `dag-safety optimize` reads (images, `masks/`, `captions.csv`).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, TARGET_CONCEPT, TRAIN_SEEDS, Scene, render_scene

__all__ = ["LOOKALIKE_KINDS", "lookalike_kind", "select_scenes", "select_validation_scenes", "write_folder"]

# A fixed stretch of the training range, so the selection is reproducible and far from the usual seed 0 runs.
_FIRST_SEED = TRAIN_SEEDS[50_000_000]
_VALIDATION_SEED = TRAIN_SEEDS[60_000_000]


#: the groups of safe scenes a calibration bounds separately: by the look-alikes of a red star they hold
LOOKALIKE_KINDS = ("red non-star", "non-red star", "both look-alikes", "no look-alike")


def _is_target(obj) -> bool:
    return (obj.color, obj.shape) == TARGET_CONCEPT


def lookalike_kind(objects) -> str:
    """`"red star"` if `objects` (anything with `color` and `shape`: a scene's or a prompt's) hold one, else which
    of its look-alikes they hold, one of `LOOKALIKE_KINDS`."""
    if any(_is_target(obj) for obj in objects):
        return "red star"
    red = any(obj.color == TARGET_CONCEPT[0] for obj in objects)
    star = any(obj.shape == TARGET_CONCEPT[1] for obj in objects)
    return LOOKALIKE_KINDS[[red and not star, star and not red, red and star, True].index(True)]


def select_scenes(n_unsafe: int = 5, n_safe: int = 3, filled_only: bool = False) -> tuple[list[Scene], list[Scene]]:
    """The first scenes from a fixed seed onward that fill the unsafe and safe slots.

    Unsafe slot `i` wants background `i mod 3`, an outlined red star for odd `i` (filled for even `i`, or always
    with `filled_only`) and at least one distractor; safe slot `j` wants one red non-star and one non-red star and
    no red star, on background `j mod 3`.
    """
    backgrounds = list(BACKGROUNDS)
    unsafe: list[Scene | None] = [None] * n_unsafe
    safe: list[Scene | None] = [None] * n_safe
    seed = _FIRST_SEED
    while any(s is None for s in unsafe + safe):
        scene = render_scene(seed)
        seed += 1
        if filled_only and any(o.style == "outlined" for o in scene.objects):
            continue
        targets = [o for o in scene.objects if _is_target(o)]
        if len(targets) == 1 and len(scene.objects) >= 2:
            for i, slot in enumerate(unsafe):
                style = "filled" if filled_only or i % 2 == 0 else "outlined"
                if slot is None and scene.background == backgrounds[i % 3] and targets[0].style == style:
                    unsafe[i] = scene
                    break
        elif not targets:
            red_other = any(o.color == TARGET_CONCEPT[0] for o in scene.objects)
            other_star = any(o.shape == TARGET_CONCEPT[1] for o in scene.objects)
            if red_other and other_star:
                for j, slot in enumerate(safe):
                    if slot is None and scene.background == backgrounds[j % 3]:
                        safe[j] = scene
                        break
    return unsafe, safe


def select_validation_scenes(n_unsafe: int = 100, n_safe: int = 200) -> tuple[list[Scene], list[Scene]]:
    """Calibration scenes for the selective rule: from a stretch of `TRAIN_SEEDS` of its own (never the
    optimization's, never the held-out range), the first `n_unsafe` scenes with a red star and the first `n_safe`
    without, half of these with a red non-star or a non-red star (the look-alikes a threshold must pass over)."""
    unsafe: list[Scene] = []
    hard: list[Scene] = []
    easy: list[Scene] = []
    seed = _VALIDATION_SEED
    while len(unsafe) < n_unsafe or len(hard) + len(easy) < n_safe or len(hard) < n_safe // 2:
        scene = render_scene(seed)
        seed += 1
        if any(_is_target(o) for o in scene.objects):
            if len(unsafe) < n_unsafe:
                unsafe.append(scene)
        elif any(o.color == TARGET_CONCEPT[0] or o.shape == TARGET_CONCEPT[1] for o in scene.objects):
            if len(hard) < n_safe - n_safe // 2:
                hard.append(scene)
        elif len(easy) < n_safe // 2:
            easy.append(scene)
    return unsafe, hard + easy


def write_folder(
    folder: str | Path, n_unsafe: int = 5, n_safe: int = 3, filled_only: bool = False, validation: bool = False
) -> Path:
    """Renders the selected scenes into `folder`: `NAME.png`, `masks/NAME.png` (the red star) and `captions.csv`,
    whose `group` column gives each safe scene's look-alikes (`lookalike_kind`), for calibration.

    With `validation`, the scenes of [`select_validation_scenes`] (to calibrate with `dag-safety optimize
    --validation-data`) instead of [`select_scenes`].
    """
    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    unsafe, safe = (
        select_validation_scenes(n_unsafe, n_safe) if validation else select_scenes(n_unsafe, n_safe, filled_only)
    )
    rows = []
    for kind, scenes in (("unsafe", unsafe), ("safe", safe)):
        for index, scene in enumerate(scenes):
            name = f"{kind}_{index}_seed{scene.seed}.png"
            Image.fromarray(scene.image).save(folder / name)
            target = np.zeros(scene.image.shape[:2], dtype=bool)
            for obj, mask in zip(scene.objects, scene.masks):
                if _is_target(obj):
                    target |= mask
            if target.any():
                Image.fromarray(target.astype(np.uint8) * 255).save(folder / "masks" / name)
            group = "" if target.any() else lookalike_kind(scene.objects)
            rows.append({"file_name": name, "caption": scene.caption, "group": group})
    with (folder / "captions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "caption", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="output folder")
    parser.add_argument("--unsafe", type=int, default=5)
    parser.add_argument("--safe", type=int, default=3)
    parser.add_argument("--filled-only", action="store_true", help="only filled objects (generalization test)")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="calibration scenes from a seed range of their own (use with --unsafe 100 --safe 200)",
    )
    args = parser.parse_args(argv)
    folder = write_folder(args.folder, args.unsafe, args.safe, args.filled_only, args.validation)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
