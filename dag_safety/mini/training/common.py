"""Shared plumbing of the mini model's training scripts: seeded data, checkpoints, loss logs, EMA."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..world import TRAIN_SEEDS, render_scene

__all__ = [
    "EMA",
    "LossLog",
    "load_checkpoint",
    "render_training_set",
    "resume_or_start",
    "save_checkpoint",
    "seed_everything",
]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def render_training_set(num_scenes: int, offset: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Render scenes `TRAIN_SEEDS[offset : offset + num_scenes]`.

    Returns:
        `tuple[torch.Tensor, list[str]]`: images `(N, 3, 64, 64)` uint8 and their captions.
    """
    if offset + num_scenes > len(TRAIN_SEEDS):
        raise ValueError(f"Only {len(TRAIN_SEEDS)} training seeds exist, asked for {offset + num_scenes}.")
    images = np.empty((num_scenes, 64, 64, 3), dtype=np.uint8)
    captions = []
    for i in range(num_scenes):
        scene = render_scene(TRAIN_SEEDS[offset + i])
        images[i] = scene.image
        captions.append(scene.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` in [0, 255] → float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


class LossLog:
    """Append-only JSONL log, one record per step (`step`, `loss`, extra fields, `time` since start)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def truncate_after(self, step: int) -> None:
        """Drop records after `step` (used on resume so the log matches the checkpoint)."""
        if not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def write(self, step: int, **values: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values, "time": round(time.time() - self.start, 2)}) + "\n")


class EMA:
    """Exponential moving average of a module's parameters, with a warm-up (`decay = min(decay, (1+n)/(10+n))`)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        state = module.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        # One multi-tensor kernel instead of two per tensor: on a GPU the per-tensor loop was kernel-launch bound.
        torch._foreach_lerp_([self.shadow[k] for k in floats], [state[k].detach().float() for k in floats], 1 - d)
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Loads a checkpoint's averages onto the device of this average's module (checkpoints load on the CPU)."""
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}


def save_checkpoint(path: str | os.PathLike, **state) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state["rng"] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a resume checkpoint written by `save_checkpoint` and restore the RNG states it holds.

    The file holds NumPy and Python RNG state besides tensors, so it is unpickled (`weights_only=False`): it is a
    run's own resume file, never a file from elsewhere. Weights the package ships or reads are safetensors.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state


def resume_or_start(path: str | os.PathLike, log: LossLog, resume: bool, **stateful: Any) -> int:
    """Continue a run from its checkpoint, or start it afresh; returns the step to continue from.

    With `resume` and a checkpoint at `path`, every object of `stateful` (model, optimizer, scheduler, EMA: anything
    with `load_state_dict`) is loaded from the checkpoint entry of the same name, the RNG states are restored and
    `log` is cut back to the checkpoint's step. Otherwise the old log is deleted and the run starts at step 0.
    """
    path = Path(path)
    if not (resume and path.exists()):
        log.path.unlink(missing_ok=True)
        return 0
    state = load_checkpoint(path)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    log.truncate_after(state["step"])
    logger.info("Resumed from step %d", state["step"])
    return state["step"]
