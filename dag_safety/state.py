"""`DAGState`: what enabling DAG prepares for a UNet, and detection from the queries it captures.

[`prepare_dag`] loads and checks the guideline embedding(s), builds the [`DAGConfig`] (a saved embedding's tuned
options are the defaults), and freezes the detection layers' `to_q` / `to_k` projections. Both
`DAGStableDiffusionPipeline.enable_dag` and [`~dag_safety.DAGGuidance`] use it, so an embedding behaves the same
whichever way DAG is attached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from .attention import CrossAttentionCapture, cross_attention_layers
from .config import PAPER_ERASE_SETTINGS, DAGConfig, build_config, split_dag_options
from .detection import (
    QueryProjection,
    combine_concepts,
    concept_presence,
    concept_share,
    minmax_normalize,
    project_keys,
    token_maps,
    validate_embedding,
)
from .guidance import Components, DAGScaleMap, component_mask, dag_scale_map, find_components
from .guideline_embedding import GuidelineEmbedding, unet_fingerprint
from .presence_head import PresenceHead

__all__ = ["DAGState", "EmbeddingLike", "bundled_embeddings", "prepare_dag"]

EmbeddingLike = str | os.PathLike | GuidelineEmbedding | torch.Tensor


@dataclass
class DAGState:
    """What [`prepare_dag`] prepared: config, the query capture, and the detection layers' query projections and
    each concept's keys, frozen when DAG was enabled.

    Under `detection="head"` the capture also holds the presence heads' layers, and `heads` each concept's head;
    `detection_layers` are the layers the guideline rows are read on (all captured layers otherwise).
    """

    config: DAGConfig
    capture: CrossAttentionCapture
    projections: dict[str, QueryProjection]
    keys: list[dict[str, torch.Tensor]]
    safety_concepts: list[str]
    heads: list[PresenceHead] | None = None
    detection_layers: tuple[str, ...] | None = None

    def follow(self, device: torch.device, dtype: torch.dtype) -> None:
        """Moves the frozen projections and keys to the UNet's device and dtype once, after `pipe.to(...)`
        following `enable_dag`, instead of copying them at every detection step."""
        weight = next(iter(self.projections.values())).weight
        if weight.device == torch.device(device) and weight.dtype == dtype:
            return
        options = {"device": device, "dtype": dtype}
        self.projections = {
            name: replace(
                projection,
                weight=projection.weight.to(**options),
                bias=None if projection.bias is None else projection.bias.to(**options),
            )
            for name, projection in self.projections.items()
        }
        self.keys = [{name: key.to(**options) for name, key in keys.items()} for keys in self.keys]

    def shares(
        self,
        latent_size: tuple[int, int],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        layers: Collection[str] | None = None,
    ) -> torch.Tensor:
        """Each concept's raw map from the queries captured in the last UNet call, `reduce` ([`concept_share`] or
        [`concept_presence`]) applied to its layer-averaged token maps: `(concepts, B, h, w)`, float32, **on the
        CPU**. `layers` (processor names, a subset of the capture's) averages over those layers only.

        The attention maps are computed where the queries are; the maps then come to the host in one copy, where the
        min-max normalisation, DAG's scale map and its connected components (scipy) run. On a GPU that copy is the
        step's only synchronisation: the small per-pixel operations after it cost no kernel launches, and whether
        anything was detected is known on the host without another one.

        Raises:
            `FloatingPointError`: the maps are not finite (an image DAG cannot inspect must not pass as safe).
        """
        queries = self.capture.store.queries
        if layers is None:
            layers = self.detection_layers
        if layers is not None:
            queries = {name: queries[name] for name in layers}
        shares = torch.stack(
            [reduce(token_maps(queries, self.projections, keys, latent_size)) for keys in self.keys]
        ).cpu()
        if not torch.isfinite(shares).all():
            # a map of NaN would read as "nothing detected"
            raise FloatingPointError(
                "DAG cannot inspect the image: the UNet's inputs are not finite (NaN or Inf latents, e.g. from a"
                " callback, or a scheduler setting that diverges such as `eta=1` with very few DDIM steps)."
            )
        return shares

    def head_features(self, latent_size: tuple[int, int]) -> list[torch.Tensor]:
        """Each concept's presence-head features from the last UNet call's captured inputs (`PresenceHead.features`):
        `(B, h·w, ΣC_l)` float32 on the CPU, one per concept.

        Raises:
            `FloatingPointError`: the features are not finite (see [`shares`]).
        """
        queries = self.capture.store.queries
        features = [head.features(queries, latent_size).cpu() for head in self.heads]
        if not all(torch.isfinite(item).all() for item in features):
            raise FloatingPointError(
                "DAG cannot inspect the image: its presence head's inputs are not finite (NaN or Inf latents)."
            )
        return features

    def detect(self, latent_size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
        """`Â` (or, with `normalize=False`, the raw concept share) from the queries captured in the last UNet call:
        `(B, h, w)`, float32, on the CPU (see [`shares`])."""
        maps = [minmax_normalize(share) if normalize else share for share in self.shares(latent_size, concept_share)]
        return maps[0] if len(maps) == 1 else combine_concepts(maps)

    def selective_evidence(
        self, latent_size: tuple[int, int], previous: tuple[torch.Tensor, list[torch.Tensor] | None] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor], list[torch.Tensor], list[Components]]:
        """What a selective rule judges at one step, from the last UNet call's captured inputs: `(shares, features,
        maps, judged, found)`.

        `shares` `(concepts, B, h, w)` is the rows' [`concept_presence`] and, under `detection="head"`, `features`
        each concept's [`head_features`] (else `None`), both smoothed over the guided steps with `previous` (this
        method's `(shares, features)` of the step before; `None` at the first). `maps` is each concept's `Â` (the
        min-max normalised share), `judged` what its components are judged on: the smoothed share under
        `"presence"`, each component filled with its head logit under `"head"` (`PresenceHead.paint`), and `found`
        each concept's components of `Â` (`guidance.find_components`).
        """
        config = self.config
        beta = config.presence_smoothing
        shares = self.shares(latent_size, concept_presence)
        features = self.head_features(latent_size) if config.detection == "head" else None
        if previous is not None:
            previous_shares, previous_features = previous
            shares = beta * previous_shares + (1 - beta) * shares
            if features is not None:
                features = [beta * old + (1 - beta) * new for old, new in zip(previous_features, features)]
        maps = [minmax_normalize(share) for share in shares]
        found = [find_components(m, config) for m in maps]
        judged = list(shares)
        if features is not None:
            rule = (config.unsafe_threshold, config.edit_mask_threshold, config.max_edit_area)
            rule += (config.components, config.basin_floor)
            judged = [
                head.paint(m, f, *rule, found=components)
                for head, m, f, components in zip(self.heads, maps, features, found)
            ]
        return shares, features, maps, judged, found

    def detect_step(self, latent_size: tuple[int, int], evidence: Any) -> tuple[torch.Tensor, DAGScaleMap, Any]:
        """One denoising step's detection from the captured queries: `(Â, S_dag's DAGScaleMap, evidence)`.

        Under a selective rule the evidence is [`selective_evidence`]'s smoothed `(shares, features)` (pass the
        previous step's, `None` at the first), under `config.hold_detection` per concept the pixels of the
        components guided at any step so far, `(B, h, w)` bool, which the next step holds (else `None`), and per
        image the steps so far at which a component passed the threshold, `(B,)` int64 ([`confirm`]). Each
        concept keeps only its own present components, so the scale is the element-wise max of the concepts'
        scales. Under `"paper"` the evidence stays `None`.
        """
        config = self.config
        if config.detection == "paper":
            dag_map = self.detect(latent_size)
            return dag_map, dag_scale_map(dag_map, config), None
        previous, helds, passes = (None, None, None) if evidence is None else (evidence[:2], evidence[2], evidence[3])
        shares, features, maps, judged, found = self.selective_evidence(latent_size, previous)
        helds = helds or [None] * len(maps)
        scale_maps = [
            dag_scale_map(dag_map, config, presence=score, held=held, found=components)
            for dag_map, score, held, components in zip(maps, judged, helds, found)
        ]
        scale_maps, passes = confirm(scale_maps, passes, config.confirm_steps)
        guided = None
        if config.hold_detection:
            # the pixels of the components guided so far (not their edit band)
            guided = [
                (m.scale > 0) & component_mask(dag_map, config, components)
                for m, dag_map, components in zip(scale_maps, maps, found)
            ]
            guided = [now if held is None else now | held for now, held in zip(guided, helds)]
        current = (shares, features, guided, passes)
        if len(maps) == 1:
            return maps[0], scale_maps[0], current
        scale_map = DAGScaleMap(
            scale=torch.stack([m.scale for m in scale_maps]).amax(dim=0),
            detected=torch.stack([m.detected for m in scale_maps]).any(dim=0),
            presence=torch.stack([m.presence for m in scale_maps]).amax(dim=0),
        )
        return combine_concepts(maps), scale_map, current


def confirm(
    scale_maps: list[DAGScaleMap], passes: torch.Tensor | None, confirm_steps: int
) -> tuple[list[DAGScaleMap], torch.Tensor]:
    """`DAGConfig.confirm_steps`: each concept's scale map of one step with the images not yet confirmed left
    unguided, and the updated count of passes, `(B,)` int64.

    An image passes at a step when a component of any concept would be guided at it (`DAGScaleMap.detected`), and
    is confirmed once it has passed at `confirm_steps` steps, this one included. `passes` is the count before this
    step (`None` at the first guided step). With `confirm_steps=1` every map comes back as it is.
    """
    detected = torch.stack([m.detected for m in scale_maps]).any(dim=0)
    passes = detected.long() if passes is None else passes + detected.long()
    if confirm_steps == 1 or not bool(detected.any()):
        # nothing guided at this step (every scale is 0): nothing to hold back
        return scale_maps, passes
    confirmed = passes >= confirm_steps
    if bool(confirmed.all()):
        return scale_maps, passes
    keep = confirmed[:, None, None]
    return [
        DAGScaleMap(
            scale=torch.where(keep.to(m.scale.device), m.scale, torch.zeros_like(m.scale)),
            detected=m.detected & confirmed,
            presence=m.presence,
        )
        for m in scale_maps
    ], passes


def _saved_defaults(saved: list[GuidelineEmbedding], detection: str | None = None) -> dict[str, Any]:
    """The DAG options saved embeddings were tuned for; several embeddings must agree. Their erase settings go with
    their default rule: with another `detection` they are left out, so that the paper's rule, say, runs with the
    paper's (DAGConfig's defaults)."""
    defaults = [
        {
            "layer_fractions": tuple(item.metadata.layer_fractions),
            "layers": item.metadata.layers,
            "unsafe_threshold": item.metadata.unsafe_threshold,
            "edit_mask_threshold": item.metadata.edit_mask_threshold,
            "base_scale": item.metadata.base_scale,
            "detection": item.metadata.detection,
            **{name: getattr(item.metadata, name) for name in PAPER_ERASE_SETTINGS},
            # a calibrated embedding brings its threshold, for its default rule or an explicit "presence"
            **(
                {}
                if item.metadata.presence_threshold is None
                else {
                    "presence_threshold": item.metadata.presence_threshold,
                    "presence_smoothing": item.metadata.presence_smoothing,
                }
            ),
        }
        for item in saved
    ]
    if any(d != defaults[0] for d in defaults[1:]):
        raise ValueError(
            f"The guideline embeddings were tuned for different detection settings: {defaults}. Pass"
            f" {', '.join(f'`{key}`' for key in defaults[0])} explicitly."
        )
    if not defaults:
        return {}
    if detection is not None and detection != defaults[0]["detection"]:
        return {key: value for key, value in defaults[0].items() if key not in PAPER_ERASE_SETTINGS}
    return defaults[0]


def _load_embedding(
    item: EmbeddingLike, unet: UNet2DConditionModel, check_fingerprint: bool, safety_weights: list[str]
) -> GuidelineEmbedding | torch.Tensor:
    if isinstance(item, (str, os.PathLike)):
        item = GuidelineEmbedding.from_pretrained(os.fspath(item))
    if isinstance(item, GuidelineEmbedding):
        validate_embedding(item.embeds, unet.config.cross_attention_dim)
        expected = item.metadata.base_model_fingerprint
        if check_fingerprint and expected != (actual := unet_fingerprint(unet)):
            if unet.dtype == torch.bfloat16:
                # bfloat16 keeps 8 mantissa bits: the weights hashed at float16 precision are not the original
                # model's, so a bfloat16 copy of the right model cannot be told from another model.
                raise ValueError(
                    f"The guideline embedding for {item.metadata.concept!r} was optimized on"
                    f" {item.metadata.base_model!r} (UNet fingerprint {expected}), and this pipeline's UNet is in"
                    " bfloat16, which rounds the to_q / to_k weights the fingerprint hashes. Call `enable_dag`"
                    " before converting to bfloat16 (load in float32 or float16, `enable_dag`, then"
                    " `pipe.to(dtype=torch.bfloat16)`), or pass `check_fingerprint=False` if you know the"
                    " models match."
                )
            if safety_weights:
                # the loaded weights, not another base model, are the likely cause: say so
                raise ValueError(
                    f"The guideline embedding for {item.metadata.concept!r} was optimized on"
                    f" {item.metadata.base_model!r} (UNet fingerprint {expected}); this UNet's fingerprint is"
                    f" {actual} because safety weights are loaded ({sorted(safety_weights)}), which change or"
                    " wrap the to_q / to_k projections the embedding is tied to. Call `enable_dag` before"
                    " `load_safety_weights` (DAG then keeps scoring with the base projections), or pass"
                    " `check_fingerprint=False` to score with the loaded projections."
                )
            raise ValueError(
                f"The guideline embedding for {item.metadata.concept!r} was optimized on"
                f" {item.metadata.base_model!r} (UNet fingerprint {expected}), but this pipeline's UNet has"
                f" fingerprint {actual}: an embedding is tied to the to_q / to_k projections it was fitted to."
                " Use an embedding made for this model, or pass `check_fingerprint=False` if you know they match."
            )
    return item


def bundled_embeddings(unet: UNet2DConditionModel) -> list[GuidelineEmbedding]:
    """The guideline embeddings shipped with dag-safety (`dag_safety.embeddings`) that were made for `unet`: those
    whose base-model fingerprint is the UNet's (today: the bundled mini model's red star).

    Raises:
        `ValueError`: none was made for this UNet; the message says how to get one.
    """
    from . import embeddings

    folder = os.path.dirname(embeddings.__file__)
    fingerprint = unet_fingerprint(unet)
    bundled = [
        GuidelineEmbedding.from_pretrained(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name, "guideline_embeds.safetensors"))
    ]
    matching = [item for item in bundled if item.metadata.base_model_fingerprint == fingerprint]
    if not matching:
        shipped = ", ".join(f"{item.metadata.concept!r} for {item.metadata.base_model!r}" for item in bundled)
        raise ValueError(
            f"DAG needs a guideline embedding, and none shipped with dag-safety ({shipped or 'none'}) was made for"
            f" this UNet (fingerprint {fingerprint}). Pass one: a Hub repo id or a directory saved by"
            " `GuidelineEmbedding.save_pretrained`, a `GuidelineEmbedding`, or a (1+K, D) tensor; or make one for"
            " this model with `dag-safety optimize --model <model> --data <annotated folder>`."
        )
    return matching


def prepare_dag(
    unet: UNet2DConditionModel,
    embedding: EmbeddingLike | list[EmbeddingLike] | None,
    guidance: str = "sega",
    preset: str | None = None,
    check_fingerprint: bool = True,
    safety_weights: list[str] | None = None,
    **options: Any,
) -> DAGState:
    """Loads and checks guideline embedding(s) for `unet` and freezes what detection needs.

    Args:
        unet (`UNet2DConditionModel`): the UNet DAG will guide.
        embedding: see `DAGStableDiffusionPipeline.enable_dag`; `None` for the bundled embeddings made for this
            UNet ([`bundled_embeddings`]).
        guidance (`str`): the base method, `"sega"` or `"sld"`.
        preset (`str`, *optional*): with `guidance="sld"`, the SLD preset.
        check_fingerprint (`bool`): refuse a saved embedding made for another UNet.
        safety_weights (`list[str]`, *optional*): names of loaded safety weights, for the fingerprint error.
        options: fields of [`DAGConfig`] and of the base method's config.

    Returns:
        [`DAGState`], with the capture hooks not yet installed.

    Raises:
        `ValueError`: see `DAGStableDiffusionPipeline.enable_dag`.
    """
    if embedding is None:
        embedding = bundled_embeddings(unet)
    items = list(embedding) if isinstance(embedding, (list, tuple)) else [embedding]
    if not items:
        raise ValueError("DAG got an empty list of guideline embeddings.")
    saved = [_load_embedding(item, unet, check_fingerprint, safety_weights or []) for item in items]
    embeddings = [item.embeds if isinstance(item, GuidelineEmbedding) else item for item in saved]
    for item in embeddings:
        validate_embedding(item, unet.config.cross_attention_dim)
    if options.get("detection") == "presence" and options.get("presence_threshold") is None:
        for item in saved:
            if isinstance(item, GuidelineEmbedding) and item.head is not None and item.metadata.presence_threshold:
                # the saved threshold is a probability of the head, not a share of the rows
                raise ValueError(
                    f"The guideline embedding for {item.metadata.concept!r} was calibrated for its presence head"
                    ' (`detection="head"`); its threshold does not apply to the rows\' presence scores. Use'
                    ' `detection="head"`, pass `presence_threshold=` for `"presence"`, or calibrate it without'
                    " `--presence-head`."
                )
    saved_defaults = _saved_defaults(
        [item for item in saved if isinstance(item, GuidelineEmbedding)], options.get("detection")
    )
    options = {**saved_defaults, **options}
    dag_options, base_options = split_dag_options(options)
    config = DAGConfig(base=build_config(guidance, preset, **base_options), **dag_options)

    capture = CrossAttentionCapture(unet, config.layer_fractions, config.layers)
    heads, detection_layers = None, None
    if config.detection == "head":
        heads = _presence_heads(saved, unet)
        # the rows are read on the detection layers; the capture adds the heads' layers
        detection_layers = tuple(capture.layers)
        names = set(detection_layers).union(*(head.layers for head in heads))
        capture = CrossAttentionCapture(
            unet, config.layer_fractions, tuple(n.removesuffix(".processor") for n in names)
        )
    modules = capture.attention_modules()
    if any(p.device.type == "meta" for attn in modules.values() for p in attn.parameters()):
        raise ValueError(
            "The UNet's weights are on the meta device (sequential CPU offload): DAG needs the to_q / to_k weights"
            " to project its embedding. Use `enable_model_cpu_offload()` instead, or no offloading."
        )
    embeddings = [item.detach().to(device="cpu", dtype=torch.float32) for item in embeddings]
    # Projections are frozen here: the embedding stays tied to the to_q / to_k it was fitted to, even when
    # weights loaded later change them.
    with torch.no_grad():
        projections = {name: QueryProjection.snapshot(attn) for name, attn in modules.items()}
        keys = [{name: project_keys(attn, item) for name, attn in modules.items()} for item in embeddings]
    # Saved embeddings name the safety concept they were made for (`e_s`): the default safety concept.
    concepts = [item.metadata.safety_concept for item in saved if isinstance(item, GuidelineEmbedding)]
    return DAGState(
        config=config,
        capture=capture,
        projections=projections,
        keys=keys,
        safety_concepts=list(dict.fromkeys(c for c in concepts if c)),
        heads=heads,
        detection_layers=detection_layers,
    )


def _presence_heads(saved: list[GuidelineEmbedding | torch.Tensor], unet: UNet2DConditionModel) -> list[PresenceHead]:
    """Each embedding's presence head, checked against `unet`'s layers.

    Raises:
        `ValueError`: an embedding has no head (or is a bare tensor), or a head reads layers this UNet lacks.
    """
    heads = []
    for item in saved:
        head = item.head if isinstance(item, GuidelineEmbedding) else None
        if head is None:
            name = repr(item.metadata.concept) if isinstance(item, GuidelineEmbedding) else "a bare tensor"
            raise ValueError(
                f'`detection="head"` needs guideline embeddings that carry a presence head, and the one for {name}'
                " has none. Fit one with `dag-safety calibrate <embedding> --presence-head <blocks>`, or choose"
                ' `detection="presence"` or `"paper"`.'
            )
        heads.append(head)
    unet = getattr(unet, "_orig_mod", unet)
    modules = dict(unet.named_modules())
    widths = {name: modules[name.removesuffix(".processor")].query_dim for name in cross_attention_layers(unet)}
    for item, head in zip(saved, heads):
        head.check_layers(widths, f"The presence head of the embedding for {item.metadata.concept!r}")
    return heads
