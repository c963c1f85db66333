"""Detect-and-Guide together with a Focus-N-Fix safety LoRA (or SPF-Portrait cross-attention weights).

Generates the same prompt and seed four ways: the base model, DAG alone, DAG with the safety weights (loaded after
`enable_dag`, so detection keeps the projections the guideline embedding was fitted to), and the weights alone, then unloads the weights and checks that DAG alone is reproduced exactly. Images go to
`--output-dir` as `<name>.png` plus a side-by-side `grid.png`.

Stable Diffusion v1.4 from the Hub (GPU recommended):

    python examples/dag_with_focus_n_fix.py sd14 \\
        --embedding your-org/nudity-guideline-sd14 \\
        --weights your-org/focus-n-fix-sd14 --weight-name pytorch_lora_weights.safetensors \\
        --prompt "a photo of a person on a beach" --safety-concept nudity --scale 0.8

The bundled mini model, offline (CPU; a LoRA for it is trained in a minute or two by the fixture script):

    python examples/train_fixture_lora.py --model dag_safety/mini/model --output-dir out/mini-weights \
        --target-modules to_q to_k to_v to_out.0 --lr 5e-3 --preserve-weight 1
    python examples/dag_with_focus_n_fix.py mini --weights out/mini-weights/lora_circle_blue

`tiny` runs the same flow on the tests' tiny random components and committed fixtures (a smoke test, no meaningful
images). Every flag has a default per model; `--kind spf` loads cross-attention weights instead of a LoRA.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dag_safety import DAGStableDiffusionPipeline

logger = logging.getLogger("dag_with_focus_n_fix")

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {
    "sd14": {
        "model": "CompVis/stable-diffusion-v1-4",
        "embedding": None,  # a GuidelineEmbedding directory or Hub repo fitted to SD v1.4
        "weights": None,  # a Focus-N-Fix LoRA directory, file or Hub repo
        "prompt": "a photo of a person on a beach",
        "safety_concept": "nudity",
        "steps": 50,
        "device": "cuda",
    },
    "mini": {
        "model": None,  # dag_safety.mini.MODEL_PATH
        "embedding": None,  # dag_safety.embeddings.RED_STAR
        "weights": "out/mini-weights/lora_circle_blue",
        "prompt": "a red star and a red circle on a white background",
        "safety_concept": "a red star",
        "steps": 25,
        "device": "cpu",
    },
    "tiny": {
        "model": None,
        "embedding": None,  # the text-encoder rows of "red star"
        "weights": str(ROOT / "tests" / "fixtures" / "lora_circle_blue"),
        "prompt": "a red star and a red circle on a white background",
        "safety_concept": "a red star",
        "steps": 4,
        "device": "cpu",
    },
}


def build_pipeline(which: str, model: str | None, dtype: torch.dtype) -> DAGStableDiffusionPipeline:
    if which == "tiny":
        spec = importlib.util.spec_from_file_location("_dag_conftest", ROOT / "tests" / "conftest.py")
        conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conftest)
        return DAGStableDiffusionPipeline(**conftest.get_dummy_components())
    if which == "mini":
        from dag_safety.mini import MODEL_PATH

        model = model or MODEL_PATH
        if not Path(model, "model_index.json").is_file():
            raise SystemExit(f"No mini model at {model!r} (model_index.json missing).")
    return DAGStableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)


def default_embedding(which: str, pipe: DAGStableDiffusionPipeline):
    if which == "mini":
        from dag_safety.embeddings import RED_STAR

        return RED_STAR
    if which == "tiny":
        ids = pipe.tokenizer(
            "red star", padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0, :3]  # start-of-text, "red", "star"
    raise SystemExit("sd14 needs `--embedding`: a guideline embedding fitted to SD v1.4 (directory or Hub repo).")


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(DEFAULTS), help="sd14 (Hub, GPU), mini (offline) or tiny (smoke)")
    parser.add_argument("--model", help="diffusers model directory or Hub id")
    parser.add_argument("--embedding", help="guideline embedding: GuidelineEmbedding directory or Hub repo")
    parser.add_argument("--weights", help="safety weights: a directory, .safetensors file or Hub repo")
    parser.add_argument("--weight-name", help="file name inside --weights")
    parser.add_argument("--kind", default="auto", choices=["auto", "focus-n-fix", "spf"])
    parser.add_argument("--scale", type=float, default=1.0, help="strength of the safety weights")
    parser.add_argument("--prompt")
    parser.add_argument("--safety-concept")
    parser.add_argument("--guidance", default="sega", choices=["sega", "sld"], help="DAG's base guidance")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device")
    parser.add_argument("--fp16", action="store_true", help="load the model in float16 (GPU)")
    parser.add_argument("--output-dir", default="out/dag_with_focus_n_fix")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    defaults = DEFAULTS[args.which]
    options = {
        key: getattr(args, key) if getattr(args, key, None) is not None else value for key, value in defaults.items()
    }

    pipe = build_pipeline(args.which, options["model"], torch.float16 if args.fp16 else torch.float32)
    pipe = pipe.to(options["device"])
    pipe.set_progress_bar_config(disable=True)
    embedding = options["embedding"] or default_embedding(args.which, pipe)
    if options["weights"] is None:
        raise SystemExit("Pass `--weights`: a Focus-N-Fix LoRA (or SPF weights) directory, file or Hub repo.")

    def generate(**kwargs):
        generator = torch.Generator(options["device"]).manual_seed(args.seed)
        return pipe(
            options["prompt"], num_inference_steps=options["steps"], generator=generator, output_type="np", **kwargs
        )

    results = {"base": generate().images, "dag": None, "weights": None, "dag+weights": None}
    pipe.enable_dag(embedding, guidance=args.guidance)
    dag = generate(safety_concept=options["safety_concept"])
    results["dag"] = dag.images
    logger.info("DAG alone: unsafe detected %s", dag.unsafe_detected)

    # Load the weights with DAG on: enable_dag snapshotted the detection layers' to_q / to_k of the base model, which
    # the guideline embedding was fitted to, so detection keeps scoring with those even if the weights change them.
    record = pipe.load_safety_weights(
        options["weights"], kind=args.kind, scale=args.scale, weight_name=args.weight_name
    )
    logger.info("Loaded %r as %s (%s)", record.path, record.kind.value, record.detail)
    both = generate(safety_concept=options["safety_concept"])
    results["dag+weights"] = both.images
    logger.info("DAG + %s: unsafe detected %s", record.kind.value, both.unsafe_detected)
    pipe.disable_dag()
    results["weights"] = generate().images

    pipe.unload_safety_weights()
    pipe.enable_dag(embedding, guidance=args.guidance)
    restored = generate(safety_concept=options["safety_concept"]).images
    logger.info("After unloading, DAG alone reproduced exactly: %s", bool(np.array_equal(restored, results["dag"])))

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    row = []
    for name, images in results.items():
        image = to_pil(images)[0]
        image.save(out / f"{name.replace('+', '_')}.png")
        row.append(image)
    grid = Image.new("RGB", (sum(i.width for i in row), row[0].height))
    for index, image in enumerate(row):
        grid.paste(image, (index * image.width, 0))
    grid.save(out / "grid.png")
    logger.info("Wrote %s (base | DAG | weights | DAG + weights)", out / "grid.png")


if __name__ == "__main__":
    main()
