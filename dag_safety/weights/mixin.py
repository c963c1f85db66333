"""`SafetyWeightsMixin`: the public methods that load, scale, fuse and unload safety weights on a pipeline; the work
is done in `files`, `kinds`, `lora` and `spf`."""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers.utils import logging

from .._validation import check_finite_number
from .files import read_safetensors_header, resolve_weights_file
from .kinds import LoadedSafetyWeights, SafetyWeightsKind, detect_kind
from .lora import (
    DEFAULT_LORA_ADAPTER,
    check_nothing_merged,
    forget_removed_adapters,
    fuse_lora_adapters,
    load_lora,
    set_lora_scale,
    unfuse_lora_adapters,
    unload_lora,
)
from .spf import DEFAULT_SPF_NAME, _SPFState, load_spf, restore_spf

__all__ = ["SafetyWeightsMixin"]

logger = logging.get_logger(__name__)


def _check_scale(scale: Any) -> float:
    """A strength must be a finite real number: NaN or Inf turns every image into NaN, a bool or a string is a slip."""
    check_finite_number("scale", scale, " such as 0.8 (0 leaves the output unchanged)")
    return float(scale)


class SafetyWeightsMixin:
    r"""
    Loads, scales, fuses and unloads fine-tuned safety weights on a [`StableDiffusionPipeline`] subclass.

    - [`load_safety_weights`]: a Focus-N-Fix LoRA (a named peft adapter) or SPF-Portrait `attn2` weights.
    - [`unload_safety_weights`]: removes one or all of them; the UNet and text encoder are bit-identical afterwards.
    - [`set_safety_weights_scale`], [`fuse_safety_weights`] / [`unfuse_safety_weights`] for LoRA adapters.

    Guideline embeddings stay valid: `enable_dag` snapshots the detection layers' `to_q` / `to_k`, so loading weights
    after it changes the generation, not how a hidden state is scored.

    Examples:
        ```py
        >>> from dag_safety import DAGStableDiffusionPipeline

        >>> pipe = DAGStableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4").to("cuda")
        >>> pipe.enable_dag("your-org/nudity-guideline-sd14")  # snapshots to_q / to_k for detection
        >>> pipe.load_safety_weights("your-org/focus-n-fix-sd14", kind="focus-n-fix", scale=0.8)
        >>> image = pipe("a photo of a person on a beach", safety_concept="nudity").images[0]
        >>> pipe.unload_safety_weights()  # the UNet is bit-identical to before

        >>> pipe.load_safety_weights("./spf_attn2.safetensors", kind="spf", scale=0.5)  # W0 + 0.5 (W - W0)
        ```
    """

    # state the `lora` and `spf` functions keep on the pipeline: records by name, SPF originals, fused base weights
    _safety_lora: dict[str, LoadedSafetyWeights] | None = None
    _safety_spf: _SPFState | None = None
    _safety_fused: tuple[list[str], dict[str, torch.Tensor]] | None = None

    @property
    def safety_weights(self) -> dict[str, LoadedSafetyWeights]:
        """The loaded safety weights by name (LoRA adapters, then the SPF record)."""
        forget_removed_adapters(self)
        records = dict(self._safety_lora or {})
        if self._safety_spf is not None:
            records[self._safety_spf.record.name] = self._safety_spf.record
        return records

    def load_safety_weights(
        self,
        path_or_repo_id: str | os.PathLike,
        kind: str | SafetyWeightsKind = "auto",
        scale: float = 1.0,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        *,
        replace: bool = False,
        allow_non_attn2: bool = False,
        **hub_kwargs: Any,
    ) -> LoadedSafetyWeights:
        r"""
        Loads Focus-N-Fix LoRA weights or SPF-Portrait cross-attention weights into the pipeline.

        Args:
            path_or_repo_id (`str` or `os.PathLike`):
                A `.safetensors` file, a directory holding one, or a Hub repo id (downloaded with
                `huggingface_hub.hf_hub_download` and `hub_kwargs`).
            kind (`str`, *optional*, defaults to `"auto"`):
                `"focus-n-fix"` (a LoRA: diffusers, kohya or PEFT keys), `"spf"` (an `attn2` state dict), or `"auto"`
                (LoRA when a key contains `"lora"`, SPF when the metadata says `format` or every key is an `attn2`
                parameter; the decision is logged and returned in `detail`).
            scale (`float`, *optional*, defaults to 1.0):
                Strength: the LoRA adapter weight, or the SPF interpolation `W0 + scale * (W - W0)`. 0 leaves the
                output unchanged.
            adapter_name (`str`, *optional*):
                The name to load under (defaults to `"focus_n_fix"` for a LoRA, `"spf"` for SPF). Several LoRA
                adapters can be loaded under different names; only one set of SPF weights at a time. A LoRA whose
                tensors equal those of an adapter already loaded (the same file, or a conversion of it) is loaded,
                since stacking copies is a way to apply one LoRA at more than weight 1.0, but a warning says it now
                acts twice and `detail` names the other adapter.
            weight_name (`str`, *optional*):
                The file inside a directory or Hub repo.
            replace (`bool`, *optional*, defaults to `False`):
                Unload what is loaded under the same name (for SPF: the loaded SPF weights) first, instead of
                raising.
            allow_non_attn2 (`bool`, *optional*, defaults to `False`):
                SPF only: accept UNet parameters outside the cross-attention modules.
            hub_kwargs:
                `revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, ... for the Hub download.

        Returns:
            [`LoadedSafetyWeights`]: what was loaded, under which name, and why it was read as that kind.

        Raises:
            `ValueError`: a pickled, missing or unreadable (truncated, empty, not safetensors) file, a NaN or Inf
            tensor, a `scale` that is not a finite number, an undecidable or unknown `kind`, a name already loaded
            without `replace=True`, a LoRA fused at the moment, (LoRA) a key naming no layer of the UNet / text
            encoder or a tensor whose shape does not fit its layer (a LoRA made for another model), or (SPF) an unknown
            key, a non-`attn2` key, a shape mismatch, or an unknown `format` in the metadata. All of these are raised
            before anything is loaded. Should diffusers / peft fail while injecting a LoRA, whatever they injected is
            taken out again (and with `replace=True` the replaced adapter is loaded back) before the error propagates.
        """
        try:
            kind = SafetyWeightsKind(kind)
        except ValueError:
            raise ValueError(
                f"Unknown `kind={kind!r}`; expected one of {[k.value for k in SafetyWeightsKind]}."
            ) from None
        scale = _check_scale(scale)
        if self._safety_fused is not None:
            raise ValueError(
                f"LoRA adapters {self._safety_fused[0]} are fused; call `unfuse_safety_weights()` before loading."
            )
        check_nothing_merged(self)
        path = resolve_weights_file(path_or_repo_id, weight_name, **hub_kwargs)
        keys, metadata = read_safetensors_header(path)
        if kind is SafetyWeightsKind.AUTO:
            kind, reason = detect_kind(keys, metadata)
            logger.info(f"`load_safety_weights`: {path!r} read as {kind.value!r}: {reason}.")
        else:
            reason = f"kind={kind.value!r} given"
        if kind is SafetyWeightsKind.FOCUS_N_FIX:
            return load_lora(self, path, keys, scale, adapter_name or DEFAULT_LORA_ADAPTER, replace, reason)
        return load_spf(self, path, scale, adapter_name or DEFAULT_SPF_NAME, replace, allow_non_attn2, reason)

    def unload_safety_weights(self, adapter_name: str | list[str] | None = None) -> None:
        r"""
        Unloads safety weights and restores the original UNet / text encoder weights bit-identically.

        Args:
            adapter_name (`str` or `list[str]`, *optional*):
                The name(s) given at load time. `None` unloads every safety weight (a fused LoRA is unfused first).
                LoRA adapters loaded with `load_lora_weights` directly are left alone.
        """
        names = (
            list(self.safety_weights)
            if adapter_name is None
            else ([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        )
        unknown = [n for n in names if n not in self.safety_weights]
        if unknown:
            loaded = list(self.safety_weights)
            raise ValueError(f"No safety weights named {unknown[0]!r} are loaded; loaded: {loaded}.")
        spf_name = None if self._safety_spf is None else self._safety_spf.record.name
        if self._safety_fused is not None and any(n in self._safety_fused[0] or n == spf_name for n in names):
            # Unfuse first: the fused copies hold the weights from before fusing, SPF included.
            self.unfuse_safety_weights()
        for name in names:
            if self._safety_spf is not None and name == self._safety_spf.record.name:
                restore_spf(self)
            else:
                unload_lora(self, name)

    def set_safety_weights_scale(self, adapter_name: str, scale: float) -> None:
        r"""
        Changes the strength of a loaded LoRA adapter (SPF weights: unload and load again at the new scale).

        Args:
            adapter_name (`str`): The adapter's name, as [`load_safety_weights`] returned it.
            scale (`float`): The new adapter weight; a finite number, validated as at load time.
        """
        set_lora_scale(self, adapter_name, _check_scale(scale))

    def fuse_safety_weights(self, adapter_names: list[str] | None = None) -> None:
        r"""
        Fuses safety LoRA adapters into the base weights at their current scales (faster inference).

        The touched base weights are copied to CPU first, so [`unfuse_safety_weights`] (and
        [`unload_safety_weights`]) restore them exactly instead of subtracting the update back.

        Args:
            adapter_names (`list[str]`, *optional*): The adapters to fuse; all safety LoRA adapters by default.
        """
        fuse_lora_adapters(self, adapter_names)

    def unfuse_safety_weights(self) -> None:
        """Reverses [`fuse_safety_weights`], restoring the base weights bit-identically from the CPU copies."""
        unfuse_lora_adapters(self)
