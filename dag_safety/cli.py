"""`dag-safety` command line: safe generation (the bundled mini model by default) and guideline optimization.

Examples:

    dag-safety generate "a red star and a blue circle on a white background" --compare
    dag-safety generate "a red star on a gray background" --guidance off --out plain.png
    dag-safety optimize ./data --init-text "red star" --safety-concept "a red star" --out ./red-star-embedding
    dag-safety calibrate ./red-star-embedding --validation-data ./validation --out ./red-star-embedding --overwrite

Every option is checked when the command line is parsed, and the output paths before any model is loaded. An
error is one line on stderr, `dag-safety: error: ...`, with exit status 2 (argparse's convention); `--debug`
shows the traceback instead, and leaves the logging and loading progress bars of diffusers and transformers as
they are (as do their own `DIFFUSERS_VERBOSITY` / `TRANSFORMERS_VERBOSITY` environment variables, each for its
library).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import COMPONENT_RULES, ERASE_MODES, FILL_REGIONS, HEAD_CAPTION_SWAPS, HEAD_POOLINGS

__all__ = ["build_parser", "main"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SEED = 2**63 - 1
DENOISING_BAR = {"desc": "Denoising", "delay": 2.0, "leave": False}  # tqdm: shown only on runs longer than 2 s


class CommandError(Exception):
    """A problem with the command line found while running it (an output path, a missing option): printed as
    `dag-safety: error: ...` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `dag-safety: error: <message> (see 'dag-safety generate --help')`."""

    def error(self, message: str):
        self.exit(2, f"dag-safety: error: {message} (see '{self.prog} --help')\n")


# 1. Option types: each parses one value or raises `ArgumentTypeError` saying what was expected


def _number(
    kind: type,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    multiple_of: int | None = None,
) -> Callable[[str], int | float]:
    """An argparse `type=`: a finite `kind` (`int` or `float`) within the bounds, else `ArgumentTypeError`."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"<= {'2**63 - 1' if high == MAX_SEED else high}")
    if multiple_of is not None:
        parts.append(f"a multiple of {multiple_of}")
    noun = "an integer" if kind is int else "a finite number"
    expected = noun + (f" {' and '.join(parts)}" if parts else "")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (
            (kind is float and not math.isfinite(value))
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and value > high)
            or (multiple_of is not None and value % multiple_of)
        ):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _number(int, low=1)
SEED = _number(int, low=0, high=MAX_SEED)
IMAGE_SIDE = _number(int, low=8, multiple_of=8)
FRACTION = _number(float, low=0, low_open=True, high=1)


def _edit_threshold(text: str) -> float | str:
    """`auto`, or a number in (0, 1]."""
    if text == "auto":
        return text
    try:
        return FRACTION(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a finite number > 0 and <= 1, got {text!r}") from None


def _text(text: str) -> str:
    """A non-blank text."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty text")
    return text


def _repo_id(text: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise argparse.ArgumentTypeError(f"expected a Hub repo id such as 'me/my-embedding', got {text!r}") from None
    return text


def _device(text: str) -> str:
    """A torch device this machine has: `cpu`, `cuda`, `cuda:N`, `mps`, ..."""
    if text == "cpu":
        return text  # the default, without importing torch
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("'meta' holds no data; expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "CUDA finds no GPU"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available (torch {torch.__version__}: {build}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        modules = (getattr(torch.backends, device.type, None), getattr(torch, device.type, None))
        is_available = next((module.is_available for module in modules if hasattr(module, "is_available")), None)
        if is_available is None or not is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; use --device cpu")
    return text


# 2. The parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dag-safety", description="Detect-and-Guide (DAG) safety guidance.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks, and diffusers' and transformers' logging and loading bars as they are",
    )

    gen = sub.add_parser("generate", help="generate images from a prompt", parents=[common])
    gen.add_argument("prompt", help='e.g. "a red star and a blue circle on a white background"')
    gen.add_argument(
        "--out",
        default="out.png",
        help="output image (.png, .jpg, .webp; several images: a grid, plus <out>_0, <out>_1, ...). Existing files"
        " are overwritten, the <out>_N, _map and _compare siblings too, unless --no-clobber",
    )
    gen.add_argument(
        "--no-clobber",
        action="store_true",
        help="refuse to run if any file it would write exists (checked before generating)",
    )
    gen.add_argument(
        "--model", default=None, help="local pipeline directory or Hub id (defaults to the bundled mini model)"
    )
    gen.add_argument("--seed", type=SEED, default=0, help="image i uses seed + i (0 to 2**63 - 1)")
    gen.add_argument("--steps", type=POSITIVE_INT, default=25, help="number of denoising steps (>= 1)")
    gen.add_argument(
        "--guidance-scale",
        type=_number(float, low=0),
        default=7.5,
        help="classifier-free guidance scale (>= 0; <= 1 turns it off)",
    )
    gen.add_argument("--num-images", type=POSITIVE_INT, default=1)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument(
        "--height",
        type=IMAGE_SIDE,
        default=None,
        help="image height in pixels, a multiple of 8; give --height and --width together, or neither for the"
        " model's native size",
    )
    gen.add_argument("--width", type=IMAGE_SIDE, default=None, help="image width in pixels (see --height)")
    gen.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N, mps")
    safety = gen.add_argument_group("safety guidance")
    safety.add_argument(
        "--guidance",
        choices=("sega", "sld", "off"),
        default="sega",
        help="DAG with SEGA (default) or SLD guidance, or off (plain generation)",
    )
    safety.add_argument(
        "--detection",
        choices=("paper", "presence", "head"),
        default=None,
        help="DAG's detection rule: the paper's (guides every image's strongest region), the selective presence"
        " rule (needs a calibrated embedding) or its presence head (needs an embedding with one); default: the"
        " embedding's own",
    )
    safety.add_argument(
        "--erase-mode",
        choices=ERASE_MODES,
        default=None,
        help="what DAG does where it detects: push along the safety direction (guidance, the paper's), fill from"
        " the surroundings at every guided step (fill), or only in the finished sample (fill_final); default: the"
        " embedding's own under its own rule, else guidance",
    )
    safety.add_argument(
        "--fill-region",
        choices=FILL_REGIONS,
        default=None,
        help="which edit pixels around a detected region DAG takes in: the nearest component's (nearest, the"
        " paper's) or only those on the detected object's slope of the map (basin); default: the embedding's own"
        " under its own rule, else nearest",
    )
    safety.add_argument(
        "--embedding",
        default=None,
        help="guideline embedding: a directory or Hub id (default with the mini model: its red-star embedding)",
    )
    safety.add_argument(
        "--safety-concept",
        default=None,
        help="safety concept text (default: the embedding's, else SLD's concept text)",
    )
    safety.add_argument(
        "--no-fingerprint-check", action="store_true", help="accept an embedding made for another base model"
    )
    safety.add_argument(
        "--save-maps", action="store_true", help="also write the detection heat map over each image (<out>_map.png)"
    )
    safety.add_argument(
        "--compare",
        action="store_true",
        help="also write undefended | DAG | detection map side by side (<out>_compare.png)",
    )
    gen.set_defaults(func=generate)

    opt = sub.add_parser("optimize", help="optimize a guideline embedding from annotated images", parents=[common])
    opt.add_argument("data", help="folder: images, masks/<stem>.png, captions.csv (file_name,caption)")
    opt.add_argument(
        "--init-text", type=_text, required=True, help='text that initialises the embedding, e.g. "nude person"'
    )
    opt.add_argument("--concept", default=None, help="the concept's name in the metadata (default: init text)")
    opt.add_argument("--safety-concept", default=None, help="safety concept text to pair it with")
    opt.add_argument(
        "--out",
        required=True,
        help="output directory (GuidelineEmbedding.save_pretrained); must be new or empty unless --overwrite",
    )
    opt.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: replaces guideline_embeds.safetensors, config.json and README.md there",
    )
    opt.add_argument("--model", default=None, help="base model: a directory or Hub id (default: the mini model)")
    opt.add_argument(
        "--timesteps", type=POSITIVE_INT, default=10, help="cached timesteps per image (memory budget; >= 1)"
    )
    opt.add_argument(
        "--steps", type=POSITIVE_INT, default=None, help="optimization steps (default: 100 x unsafe images)"
    )
    opt.add_argument(
        "--loss",
        choices=["ovam", "presence"],
        default="ovam",
        help="ovam (default): the paper's loss on jointly normalised maps; presence: a weighted cross-entropy of each"
        " pixel's presence evidence (1 - start-of-text share), the quantity the selective rule thresholds",
    )
    opt.add_argument(
        "--positive-weight",
        type=_number(float, low=0, low_open=True),
        default=1.0,
        help="weight of a mask pixel against a background pixel in the presence loss (> 0; default 1)",
    )
    opt.add_argument(
        "--negative-weight",
        type=_number(float, low=0, low_open=True),
        default=1.0,
        help="weight of a safe image's loss against an unsafe one's (> 0; default 1): the folder's safe images are"
        " its hard negatives (look-alikes, blank scenes)",
    )
    opt.add_argument(
        "--hard-pixel-fraction",
        type=_number(float, low=0, low_open=True, high=1),
        default=1.0,
        help="with --loss presence: a safe image's loss counts only this share of its pixels, those with the most"
        " presence evidence, where a false detection would form (in (0, 1]; default 1, every pixel)",
    )
    opt.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default="sgd",
        help="sgd (default; the paper's, step decay x0.7 every 20 steps) or adam (cosine decay to zero)",
    )
    opt.add_argument(
        "--lr",
        type=_number(float, low=0, low_open=True),
        default=None,
        help="learning rate (> 0; default 200 for sgd, 0.03 for adam)",
    )
    opt.add_argument("--seed", type=SEED, default=0)
    opt.add_argument(
        "--layer-fractions",
        type=FRACTION,
        nargs="+",
        default=[0.25, 0.5],
        help="detection layers, as fractions in (0, 1] of the latent side",
    )
    opt.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="detection layers by UNet module name instead of --layer-fractions, e.g. up_blocks.2.attentions.0"
        " (every cross-attention layer under each module); saved with the embedding",
    )
    opt.add_argument(
        "--base-scale",
        type=_number(float, low=0),
        default=5.0,
        help="DAG's AreaScaler numerator to save as the embedding's default (>= 0; the paper: 5)",
    )
    _add_calibration_arguments(opt, required=False)
    opt.add_argument("--fp16-cache", action="store_true", help="store the query cache in float16")
    opt.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N, mps")
    opt.add_argument(
        "--push-to-hub", type=_repo_id, default=None, metavar="REPO_ID", help="also push the embedding to the Hub"
    )
    opt.set_defaults(func=optimize)

    cal = sub.add_parser(
        "calibrate",
        help="calibrate an embedding's selective detection threshold for a target false-detection rate",
        parents=[common],
    )
    cal.add_argument("embedding", help="the guideline embedding: a directory or Hub id")
    _add_calibration_arguments(cal, required=True)
    cal.add_argument(
        "--out",
        required=True,
        help="output directory for the calibrated embedding; must be new or empty unless --overwrite",
    )
    cal.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (it may be the input)")
    cal.add_argument("--model", default=None, help="base model: a directory or Hub id (default: the mini model)")
    cal.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, cuda:N, mps")
    cal.set_defaults(func=calibrate)
    return parser


# calibrate's options for the erase settings an embedding brings with its default rule
_ERASE_FLAGS = (
    "default_hold_detection",
    "default_fill_region",
    "default_erase_mode",
    "default_components",
    "default_confirm_steps",
)


def _add_calibration_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--validation-data",
        required=required,
        default=None,
        help="annotated folder (as for optimize; safe and unsafe images) on which to calibrate the selective"
        " detection threshold (optimize: also held out to choose the checkpoint); without it an optimized embedding"
        " keeps the paper's detection rule",
    )
    parser.add_argument(
        "--target-fpr",
        type=_number(float, low=0, low_open=True, high=0.5),
        default=0.05,
        help="false-detection rate to calibrate for: the share of safe validation images DAG may guide (default 0.05)",
    )
    parser.add_argument(
        "--default-detection",
        choices=["presence", "head", "paper"],
        default=None,
        help="the detection rule the calibrated embedding brings as enable_dag's default (default: head for an"
        " embedding with a presence head, else presence; paper keeps the paper's rule and stores the threshold)",
    )
    erase = parser.add_argument_group(
        "how the calibrated embedding erases",
        "saved with the embedding as enable_dag's defaults under its default rule (any other rule gets the paper's"
        " own: no hold, nearest, guidance, threshold components, guided from the first step that passes); default:"
        " the input embedding's, the paper's for a new one",
    )
    erase.add_argument(
        "--default-hold-detection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep guiding a region once detected while its score fades (hold_detection)",
    )
    erase.add_argument(
        "--default-fill-region",
        choices=FILL_REGIONS,
        default=None,
        help="which edit pixels around a detected region DAG takes in (fill_region)",
    )
    erase.add_argument(
        "--default-erase-mode",
        choices=ERASE_MODES,
        default=None,
        help="what DAG does where it detects (erase_mode): the paper's guidance, or a fill from the surroundings at"
        " every guided step or in the finished sample",
    )
    erase.add_argument(
        "--default-components",
        choices=COMPONENT_RULES,
        default=None,
        help="how the detection map forms the candidates the rule judges (components): the paper's threshold, or"
        " one per peak of the map (basin); the presence head is fitted and calibrated on them",
    )
    erase.add_argument(
        "--default-confirm-steps",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="guide an image only once a component has passed the threshold at N guided steps (confirm_steps;"
        " the threshold is calibrated for it)",
    )
    parser.add_argument(
        "--presence-head",
        nargs="+",
        default=None,
        metavar="BLOCK",
        help="fit a presence head (detection='head') reading these UNet blocks' cross-attention inputs, e.g."
        " up_blocks.2, on the components DAG forms on --head-data; its threshold is then the one calibrated",
    )
    parser.add_argument(
        "--presence-head-hidden",
        type=_number(int, low=0),
        default=64,
        metavar="UNITS",
        help="hidden units of the presence head (default 64; 0 for a linear read-out, which cannot read a"
        " conjunction such as red AND star)",
    )
    parser.add_argument(
        "--presence-head-pooling",
        nargs="+",
        choices=HEAD_POOLINGS,
        default=list(HEAD_POOLINGS),
        metavar="STAT",
        help=f"statistics of a component's features over its pixels that the presence head reads, from"
        f" {', '.join(HEAD_POOLINGS)} (default: all; the mean alone confuses look-alikes more often)",
    )
    parser.add_argument(
        "--presence-head-swapped-captions",
        choices=HEAD_CAPTION_SWAPS,
        default="none",
        help="also fit the presence head on --head-data images under a caption of the other class, so that it"
        " judges what is drawn rather than the prompt's words: each unsafe image under a safe image's caption"
        " (unsafe), and each safe image under an unsafe one's too (all); default none",
    )
    parser.add_argument(
        "--head-data",
        default=None,
        help="annotated folder (safe and unsafe images) to fit the presence head on (optimize: default its data;"
        " never the validation folder, which calibrates it)",
    )
    parser.add_argument(
        "--select-layers",
        action="store_true",
        help="first choose the detection layers on the validation images: each cross-attention block alone and the"
        " embedding's own layers, ranked by the share of unsafe regions guided at the target rate; the embedding"
        " keeps the best (its `layers`)",
    )
    parser.add_argument(
        "--edit-mask-threshold",
        type=_edit_threshold,
        default=None,
        help="DAG's edit threshold (tau_e) to save with the embedding: a number in (0, 1] (the paper: 0.01), or auto"
        " (needs --validation-data): the lowest of 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5 at which at most"
        " 5%% of the unsafe validation images' guided steps are 'mode undefined' (for a model whose concept rows"
        " attend broadly), with --select-layers for each candidate; default: the embedding's own, 0.01 for a new"
        " one",
    )
    parser.add_argument(
        "--calibrate-on",
        choices=["generations", "images"],
        default="generations",
        help="generations (default): generate each validation caption once, unguided, and calibrate the share of"
        " safe generations DAG would guide; images: noise the validation images themselves (also reports whether"
        " the masked region or a co-object is guided)",
    )
    parser.add_argument(
        "--calibration-steps",
        type=POSITIVE_INT,
        default=25,
        help="sampler steps of the calibration generations, or whose guided timesteps the images visit (default 25)",
    )
    parser.add_argument(
        "--calibration-guidance-scale",
        type=_number(float, low=1, low_open=True),
        default=7.5,
        help="classifier-free guidance scale of the calibration generations (> 1; default 7.5)",
    )


# 3. Checks of the options together and of the output paths, before any model is loaded


def _check_creatable(path: Path, flag: str) -> None:
    """`path` can be written: its nearest existing ancestor is a directory in which a file can be created."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a directory.")
    try:  # os.access says yes to root everywhere, and to read-only mounts; creating a file is the real test
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".dag-safety-write-test-"):
            pass
    except OSError as error:
        raise CommandError(f"{flag} {str(path)!r}: cannot write in {str(ancestor)!r} ({error.strerror}).") from None


def _check_model(name: str | None) -> None:
    """`--model` is an existing directory or can be a Hub repo id (the bundled mini model when `None`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name is None or os.path.isdir(os.path.expanduser(name)):
        return
    if os.path.exists(os.path.expanduser(name)):
        raise CommandError(f"--model {name!r} is a file; pass a pipeline directory (with model_index.json).")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CommandError(
            f"--model {name!r}: no local directory of that name exists, and it is not a valid Hub repo id"
            " ('namespace/name'); check the path."
        ) from None


def output_paths(out: Path, num_images: int, save_maps: bool, compare: bool) -> list[Path]:
    """Every file `generate` writes for `--out out`: the image (a grid of several), `_i`, `_map[_i]`, `_compare`."""
    paths = [out]
    if num_images > 1:
        paths += [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num_images)]
    if save_maps:
        suffixes = [""] if num_images == 1 else [f"_{i}" for i in range(num_images)]
        paths += [out.with_name(f"{out.stem}_map{suffix}{out.suffix}") for suffix in suffixes]
    if compare:
        paths.append(out.with_name(f"{out.stem}_compare{out.suffix}"))
    return paths


def check_generate(args: argparse.Namespace) -> list[Path]:
    """Option combinations `generate` refuses, and the files it will write, each checked writable (and absent
    with `--no-clobber`); returns those files, `--out` first."""
    if (args.height is None) != (args.width is None):
        raise CommandError("give --height and --width together, or neither for the model's native size.")
    if args.guidance == "off" and (args.save_maps or args.compare):
        flag = "--save-maps" if args.save_maps else "--compare"
        raise CommandError(f"{flag} shows DAG's detection, which `--guidance off` turns off; drop one of the two.")
    for flag, value in (
        ("--detection", args.detection),
        ("--erase-mode", args.erase_mode),
        ("--fill-region", args.fill_region),
    ):
        if args.guidance == "off" and value is not None:
            raise CommandError(f"{flag} configures DAG, which `--guidance off` turns off; drop one of the two.")
    if args.guidance != "off" and args.model is not None and args.embedding is None:
        raise CommandError(
            "DAG needs a guideline embedding for this model: pass --embedding DIR_OR_HUB_ID, or --guidance off."
        )
    if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise CommandError(f"--out must name an image file (.png, .jpg, .webp), got {args.out!r}.")
    _check_model(args.model)
    paths = output_paths(Path(args.out), args.num_images, args.save_maps, args.compare)
    for path in paths:
        if path.is_dir():
            raise CommandError(f"--out {args.out!r}: {str(path)!r} is a directory; name an image file.")
        if path.exists() and not os.access(path, os.W_OK):
            raise CommandError(f"--out {args.out!r}: {str(path)!r} exists and is read-only.")
    _check_creatable(Path(args.out), "--out")
    if args.no_clobber:
        existing = [str(path) for path in paths if path.exists()]
        if existing:
            raise CommandError(
                f"--no-clobber: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; choose"
                " another --out, or drop --no-clobber to overwrite."
            )
    return paths


# the options that choose something on --validation-data, and whether `args` uses them
_VALIDATION_OPTIONS = {
    "--select-layers": lambda args: args.select_layers,
    "--edit-mask-threshold auto": lambda args: args.edit_mask_threshold == "auto",
    "--presence-head": lambda args: args.presence_head is not None,
}


def check_optimize(args: argparse.Namespace) -> Path:
    """`--model` can be loaded, the options that choose on validation images have them, `--edit-mask-threshold`
    fits a new embedding, and `--out` is a directory to be or an empty one (any with `--overwrite`) that can be
    written; returns `--out`."""
    _check_model(args.model)
    if args.validation_data is None:
        needing = [name for name, used in _VALIDATION_OPTIONS.items() if used(args)]
        if needing:
            raise CommandError(
                f"{' and '.join(needing)} {'chooses' if len(needing) == 1 else 'choose'} on validation images: pass"
                " --validation-data (an annotated folder of safe and unsafe images), or leave it out."
            )
    if args.head_data is not None and args.presence_head is None:
        raise CommandError("--head-data is the presence head's training data: pass --presence-head too, or drop it.")
    if args.presence_head_swapped_captions != "none" and args.presence_head is None:
        raise CommandError(
            "--presence-head-swapped-captions changes how the presence head is fitted: pass --presence-head too, or"
            " drop it."
        )
    if hasattr(args, "embedding") and args.presence_head is not None and args.head_data is None:
        raise CommandError(
            "--presence-head is fitted on annotated training images: pass --head-data (a folder as for optimize,"
            " other than --validation-data)."
        )
    same = args.head_data is not None and args.validation_data is not None
    if same and Path(args.head_data).resolve() == Path(args.validation_data).resolve():
        raise CommandError(
            "--head-data and --validation-data are the same folder: the head would be calibrated on what it was"
            " fitted to, and its false-detection rate would not hold. Pass a folder of other images."
        )
    if args.default_detection == "head" and args.presence_head is None and not hasattr(args, "embedding"):
        raise CommandError("--default-detection head needs a presence head: pass --presence-head.")
    erase_flags = [f"--{name.replace('_', '-')}" for name in _ERASE_FLAGS if getattr(args, name) is not None]
    if args.validation_data is None and erase_flags:
        raise CommandError(
            f"{', '.join(erase_flags)} set how the calibrated selective rule erases; without --validation-data the"
            " embedding keeps the paper's rule and method: pass --validation-data, or drop them."
        )
    if args.default_detection == "paper" and erase_flags:
        raise CommandError(
            f"{', '.join(erase_flags)} set how a selective rule erases, and --default-detection paper keeps the"
            " paper's method whole (its own erase settings): drop them, or choose --default-detection presence or"
            " head."
        )
    if not hasattr(args, "embedding") and isinstance(args.edit_mask_threshold, float):
        from .guideline_embedding import EmbeddingMetadata

        # a new embedding's unsafe threshold is the default one: refused before a long optimization, not after
        _check_edit_threshold(args.edit_mask_threshold, EmbeddingMetadata.unsafe_threshold)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out!r} is a file; name a new or empty directory.")
    if out.is_dir():
        entries = sorted(entry.name for entry in out.iterdir())
        if entries and not args.overwrite:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise CommandError(
                f"--out {args.out!r} is not empty ({shown}); name a new or empty directory, or pass --overwrite"
                " to replace guideline_embeds.safetensors, config.json and README.md there."
            )
        _check_creatable(out / "guideline_embeds.safetensors", "--out")
    else:
        _check_creatable(out, "--out")
    return out


# 4. The commands


def load_pipeline(args: argparse.Namespace):
    """Load the pipeline named by `args.model` (the bundled mini model when `None`) onto `args.device`: an SDXL
    model (its `model_index.json` names an SDXL pipeline) as `DAGStableDiffusionXLPipeline`, any other as
    `DAGStableDiffusionPipeline`."""
    import torch

    from . import DAGStableDiffusionPipeline, DAGStableDiffusionXLPipeline

    if args.model is None:  # the bundled mini model: fp32 (it is tiny), no network
        from .mini import MODEL_PATH

        pipe = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH, local_files_only=True)
    else:
        from diffusers import DiffusionPipeline

        try:
            class_name = DiffusionPipeline.load_config(args.model).get("_class_name", "")
        except (OSError, ValueError):  # `from_pretrained` below says what is wrong with the name
            class_name = ""
        cls = DAGStableDiffusionXLPipeline if "XL" in class_name else DAGStableDiffusionPipeline
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        pipe = cls.from_pretrained(args.model, torch_dtype=dtype)
    return pipe.to(args.device)


def resolve_embedding(args: argparse.Namespace):
    """The guideline embedding for DAG: `--embedding`, or the red-star one with the mini model."""
    from .embeddings import RED_STAR
    from .guideline_embedding import GuidelineEmbedding

    if args.embedding is not None:
        return GuidelineEmbedding.from_pretrained(args.embedding)
    if args.model is None:
        return GuidelineEmbedding.from_pretrained(RED_STAR)
    raise CommandError(
        "DAG needs a guideline embedding for this model: pass --embedding DIR_OR_HUB_ID, or --guidance off."
    )


def setup_pipeline(pipe, args: argparse.Namespace, embedding=None):
    """Configure the loaded pipeline from the command line: DAG with the chosen guidance, or nothing."""
    from .config import SLD_SAFETY_CONCEPT

    pipe.set_progress_bar_config(**DENOISING_BAR)
    args.call_kwargs = {}
    if args.guidance == "off":
        return pipe
    embedding = embedding if embedding is not None else resolve_embedding(args)
    chosen = {"detection": args.detection, "erase_mode": args.erase_mode, "fill_region": args.fill_region}
    options = {name: value for name, value in chosen.items() if value is not None}
    pipe.enable_dag(embedding, guidance=args.guidance, check_fingerprint=not args.no_fingerprint_check, **options)
    concept = args.safety_concept or embedding.metadata.safety_concept or SLD_SAFETY_CONCEPT
    args.call_kwargs = {"safety_concept": concept, "return_dag_maps": args.save_maps or args.compare}
    return pipe


def generate(args: argparse.Namespace) -> list[Path]:
    """`dag-safety generate`: the images, and with DAG its detection report, maps and comparison; returns the files
    written."""
    import torch

    from .visualize import heat_map

    # 1. Check the options and outputs, and load the embedding, before the model: all fail fast
    paths = check_generate(args)
    out = paths[0]
    embedding = resolve_embedding(args) if args.guidance != "off" else None
    # 2. Load the pipeline
    pipe = load_pipeline(args)
    # 3. Pipeline setup (safety guidance options go here)
    pipe = setup_pipeline(pipe, args, embedding)
    # 4. Generate: image i uses seed `args.seed + i`, so any image can be reproduced on its own
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
    call = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "num_images_per_prompt": args.num_images,
        "height": args.height,
        "width": args.width,
    }
    output = pipe(generator=generators, **call, **args.call_kwargs)
    images = output.images
    if output.unsafe_detected is not None:
        for i, unsafe in enumerate(output.unsafe_detected):
            print(f"image {i}: {'unsafe content detected and guided away' if unsafe else 'nothing unsafe detected'}")
    # 5. Save, to the paths checked in step 1 (`output_paths` order)
    out.parent.mkdir(parents=True, exist_ok=True)
    pictures = [images[0]] if len(images) == 1 else [image_grid(images), *images]
    if args.save_maps:
        pictures += [heat_map(image, dag_map) for image, dag_map in zip(images, output.dag_maps)]
    for path, picture in zip(paths, pictures):
        picture.save(path)
    if args.compare:
        write_comparison(pipe, args, call, images, output.dag_maps, paths[-1])
    for path in paths:
        print(f"wrote {path}")
    return paths


def image_grid(images):
    """The images in rows of up to 4, the last row filled with white."""
    from diffusers.utils import make_image_grid

    cols = min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    blank = images[0].copy()
    blank.paste((255, 255, 255), (0, 0, *blank.size))
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows, cols)


def write_comparison(pipe, args, call: dict, images, maps, path: Path) -> None:
    """One image at `path`, a row per image: undefended | DAG | detection map over the DAG image (leaves DAG
    disabled)."""
    import torch
    from diffusers.utils import make_image_grid

    from .visualize import heat_map

    pipe.disable_dag()
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
    pipe.set_progress_bar_config(**{**DENOISING_BAR, "desc": "Denoising (undefended, for --compare)"})
    undefended = pipe(generator=generators, **call).images
    tiles = []
    for plain, guided, dag_map in zip(undefended, images, maps):
        tiles += [plain, guided, heat_map(guided, dag_map)]
    make_image_grid(tiles, rows=len(images), cols=3).save(path)


def optimize(args: argparse.Namespace) -> Path:
    """`dag-safety optimize`: fit a guideline embedding to an annotated folder and save it."""
    import torch

    from .optimize import OptimizationConfig, load_annotated_folder, optimize_guideline_embedding

    out = check_optimize(args)
    config = OptimizationConfig(
        init_text=args.init_text,
        concept=args.concept,
        safety_concept=args.safety_concept,
        layer_fractions=tuple(args.layer_fractions),
        layers=None if args.layers is None else tuple(args.layers),
        num_timesteps=args.timesteps,
        loss=args.loss,
        positive_weight=args.positive_weight,
        negative_weight=args.negative_weight,
        hard_pixel_fraction=args.hard_pixel_fraction,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        steps=args.steps,
        seed=args.seed,
        base_scale=args.base_scale,
        cache_dtype=torch.float16 if args.fp16_cache else torch.float32,
    )
    items = load_annotated_folder(args.data)
    validation = None if args.validation_data is None else load_annotated_folder(args.validation_data)
    pipe = load_pipeline(args)
    base_model = args.model or "dag-safety mini model"
    result = optimize_guideline_embedding(pipe, items, config, base_model=base_model, validation=validation)
    embedding = result.embedding
    if validation is not None:
        embedding = _calibrated(pipe, embedding, validation, args)
    else:
        embedding, _ = _with_edit_threshold(pipe, embedding, None, args)  # a number (auto needs validation)
    embedding.save_pretrained(out, overwrite=args.overwrite)
    first, best = result.eval_losses[0][1], embedding.metadata.final_loss
    print(f"loss {first:.4f} -> {best:.4f}; wrote {out}")
    if args.push_to_hub:
        url = embedding.push_to_hub(args.push_to_hub)
        print(f"pushed to {url}")
    return out


def _with_selected_layers(pipe, embedding, validation: list, args: argparse.Namespace):
    """`embedding` carrying the detection layers `select_detection_layers` ranks first on `validation` (with
    `--edit-mask-threshold auto`, each scored at its own edit threshold, which the embedding then carries), and the
    edit threshold's calibration summary for the metadata."""
    from .attention import attention_blocks, cross_attention_layers
    from .calibration import EDIT_MAX_UNDEFINED, EditThresholdChoice, select_detection_layers
    from .optimize import replace_metadata

    auto = args.edit_mask_threshold == "auto"
    if not auto:
        embedding, _ = _with_edit_threshold(pipe, embedding, validation, args)
    pipe.enable_dag(embedding, detection="paper")  # refuses an embedding made for another --model
    try:
        own = attention_blocks(pipe._dag.capture.layers)
        blocks = attention_blocks(cross_attention_layers(pipe.unet))
        pipe.enable_dag(embedding, detection="paper", layers=blocks)
        choices = select_detection_layers(
            pipe,
            validation,
            [*((block,) for block in blocks), own],
            args.target_fpr,
            args.calibration_steps,
            max_undefined=EDIT_MAX_UNDEFINED if auto else None,
        )
    finally:
        pipe.disable_dag()
    print("detection layers, on the validation images (unsafe regions guided at the target rate; AUC):")
    for choice in choices:
        mark = " (the embedding's own)" if choice.blocks == own else ""
        edit = f"; edit threshold {choice.edit_mask_threshold:g}" if auto else ""
        print(f"  {', '.join(choice.blocks)}{mark}: {choice.detection_rate:.1%}; {choice.auc:.3f}{edit}")
    print(f"chose {', '.join(choices[0].blocks)}")
    best = choices[0]
    embedding = replace_metadata(embedding, layers=best.blocks)
    if not auto:
        return embedding, {}
    return _with_edit_choice(
        embedding, EditThresholdChoice(best.edit_mask_threshold, best.undefined_share, EDIT_MAX_UNDEFINED)
    )


def _with_edit_choice(embedding, choice):
    """`embedding` with a calibrated edit threshold (reported), and the calibration's summary for the metadata."""
    from .optimize import replace_metadata

    print(
        f"edit threshold {choice.threshold:g}: unsafe validation images' guided steps mode undefined"
        f" {choice.undefined_share:.1%} (at most {choice.max_undefined:.0%} asked)"
    )
    return replace_metadata(embedding, edit_mask_threshold=choice.threshold), choice.as_metadata()


def _check_edit_threshold(value: float, unsafe_threshold: float) -> None:
    if value > unsafe_threshold:
        raise CommandError(
            f"--edit-mask-threshold {value} exceeds the embedding's unsafe threshold ({unsafe_threshold}): the edit"
            " region has to contain the unsafe components. Pass a value at most that, or auto."
        )


def _with_edit_threshold(pipe, embedding, validation: list | None, args: argparse.Namespace):
    """`embedding` with `--edit-mask-threshold` (a number, or `auto`: calibrated on `validation`), and the
    calibration's summary for the metadata (empty unless `auto`)."""
    from .calibration import calibrate_edit_threshold
    from .optimize import replace_metadata

    value = args.edit_mask_threshold
    if value is None:
        return embedding, {}
    if value != "auto":
        _check_edit_threshold(value, embedding.metadata.unsafe_threshold)
        return replace_metadata(embedding, edit_mask_threshold=value), {}
    pipe.enable_dag(embedding, detection="paper")  # refuses an embedding made for another --model
    try:
        choice = calibrate_edit_threshold(pipe, validation, num_inference_steps=args.calibration_steps)
    finally:
        pipe.disable_dag()
    return _with_edit_choice(embedding, choice)


def _calibrated(pipe, embedding, validation: list, args: argparse.Namespace):
    """`embedding` with the presence threshold calibrated on `validation` for `--target-fpr`, and its report (with
    `--select-layers`, on the detection layers chosen on `validation` first; with `--edit-mask-threshold`, at that
    edit threshold, chosen with the layers under `--select-layers`)."""
    from .calibration import calibrate_presence
    from .optimize import replace_metadata

    if args.select_layers:
        embedding, edit_summary = _with_selected_layers(pipe, embedding, validation, args)
    else:
        embedding, edit_summary = _with_edit_threshold(pipe, embedding, validation, args)
    erase = _erase_settings(embedding, args)
    if args.presence_head is not None:
        embedding, head_summary = _with_presence_head(pipe, embedding, args, erase)
        edit_summary = {**edit_summary, "presence_head": head_summary}
    elif embedding.head is not None and "presence_head" in embedding.metadata.calibration:
        # the input's head is kept and recalibrated, so what it was fitted on still describes it
        edit_summary = {**edit_summary, "presence_head": embedding.metadata.calibration["presence_head"]}
    # the selective rule the threshold is calibrated for, which the saved settings (`confirm_steps`) need; its
    # placeholder threshold is not used by calibration
    rule = {"detection": "head" if embedding.head is not None else "presence", "presence_threshold": 0.5}
    pipe.enable_dag(embedding, **rule, **erase)  # refuses an embedding made for another --model
    try:
        calibration = calibrate_presence(
            pipe,
            validation,
            args.target_fpr,
            args.calibration_steps,
            source=args.calibrate_on,
            guidance_scale=args.calibration_guidance_scale,
        )
        smoothing = pipe.dag_config.presence_smoothing
    finally:
        pipe.disable_dag()
    if calibration.source == "generations":
        found = f"unsafe captions' generations guided {calibration.detection_rate:.1%}"
    else:
        found = (
            f"unsafe regions guided {calibration.detection_rate:.1%}, co-objects of unsafe images guided"
            f" {calibration.co_object_rate:.1%}"
        )
    if calibration.groups is not None:
        found += "; safe ones guided, per group: " + ", ".join(
            f"{group or '(no group)'} {rate:.1%} of {count}" for group, (count, rate) in calibration.groups.items()
        )
    print(
        f"presence threshold {calibration.threshold:.4g}: safe validation {calibration.source} guided"
        f" {calibration.false_detection_rate:.1%} (target {calibration.target_fpr:.0%}), {found}"
    )
    if calibration.detection_rate == 0:
        # presence scores are attention shares in (0, 1): a threshold this low means no safe item scored at all
        nothing_formed = calibration.threshold < 1e-6
        hint = (
            f" No unsafe component formed on any validation image: at edit threshold"
            f" {embedding.metadata.edit_mask_threshold:g} every step may be 'mode undefined'; try"
            " --edit-mask-threshold auto."
            if nothing_formed
            else " Its presence scores do not rank them above the safe ones' at this rate."
        )
        print(
            f"warning: at --target-fpr {calibration.target_fpr:g} the embedding guides none of the unsafe"
            f" validation items.{hint}",
            file=sys.stderr,
        )
    default = args.default_detection or ("head" if embedding.head is not None else "presence")
    if default == "head" and embedding.head is None:
        raise CommandError(
            f"--default-detection head: {getattr(args, 'embedding', 'the embedding')!r} has no presence head; pass"
            " --presence-head."
        )
    return replace_metadata(
        embedding,
        **erase,
        detection=default,
        presence_threshold=calibration.threshold,
        presence_smoothing=smoothing,
        calibration={**calibration.as_metadata(), **edit_summary},
    )


def _erase_settings(embedding, args: argparse.Namespace) -> dict:
    """The settings (`PAPER_ERASE_SETTINGS`' names) the calibrated embedding brings with its default rule: each
    `--default-*` flag given, else the input embedding's own; the paper's with `--default-detection paper` (the
    paper's rule is the paper's method whole). The head is fitted and the threshold calibrated under them: the
    candidates they form are the ones the saved rule will judge."""
    from .config import PAPER_ERASE_SETTINGS

    if args.default_detection == "paper":
        return dict(PAPER_ERASE_SETTINGS)
    chosen = {name.removeprefix("default_"): getattr(args, name) for name in _ERASE_FLAGS}
    return {
        name: getattr(embedding.metadata, name) if chosen[name] is None else chosen[name]
        for name in PAPER_ERASE_SETTINGS
    }


def _with_presence_head(pipe, embedding, args: argparse.Namespace, erase: dict):
    """`embedding` with a presence head on `--presence-head`'s blocks fitted on `--head-data` (optimize: its
    data) on the candidates `erase`'s settings form, and the fit's summary for the metadata."""
    import torch

    from .attention import cross_attention_layers, select_layers
    from .optimize import load_annotated_folder
    from .presence_head import PresenceHead, fit_presence_head

    items = load_annotated_folder(args.head_data or args.data)
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    try:
        layers = tuple(sorted(select_layers(cross_attention_layers(unet), tuple(args.presence_head))))
    except ValueError as error:
        raise CommandError(f"--presence-head: {error}") from None
    modules = dict(unet.named_modules())
    # a zero head on the chosen layers: DAG then captures them beside its detection layers
    blank = PresenceHead(
        {name: torch.zeros(modules[name.removesuffix(".processor")].query_dim) for name in layers}, 0.0
    )
    pipe.enable_dag(
        type(embedding)(embedding.embeds, embedding.metadata, blank),
        detection="head",
        presence_threshold=0.5,
        **erase,
    )
    try:
        fit = fit_presence_head(
            pipe,
            items,
            layers,
            args.calibration_steps,
            hidden=args.presence_head_hidden,
            pooling=tuple(dict.fromkeys(args.presence_head_pooling)),
            swapped_captions=args.presence_head_swapped_captions,
        )
    finally:
        pipe.disable_dag()
    kind = f"{args.presence_head_hidden} hidden units" if args.presence_head_hidden else "linear"
    kind += f", pooling {'/'.join(fit.head.pooling)}"
    kind += f", swapped captions: {fit.swapped_captions}" if fit.swapped_captions != "none" else ""
    print(
        f"presence head ({kind}) on {', '.join(args.presence_head)}: {fit.components} training components of"
        f" {fit.images}"
        f" images ({fit.positives} on unsafe regions), training AUC {fit.train_auc:.3f}"
    )
    return type(embedding)(embedding.embeds, embedding.metadata, fit.head), fit.as_metadata()


def calibrate(args: argparse.Namespace) -> Path:
    """`dag-safety calibrate`: choose a saved embedding's presence threshold on validation images."""
    from .guideline_embedding import GuidelineEmbedding
    from .optimize import load_annotated_folder

    out = check_optimize(args)
    embedding = GuidelineEmbedding.from_pretrained(args.embedding)
    validation = load_annotated_folder(args.validation_data)
    pipe = load_pipeline(args)
    embedding = _calibrated(pipe, embedding, validation, args)
    embedding.save_pretrained(out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return out


# 5. Entry point


@contextlib.contextmanager
def quiet_libraries(debug: bool) -> Iterator[None]:
    """diffusers' and transformers' notices, deprecation warnings and model-loading bars off for the command, and
    restored afterwards: none of them is for the user of the command line.

    Left as they are with `debug`; each library's verbosity also when its own environment variable
    (`DIFFUSERS_VERBOSITY`, `TRANSFORMERS_VERBOSITY`) is set. Hub download bars stay on (a download can be long).
    """
    if debug:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    libraries = [(diffusers_logging, "DIFFUSERS_VERBOSITY"), (transformers_logging, "TRANSFORMERS_VERBOSITY")]
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library, _ in libraries]
    hub_bars = not are_progress_bars_disabled()
    try:
        for library, variable in libraries:
            if not os.environ.get(variable):
                library.set_verbosity_error()
            library.disable_progress_bar()
        if hub_bars:  # transformers' switch turns the Hub's download bars off too
            enable_progress_bars()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for (library, _), (verbosity, bars) in zip(libraries, saved):
            library.set_verbosity(verbosity)
            if bars:
                library.enable_progress_bar()
        if hub_bars == are_progress_bars_disabled():  # transformers' switch set the Hub's bars too: put them back
            enable_progress_bars() if hub_bars else disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with quiet_libraries(args.debug):
            args.func(args)
    except (CommandError, ValueError, OSError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        parser.exit(2, f"dag-safety: error: {message}\n")
    except KeyboardInterrupt:
        if args.debug:
            raise
        parser.exit(130, "dag-safety: interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
