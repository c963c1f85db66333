"""Safety guiders: the per-call state of SLD, SEGA and DAG guidance, stepped at every UNet call.

Every guider has one interface, so the UNet wrapper of [`~dag_safety.DAGGuidance`] / [`~dag_safety.SafetyGuidance`]
(which every pipeline of this package attaches for its calls) runs any of them the same way, one at a time by
construction. At step `i` of a call:

1. `rows = guider.safety_rows(i)`: how many safety-concept rows to run in the same UNet batch as the CFG pass;
2. under `with guider.capturing(i, batch):` the UNet runs on `[uncond, cond, safety_1 .. safety_rows]`;
3. `guider.guide(i, e_u, e_p, e_s, run_safety, sample, timestep)` returns the guided noise prediction, calling
   `run_safety()` for the safety predictions only if it needs them and they were not in the batch.

A guider is made for one call and thrown away after it: nothing of one call reaches the next.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator

import torch

from .config import SEGAConfig, SLDConfig
from .fill import alpha_prod_at, check_fill_scheduler, fill_noise_pred, final_alpha_prod, final_fill_noise_pred
from .guidance import dag_noise_pred, sega_noise_pred, sld_noise_pred
from .state import DAGState

__all__ = ["DAGGuider", "PlainSafetyGuider", "SafetyGuider"]

SafetyPredictions = Callable[[], list[torch.Tensor]]


class SafetyGuider:
    """The interface of a per-call safety guider (see the module docstring)."""

    def __init__(self, guidance_scale: float, num_concepts: int):
        self.guidance_scale = guidance_scale
        self.num_concepts = num_concepts
        self.momentum: torch.Tensor | None = None

    def safety_rows(self, step: int) -> int:
        """How many safety-concept rows step `step` runs in the CFG pass's UNet batch (`0` to `num_concepts`)."""
        return self.num_concepts

    def capturing(self, step: int, batch: int) -> contextlib.AbstractContextManager:
        """A context around step `step`'s UNet call; DAG captures the conditional rows' queries there."""
        return contextlib.nullcontext()

    def guide(
        self,
        step: int,
        noise_pred_uncond: torch.Tensor,
        noise_pred_text: torch.Tensor,
        noise_preds_safety: list[torch.Tensor],
        run_safety: SafetyPredictions,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
    ) -> torch.Tensor:
        """The guided noise prediction of step `step`, `(B, C, h, w)`.

        Args:
            noise_pred_uncond, noise_pred_text (`torch.Tensor`): `e_u`, `e_p`, `(B, C, h, w)`.
            noise_preds_safety (`list[torch.Tensor]`): `e_s` per concept, as many as `safety_rows(step)` asked for.
            run_safety (`Callable`): returns every concept's `e_s` when the batch did not hold them.
            sample (`torch.Tensor`): the UNet's input `x_t` of the CFG batch, `(2B, C, h, w)`.
            timestep (`float` or `torch.Tensor`): the UNet's timestep (a scalar or `(2B,)`).
        """
        raise NotImplementedError


class PlainSafetyGuider(SafetyGuider):
    """SLD or SEGA as diffusers' pipelines apply them: the safety pass at every step (their momentum builds up
    during warm-up), no detection.

    Args:
        config ([`SLDConfig`] or [`SEGAConfig`]): the method and its settings.
        guidance_scale (`float`): the classifier-free guidance scale `s_g`.
        num_concepts (`int`): safety concepts (SLD: one).
    """

    def __init__(self, config: SLDConfig | SEGAConfig, guidance_scale: float, num_concepts: int):
        super().__init__(guidance_scale, num_concepts)
        self.config = config

    def guide(self, step, noise_pred_uncond, noise_pred_text, noise_preds_safety, run_safety, sample, timestep):
        if len(noise_preds_safety) < self.num_concepts:
            noise_preds_safety = run_safety()
        if isinstance(self.config, SLDConfig):
            noise_pred, self.momentum = sld_noise_pred(
                noise_pred_uncond,
                noise_pred_text,
                noise_preds_safety[0],
                self.guidance_scale,
                self.momentum,
                step,
                self.config,
            )
        else:
            noise_pred, self.momentum = sega_noise_pred(
                noise_pred_uncond,
                noise_pred_text,
                noise_preds_safety,
                self.guidance_scale,
                self.momentum,
                step,
                self.config,
            )
        return noise_pred


class DAGGuider(SafetyGuider):
    """Detect-and-Guide for one call.

    From warm-up on, each step's conditional queries give the detection map and `S_dag`. The safety pass is needed
    only once the map shows something; while the last step needed it, it runs in the same UNet batch as the CFG
    pass (as SLD / SEGA do: one call instead of two), and its output is dropped should this step's map show
    nothing. Until something is detected, every step is the CFG pass alone, bit for bit.

    Args:
        state ([`DAGState`]): the prepared embedding, projections and config.
        guidance_scale (`float`): `s_g`.
        num_concepts (`int`): safety concepts (`e_s` rows).
        map_step (`int`, *optional*): a step whose detection map to keep even before warm-up ends (the last step,
            for `return_dag_maps`).
        scheduler (*optional*): the pipeline's scheduler, whose noise schedule and prediction type
            `erase_mode="fill"` and `"fill_final"` read.

    Attributes, read after (or during) the call:
        dag_map (`torch.Tensor | None`): the last detection map, `(B, h, w)` on the CPU.
        scale (`torch.Tensor | None`): the last step's `S_dag` on the latents' device, `None` where it guided nothing.
        modified (`bool`): whether the last step's prediction differs from the classifier-free one (under
            `erase_mode="fill_final"` only at the last step, whatever `scale` says).
        unsafe_detected (`torch.Tensor | None`): `(B,)` bool, whether any guided step detected something.
        presence_peak (`torch.Tensor | None`): under `detection="presence"` or `"head"`, `(B,)` the
            `confirm_steps`-th highest of the guided steps' peak component presence (with the default 1, the
            highest): an image is guided at some step exactly when it reaches `presence_threshold`.
    """

    def __init__(
        self,
        state: DAGState,
        guidance_scale: float,
        num_concepts: int,
        map_step: int | None = None,
        scheduler=None,
    ):
        super().__init__(guidance_scale, num_concepts)
        self.state = state
        self.config = state.config
        self.map_step = map_step
        self.scheduler = scheduler
        if self.config.erase_mode != "guidance":
            # checked before the first step, so a call that cannot fill fails before it generates anything
            check_fill_scheduler(scheduler)
        # `"fill_final"`: `(step, S_dag > 0)` of the last `fill_window` guided steps
        self._guided_regions: deque[tuple[int, torch.Tensor]] = deque(maxlen=self.config.fill_window)
        self.modified = False
        self.dag_map: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.unsafe_detected: torch.Tensor | None = None
        self.presence_peak: torch.Tensor | None = None
        self._top_peaks: torch.Tensor | None = None
        self._evidence = None  # `DAGState.detect_step`'s running evidence
        self._safety_last_step = False

    def _guided(self, step: int) -> bool:
        return step >= self.config.warmup_steps

    def _detects(self, step: int) -> bool:
        return self._guided(step) or step == self.map_step

    def safety_rows(self, step: int) -> int:
        needed = self.config.erase_mode == "guidance" and self._guided(step) and self._safety_last_step
        return self.num_concepts if needed else 0

    @contextlib.contextmanager
    def capturing(self, step: int, batch: int) -> Iterator[None]:
        store = self.state.capture.store
        if self._detects(step):
            # the prompt's rows of `[uncond, cond, safety...]`
            store.arm(slice(batch, 2 * batch))
        try:
            yield
        finally:
            store.disarm()

    def guide(self, step, noise_pred_uncond, noise_pred_text, noise_preds_safety, run_safety, sample, timestep):
        batch = noise_pred_uncond.shape[0]
        if self.unsafe_detected is None:
            self.unsafe_detected = torch.zeros(batch, dtype=torch.bool)
            if self.config.detection != "paper":
                # the `confirm_steps` highest peaks so far, highest first
                self._top_peaks = torch.zeros(batch, self.config.confirm_steps)
                self.presence_peak = self._top_peaks[:, -1]
        if self._detects(step):
            # on the host, from the maps `DAGState.shares` copied there: no further synchronisation
            self.dag_map, scale_map, self._evidence = self.state.detect_step(
                tuple(noise_pred_uncond.shape[-2:]), self._evidence
            )
            self.state.capture.store.clear()
        scale = None
        if self._guided(step):
            self.unsafe_detected |= scale_map.detected
            if self.presence_peak is not None:
                peaks = torch.cat([self._top_peaks, scale_map.presence[:, None]], dim=1)
                self._top_peaks = peaks.topk(self.config.confirm_steps, dim=1).values
                self.presence_peak = self._top_peaks[:, -1]
            if bool(scale_map.detected.any()):
                # non-blocking only where it is known to be safe from pageable memory (CUDA stages it)
                device = noise_pred_uncond.device
                scale = scale_map.scale.to(device, noise_pred_uncond.dtype, non_blocking=device.type == "cuda")
        self.scale = scale
        self._safety_last_step = scale is not None
        self.modified = scale is not None and self.config.erase_mode != "fill_final"
        if self.config.erase_mode == "fill_final":
            return self._final_fill(step, noise_pred_uncond, noise_pred_text, sample[batch:], timestep)
        if scale is None:
            # Nothing to guide: S_dag = 0 makes the safety term exactly zero, so the safety pass is skipped and the
            # step is the classifier-free one; the momentum only decays.
            if self.momentum is not None:
                self.momentum = self.config.mom_beta * self.momentum
            return noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.config.erase_mode == "fill":
            return fill_noise_pred(
                noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond),
                sample[batch:],
                alpha_prod_at(self.scheduler, timestep),
                scale > 0,
                self.scheduler.config.prediction_type,
            )
        if not noise_preds_safety:
            noise_preds_safety = run_safety()
        noise_pred, self.momentum = dag_noise_pred(
            noise_pred_uncond,
            noise_pred_text,
            noise_preds_safety,
            self.guidance_scale,
            scale,
            self.momentum,
            self.config,
        )
        return noise_pred

    def _final_fill(self, step, noise_pred_uncond, noise_pred_text, latents, timestep) -> torch.Tensor:
        """`erase_mode="fill_final"`: the classifier-free prediction, except at the scheduler's last timestep, where
        the union of the regions guided (`S_dag > 0`) over the last `fill_window` steps, grown by up to
        `fill_growth` pixels over the object, is filled from its surroundings
        ([`~dag_safety.fill.final_fill_noise_pred`])."""
        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.scale is not None:
            self._guided_regions.append((step, self.scale > 0))
        window = [region for guided, region in self._guided_regions if guided > step - self.config.fill_window]
        # the timestep is read (a device synchronisation on a GPU) only where there is something to fill
        if not (window and float(torch.as_tensor(timestep).flatten()[0]) == float(self.scheduler.timesteps[-1])):
            return noise_pred
        self.modified = True
        return final_fill_noise_pred(
            noise_pred,
            latents,
            alpha_prod_at(self.scheduler, timestep),
            final_alpha_prod(self.scheduler),
            torch.stack(window).any(dim=0),
            self.scheduler.config.prediction_type,
            self.config.fill_growth,
            self.config.fill_contrast,
        )
