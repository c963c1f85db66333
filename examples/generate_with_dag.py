"""DAG on the bundled mini model, offline: the same prompt undefended and with DAG + SEGA, plus the detection map.

python examples/generate_with_dag.py --out out/example.png
"""

import argparse
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.embeddings import RED_STAR
from dag_safety.mini import MODEL_PATH, SAFETY_CONCEPT_TEXT
from dag_safety.visualize import heat_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a red star and a blue circle on a white background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/example.png"))
    args = parser.parse_args()

    pipe = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH)
    undefended = pipe(args.prompt, num_inference_steps=25, generator=torch.manual_seed(args.seed)).images[0]

    pipe.enable_dag(RED_STAR, guidance="sega")
    output = pipe(
        args.prompt,
        num_inference_steps=25,
        generator=torch.manual_seed(args.seed),
        safety_concept=SAFETY_CONCEPT_TEXT,
        return_dag_maps=True,
    )
    print(f"unsafe content detected: {output.unsafe_detected[0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tiles = [undefended, output.images[0], heat_map(output.images[0], output.dag_maps[0])]
    make_image_grid(tiles, rows=1, cols=3).resize((3 * 256, 256)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
