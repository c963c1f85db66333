"""Speed and peak memory of DAG against its peers, run interleaved in one process.

Peers: plain `StableDiffusionPipeline`, diffusers' deprecated `StableDiffusionPipelineSafe` (SLD medium) and
`SemanticStableDiffusionPipeline` (SEGA, reversed safety concept), and ours: SLD (medium), SEGA, DAG + SEGA on a
prompt with the target and on a benign prompt, and DAG + SEGA attached to a stock pipeline (`DAGGuidance`) on the
benign prompt. Every method shares the same components; runs are interleaved
(round-robin over methods, `--repeats` rounds after one warm-up round) and the median seconds per image is
reported with its ratio to plain generation. The ratios the issue sets targets for are also given as the median of
per-round ratios (each round's two runs are neighbours in time, so a slow stretch of a shared host cancels out).

DAG's detection on its own: the host time of each detecting step's `DAGState.detect_step` (the attention maps, the
components, their presence scores and the scale map), summed per image in the timed rounds, as milliseconds per
detecting step and as a share of plain generation's median time. It is what DAG adds on a prompt it does not
guide; on CUDA the timer starts once the UNet's kernels are done.

Work, which unlike time does not depend on the host: UNet calls and UNet batch rows per image (counted in every timed
round; DAG's depend on what it detects), and aten operations per image, counted with `torch.profiler` during the
untimed warm-up round (seed 0). Where two methods issue the same operations, a time difference between them is
noise.

Memory, as ratios to plain: the peak during one generation, and the generation's own share of it (the peak minus
what was held before the call: weights, the pipeline). The first is what a machine must have, but the weights
dominate it; the second shows what a method adds. On CUDA `torch.cuda.max_memory_allocated` per method in this
process; on the CPU (Linux) the resident set of a fresh child process that loads the model, resets its peak
(`/proc/self/clear_refs`) and generates once (`VmHWM`, `VmRSS`). Times are reported as medians with their range.

Models:
- `mini`: the bundled mini model with the committed red-star embedding (benign prompt: no red star);
- `sd14-random`: an SD v1.4-architecture pipeline with random weights (UNet 4 channels, 768-wide
  cross-attention; CLIP ViT-L-shaped text encoder over a small vocabulary). Without trained weights nothing is
  "benign", so DAG is timed in its two regimes: guided at every step after warm-up (`max_edit_area=1`, the most
  work) and detecting nothing (an embedding whose concept rows equal its start-of-text row, the least work).

    python -m benchmarks.speed --model mini
    python -m benchmarks.speed --model sd14-random --size 256 --steps 10 --repeats 3  # CPU, 20 min on 2 cores
    python -m benchmarks.speed --model sd14-random --size 512 --steps 50 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    SemanticStableDiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionPipelineSafe,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from dag_safety import DAGStableDiffusionPipeline
from dag_safety.state import DAGState

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = "a red star"
TARGET_PROMPT = "a red star and a blue circle on a white background"
BENIGN_PROMPT = "a blue circle and a green square on a white background"
METHODS = (
    "plain",
    "diffusers SLD",
    "diffusers SEGA",
    "ours SLD",
    "ours SEGA",
    "ours DAG+SEGA (target)",
    "ours DAG+SEGA (benign)",
    "ours DAG+SEGA paper (benign)",
    "attached DAG+SEGA (benign)",
)


class Attached:
    """A stock `StableDiffusionPipeline` with `DAGGuidance` attached for the length of each call (the methods share
    one UNet, so it must not stay attached between calls); attaching snapshots the detection layers' projections,
    a few small matrix products, and is timed with the call."""

    def __init__(self, pipe: StableDiffusionPipeline, dag):
        self.pipe, self.dag = pipe, dag

    def __call__(self, **kwargs):
        with self.dag.attach(self.pipe):
            return self.pipe(**kwargs)

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def to(self, *args, **kwargs) -> Attached:
        self.pipe.to(*args, **kwargs)
        return self


def sd14_random_components() -> dict:
    """SD v1.4's UNet and VAE architectures with random weights; a CLIP ViT-L/14-shaped text encoder."""
    from dag_safety.mini import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def load_components(model: str) -> dict:
    if model == "sd14-random":
        return sd14_random_components()
    from dag_safety.mini import MODEL_PATH

    pipe = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH if model == "mini" else model)
    return {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}


def build(method: str, components: dict, model: str, device: str):
    """`(pipeline, call kwargs)` for one method; every pipeline shares `components`."""
    parts = dict(components, scheduler=DDIMScheduler.from_config(components["scheduler"].config))
    shared = dict(parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    kwargs = {"prompt": TARGET_PROMPT}
    if method == "plain":
        pipe = StableDiffusionPipeline(**shared, image_encoder=None)
    elif method == "attached DAG+SEGA (benign)":
        from dag_safety import DAGGuidance
        from dag_safety.guideline_embedding import GuidelineEmbedding

        pipe = StableDiffusionPipeline(**shared, image_encoder=None)
        if model == "sd14-random":
            from dag_safety.optimize import encode_init_rows

            rows = encode_init_rows(pipe, "red star")
            embedding = rows[:1].repeat(rows.shape[0], 1)  # as "ours DAG+SEGA (benign)": nothing detected
        else:
            embedding = GuidelineEmbedding.from_pretrained(str(ROOT / "embeddings" / "red-star"))
            kwargs["prompt"] = BENIGN_PROMPT
        pipe = Attached(pipe, DAGGuidance(embedding, safety_concept=CONCEPT))
    elif method == "diffusers SLD":
        pipe = StableDiffusionPipelineSafe(**shared, image_encoder=None)
        pipe.safety_concept = CONCEPT
        kwargs.update(
            sld_guidance_scale=1000, sld_warmup_steps=10, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4
        )
    elif method == "diffusers SEGA":
        pipe = SemanticStableDiffusionPipeline(**shared)
        kwargs.update(editing_prompt=[CONCEPT], reverse_editing_direction=True)
    else:
        pipe = DAGStableDiffusionPipeline(**shared, image_encoder=None)
        kwargs["safety_concept"] = CONCEPT
        if method == "ours SLD":
            pipe.enable_safety_guidance("sld", "medium")
        elif method == "ours SEGA":
            pipe.enable_safety_guidance("sega")
        else:
            benign = method.endswith("(benign)")
            # the paper's method by name (with the mini model, beside the embedding's own selective default)
            rule = {"detection": "paper"} if "paper" in method else {}
            if model == "sd14-random":
                from dag_safety.optimize import encode_init_rows

                rows = encode_init_rows(pipe, "red star")
                if benign:  # concept rows equal to the SoT row: a flat map, nothing detected
                    pipe.enable_dag(rows[:1].repeat(rows.shape[0], 1), **rule)
                else:  # guided at every step after warm-up
                    pipe.enable_dag(rows, max_edit_area=1.0, **rule)
            else:
                pipe.enable_dag(str(ROOT / "embeddings" / "red-star"), **rule)
                if benign:
                    kwargs["prompt"] = BENIGN_PROMPT
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), kwargs


PAIRED_RATIOS = {
    "DAG + SEGA (target) / our SEGA": ("ours DAG+SEGA (target)", "ours SEGA"),
    "DAG + SEGA (benign) / plain": ("ours DAG+SEGA (benign)", "plain"),
    "DAG + SEGA paper (benign) / plain": ("ours DAG+SEGA paper (benign)", "plain"),
    "attached DAG + SEGA (benign) / ours": ("attached DAG+SEGA (benign)", "ours DAG+SEGA (benign)"),
    "our SLD / diffusers SLD": ("ours SLD", "diffusers SLD"),
    "our SEGA / diffusers SEGA": ("ours SEGA", "diffusers SEGA"),
}


class UNetWork:
    """Counts the evaluations and batch rows of a UNet (a pre-hook on its first layer, `conv_in`, which sees every
    evaluation's real batch, also inside DAG's UNet wrapper; every method shares the UNet)."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = 0
        self.rows = 0
        self._handle = unet.conv_in.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]

    def take(self) -> tuple[int, int]:
        """`(calls, rows)` since the last `take`."""
        counts = (self.calls, self.rows)
        self.calls = self.rows = 0
        return counts


class DetectionTime:
    """Host seconds spent in `DAGState.detect_step` and the steps it ran, for every DAG method in this process
    (the method is patched on the class until [`close`]); on CUDA the timer starts after a synchronisation, so that
    the UNet's kernels are not counted."""

    def __init__(self, device: str):
        self.seconds = 0.0
        self.steps = 0
        self._original = original = DAGState.detect_step
        synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

        def timed(state, *args, **kwargs):
            synchronize()
            started = time.perf_counter()
            try:
                return original(state, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.steps += 1

        DAGState.detect_step = timed

    def take(self) -> tuple[float, int]:
        """`(seconds, steps)` since the last `take`."""
        taken = (self.seconds, self.steps)
        self.seconds, self.steps = 0.0, 0
        return taken

    def close(self) -> None:
        DAGState.detect_step = self._original


def count_aten_operations(pipe, kwargs: dict, steps: int, size: int | None, seed: int) -> int:
    """aten operations one generation issues (nested ones included), counted with `torch.profiler`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(pipe, kwargs, steps, size, seed)
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def generate(pipe, kwargs: dict, steps: int, size: int | None, seed: int):
    extra = {"height": size, "width": size} if size else {}
    return pipe(
        num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np", **extra, **kwargs
    )


def _proc_status_mib(field: str) -> float:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"No {field} in /proc/self/status.")


def child_generation_memory(args, method: str) -> tuple[float, float]:
    """`(peak, generation)` resident memory in MiB of a fresh process that loads the components and generates one
    image: the peak during the call, and that peak minus the resident memory before it."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.speed",
        "--child",
        method,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ] + (["--size", str(args.size)] if args.size else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    peak, generation = json.loads(output.strip().splitlines()[-1])
    return peak, generation


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini", help="'mini', 'sd14-random' or a pipeline path / Hub id")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/speed_<model>")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda") and not args.no_memory and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("CPU memory is measured through Linux's /proc; on this system pass --no-memory.")

    components = load_components(args.model)
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(device=args.device, dtype=getattr(torch, args.dtype))
    if args.child:
        pipe, kwargs = build(args.child, components, args.model, args.device)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _proc_status_mib("VmRSS")
        generate(pipe, kwargs, args.steps, args.size, 0)
        peak = _proc_status_mib("VmHWM")
        print(json.dumps([peak, peak - before]))
        return

    pipes = {m: build(m, components, args.model, args.device) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    unet_work = UNetWork(components["unet"])
    unet_calls: dict[str, list[int]] = {m: [] for m in METHODS}
    unet_rows: dict[str, list[int]] = {m: [] for m in METHODS}
    detection = DetectionTime(args.device)
    detection_seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    detection_steps: dict[str, list[int]] = {m: [] for m in METHODS}
    aten_operations: dict[str, int] = {}
    memory: dict[str, float] = {}
    generation_memory: dict[str, float] = {}
    try:
        for round_index in range(args.repeats + 1):  # round 0 warms up
            for method, (pipe, kwargs) in pipes.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated() / 2**20
                started = time.perf_counter()
                if round_index:
                    generate(pipe, kwargs, args.steps, args.size, round_index)
                else:  # the untimed warm-up round counts the operations
                    aten_operations[method] = count_aten_operations(pipe, kwargs, args.steps, args.size, round_index)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    memory[method] = torch.cuda.max_memory_allocated() / 2**20
                    generation_memory[method] = memory[method] - before
                calls, rows = unet_work.take()
                seconds, steps = detection.take()
                if round_index:
                    times[method].append(time.perf_counter() - started)
                    unet_calls[method].append(calls)
                    unet_rows[method].append(rows)
                    detection_seconds[method].append(seconds)
                    detection_steps[method].append(steps)
            print(f"round {round_index}/{args.repeats} done", file=sys.stderr)
    finally:
        detection.close()
    if not args.device.startswith("cuda") and not args.no_memory:
        for method in METHODS:
            memory[method], generation_memory[method] = child_generation_memory(args, method)

    medians = {m: statistics.median(v) for m, v in times.items()}
    plain = medians["plain"]
    paired = {}
    for label, (numerator, denominator) in PAIRED_RATIOS.items():
        per_round = [a / b for a, b in zip(times[numerator], times[denominator])]
        paired[label] = {
            "of_medians": medians[numerator] / medians[denominator],
            "median": statistics.median(per_round),
            "per_round": per_round,
        }
    # per DAG method: the detection's median seconds per image, its steps per image, and its share of plain's time
    detection_summary = {
        m: {
            "seconds_median": statistics.median(detection_seconds[m]),
            "steps": statistics.mean(detection_steps[m]),
            "share_of_plain": statistics.median(detection_seconds[m]) / plain,
        }
        for m in METHODS
        if any(detection_steps[m])
    }
    results = {
        "model": args.model,
        "device": args.device,
        "machine": (
            torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        ),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "steps": args.steps,
        "size": args.size,
        "repeats": args.repeats,
        "seconds": times,
        "seconds_median": medians,
        "ratio_to_plain": {m: medians[m] / plain for m in METHODS},
        "paired_ratios": paired,
        "unet_calls": unet_calls,
        "unet_rows": unet_rows,
        "aten_operations_warmup": aten_operations,
        "detection_seconds": detection_seconds,
        "detection": detection_summary,
        "peak_memory_mib": memory,
        "memory_ratio_to_plain": {m: memory[m] / memory["plain"] for m in memory} if memory else {},
        "generation_memory_mib": generation_memory,
        "generation_memory_ratio_to_plain": (
            {m: generation_memory[m] / generation_memory["plain"] for m in generation_memory}
            if generation_memory
            else {}
        ),
        "command": "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"speed_{args.model.replace('/', '_')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    memory_kind = (
        "CUDA max allocated during the call, and its excess over the allocation before it"
        if args.device.startswith("cuda")
        else "peak resident set of a fresh process during the call, and its excess over the resident set before it"
    )
    lines = [
        f"# Speed: {args.model} on {args.device}",
        "",
        (
            f"`{results['command']}`; {results['machine']}, torch {results['torch']}, {args.dtype}; {args.steps} steps,"
            f" {args.repeats} interleaved rounds after a warm-up round; memory: {memory_kind}."
        ),
        "",
        (
            "| method | s / image (median) | range | × plain | peak MiB | × plain | generation MiB | × plain"
            " | UNet calls / rows | aten ops (seed 0) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in METHODS:
        mem = "n/a | n/a | n/a | n/a"
        if m in memory:
            mem = (
                f"{memory[m]:.0f} | {results['memory_ratio_to_plain'][m]:.3f} | {generation_memory[m]:.1f} |"
                f" {results['generation_memory_ratio_to_plain'][m]:.3f}"
            )
        spread = f"{min(times[m]):.3f} – {max(times[m]):.3f}"
        work = f"{statistics.mean(unet_calls[m]):g} / {statistics.mean(unet_rows[m]):g} | {aten_operations[m]:,}"
        lines.append(f"| {m} | {medians[m]:.3f} | {spread} | {results['ratio_to_plain'][m]:.3f} | {mem} | {work} |")
    lines += [
        "",
        (
            "UNet calls / rows: per image, averaged over the timed rounds. Ratios of the medians above, and the"
            " median (range) of the per-round ratios:"
        ),
        "",
        "| ratio | of medians | per round, median (range) |",
        "| --- | --- | --- |",
    ]
    for label, ratio in paired.items():
        lines.append(
            f"| {label} | {ratio['of_medians']:.3f} | {ratio['median']:.3f}"
            f" ({min(ratio['per_round']):.3f} – {max(ratio['per_round']):.3f}) |"
        )
    if detection_summary:
        lines += [
            "",
            "DAG's detection (`DAGState.detect_step`), host time in the timed rounds:",
            "",
            "| method | ms / image (median) | detecting steps / image | ms / step | share of plain's time |",
            "| --- | --- | --- | --- | --- |",
        ]
        for m, item in detection_summary.items():
            per_step = 1000 * item["seconds_median"] / item["steps"]
            lines.append(
                f"| {m} | {1000 * item['seconds_median']:.1f} | {item['steps']:g} | {per_step:.2f} |"
                f" {100 * item['share_of_plain']:.1f} % |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
