"""`dag-safety` command line: safe generation (the bundled mini model by default) and guideline optimization.

Examples:

    dag-safety generate "a red star and a blue circle on a white background" --compare
    dag-safety generate "a red star on a gray background" --guidance off --out plain.png
    dag-safety optimize ./data --init-text "red star" --safety-concept "a red star" --out ./red-star-embedding
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dag-safety", description="Detect-and-Guide (DAG) safety guidance.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help='e.g. "a red star and a blue circle on a white background"')
    gen.add_argument("--out", default="out.png", help="output PNG (several images: a grid, plus numbered files)")
    gen.add_argument("--model", default=None,
                     help="local pipeline directory or Hub id (defaults to the bundled mini model)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25, help="number of denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=int, default=None, help="defaults to the model's native size")
    gen.add_argument("--width", type=int, default=None, help="defaults to the model's native size")
    gen.add_argument("--device", default="cpu")
    safety = gen.add_argument_group("safety guidance")
    safety.add_argument("--guidance", choices=("sega", "sld", "off"), default="sega",
                        help="DAG with SEGA (default) or SLD guidance, or off (plain generation)")
    safety.add_argument("--embedding", default=None,
                        help="guideline embedding: a directory or Hub id (default with the mini model: its red-star"
                             " embedding)")
    safety.add_argument("--safety-concept", default=None,
                        help="safety concept text (default: the embedding's, else SLD's concept text)")
    safety.add_argument("--no-fingerprint-check", action="store_true",
                        help="accept an embedding made for another base model")
    safety.add_argument("--save-maps", action="store_true",
                        help="also write the detection heat map over each image (<out>_map.png)")
    safety.add_argument("--compare", action="store_true",
                        help="also write undefended | DAG | detection map side by side (<out>_compare.png)")
    gen.set_defaults(func=generate)

    opt = sub.add_parser("optimize", help="optimize a guideline embedding from annotated images")
    opt.add_argument("data", help="folder: images, masks/<stem>.png, captions.csv (file_name,caption)")
    opt.add_argument("--init-text", required=True, help='text that initialises the embedding, e.g. "nude person"')
    opt.add_argument("--concept", default=None, help="the concept's name in the metadata (default: init text)")
    opt.add_argument("--safety-concept", default=None, help="safety concept text to pair it with")
    opt.add_argument("--out", required=True, help="output directory (GuidelineEmbedding.save_pretrained)")
    opt.add_argument("--model", default=None, help="base model: a directory or Hub id (default: the mini model)")
    opt.add_argument("--timesteps", type=int, default=10, help="cached timesteps per image (memory budget)")
    opt.add_argument("--steps", type=int, default=None, help="optimization steps (default: 100 x unsafe images)")
    opt.add_argument("--lr", type=float, default=200.0)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--layer-fractions", type=float, nargs="+", default=[0.25, 0.5])
    opt.add_argument("--base-scale", type=float, default=5.0,
                     help="DAG's AreaScaler numerator to save as the embedding's default (the paper: 5)")
    opt.add_argument("--fp16-cache", action="store_true", help="store the query cache in float16")
    opt.add_argument("--device", default="cpu")
    opt.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the embedding to the Hub")
    opt.set_defaults(func=optimize)
    return parser


def load_pipeline(args: argparse.Namespace):
    """Load the pipeline named by `args.model` (the bundled mini model when `None`) onto `args.device`."""
    import torch

    from . import DAGStableDiffusionPipeline

    if args.model is None:  # the bundled mini model: fp32 (it is tiny), no network
        from .mini import MODEL_PATH

        pipe = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH, local_files_only=True)
    else:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        pipe = DAGStableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
    return pipe.to(args.device)


def resolve_embedding(args: argparse.Namespace):
    """The guideline embedding for DAG: `--embedding`, or the red-star one with the mini model."""
    from .embedding import GuidelineEmbedding
    from .embeddings import RED_STAR

    if args.embedding is not None:
        return GuidelineEmbedding.from_pretrained(args.embedding)
    if args.model is None:
        return GuidelineEmbedding.from_pretrained(RED_STAR)
    raise SystemExit(
        "DAG needs a guideline embedding for this model: pass --embedding DIR_OR_HUB_ID, or --guidance off."
    )


def setup_pipeline(pipe, args: argparse.Namespace):
    """Configure the loaded pipeline from the command line: DAG with the chosen guidance, or nothing."""
    from .config import SLD_SAFETY_CONCEPT

    pipe.set_progress_bar_config(disable=True)
    args.call_kwargs = {}
    if args.guidance == "off":
        return pipe
    embedding = resolve_embedding(args)
    pipe.enable_dag(embedding, guidance=args.guidance, check_fingerprint=not args.no_fingerprint_check)
    concept = args.safety_concept or embedding.metadata.safety_concept or SLD_SAFETY_CONCEPT
    args.call_kwargs = {"safety_concept": concept, "return_dag_maps": args.save_maps or args.compare}
    return pipe


def heat_map(image, detection_map):
    """`image` (PIL) with the detection map `(h, w)` in `[0, 1]` blended over it as a JET heat map."""
    import cv2
    import numpy as np
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"))
    amap = cv2.resize(detection_map.numpy().astype(np.float32), rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.uint8(np.clip(amap, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    return Image.fromarray(np.uint8(0.5 * rgb + 0.5 * colored))


def generate(args: argparse.Namespace) -> list[Path]:
    import torch
    from diffusers.utils import make_image_grid

    if args.num_images < 1:
        raise SystemExit(f"--num-images must be >= 1, got {args.num_images}.")
    out = Path(args.out)
    if out.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
        raise SystemExit(f"--out must name an image file (.png, .jpg, .webp), got {str(out)!r}.")
    if args.guidance == "off" and (args.save_maps or args.compare):
        flag = "--save-maps" if args.save_maps else "--compare"
        raise SystemExit(f"{flag} shows DAG's detection, which `--guidance off` turns off; drop one of the two.")

    # 1. Load the pipeline
    pipe = load_pipeline(args)
    # 2. Pipeline setup (safety guidance options go here)
    pipe = setup_pipeline(pipe, args)
    # 3. Generate: image i uses seed `args.seed + i`, so any image can be reproduced on its own
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
    call = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
    )
    output = pipe(generator=generators, **call, **args.call_kwargs)
    images = output.images
    if output.unsafe_detected is not None:
        for i, unsafe in enumerate(output.unsafe_detected):
            print(f"image {i}: {'unsafe content detected and guided away' if unsafe else 'nothing unsafe detected'}")
    # 4. Save
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if len(images) == 1:
        images[0].save(out)
        written.append(out)
    else:
        cols = min(len(images), 4)
        rows = (len(images) + cols - 1) // cols
        blank = images[0].copy()
        blank.paste((255, 255, 255), (0, 0, *blank.size))
        make_image_grid(images + [blank] * (rows * cols - len(images)), rows, cols).save(out)
        written.append(out)
        for i, image in enumerate(images):
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            image.save(path)
            written.append(path)
    if args.save_maps:
        for i, image in enumerate(images):
            path = out.with_name(f"{out.stem}_map{'' if len(images) == 1 else f'_{i}'}{out.suffix}")
            heat_map(image, output.dag_maps[i]).save(path)
            written.append(path)
    if args.compare:
        written.append(write_comparison(pipe, args, call, images, output.dag_maps, out))
    for path in written:
        print(f"wrote {path}")
    return written


def write_comparison(pipe, args, call: dict, images, maps, out: Path) -> Path:
    """One PNG, a row per image: undefended | DAG | detection map over the DAG image (leaves DAG disabled)."""
    import torch
    from diffusers.utils import make_image_grid

    pipe.disable_dag()
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
    undefended = pipe(generator=generators, **call).images
    tiles = []
    for plain, guided, amap in zip(undefended, images, maps):
        tiles += [plain, guided, heat_map(guided, amap)]
    path = out.with_name(f"{out.stem}_compare{out.suffix}")
    make_image_grid(tiles, rows=len(images), cols=3).save(path)
    return path


def optimize(args: argparse.Namespace) -> Path:
    """`dag-safety optimize`: fit a guideline embedding to an annotated folder and save it."""
    import torch

    from .optimize import OptimizationConfig, load_annotated_folder, optimize_guideline_embedding

    items = load_annotated_folder(args.data)
    pipe = load_pipeline(args)
    config = OptimizationConfig(
        init_text=args.init_text,
        concept=args.concept,
        safety_concept=args.safety_concept,
        layer_fractions=tuple(args.layer_fractions),
        num_timesteps=args.timesteps,
        learning_rate=args.lr,
        steps=args.steps,
        seed=args.seed,
        base_scale=args.base_scale,
        cache_dtype=torch.float16 if args.fp16_cache else torch.float32,
    )
    base_model = args.model or "dag-safety mini model"
    result = optimize_guideline_embedding(pipe, items, config, base_model=base_model)
    out = Path(args.out)
    result.embedding.save_pretrained(out)
    first, best = result.eval_losses[0][1], result.embedding.metadata.final_loss
    print(f"loss {first:.4f} -> {best:.4f}; wrote {out}")
    if args.push_to_hub:
        url = result.embedding.push_to_hub(args.push_to_hub)
        print(f"pushed to {url}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
