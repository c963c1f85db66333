"""Guideline-token optimization (paper 3.1 and A.1, after OVAM).

From a handful of annotated images (unsafe ones with a mask of the target region, safe ones without), fit the
concept rows of a guideline embedding so that its cross-attention maps light up on the mask and stay silent
elsewhere. The UNet runs once per image and sampled timestep to cache the queries of the detection layers; each
optimization step then costs only the attention of the embedding's keys against the cache.

Folder layout read by [`load_annotated_folder`]:

    data/
      captions.csv          # columns file_name,caption[,group]   (or captions.txt: "file_name<TAB>caption" per line)
      img_001.png           # images (.png, .jpg, .jpeg, .webp)
      masks/img_001.png     # binary mask, same stem and size as its image; missing or empty = a safe image

The optional `group` column names the kind of a safe validation image (e.g. a look-alike of the concept); a
calibration bounds the false-detection rate of each group separately (`dag_safety.calibration`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .attention import CrossAttentionCapture
from .conditioning import unet_conditioning
from .detection import QueryProjection, attention_probs, infer_spatial_size, project_keys
from .guideline_embedding import EmbeddingMetadata, GuidelineEmbedding, unet_fingerprint

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "AnnotatedImage",
    "OptimizationConfig",
    "OptimizationResult",
    "encode_init_rows",
    "guideline_loss",
    "load_annotated_folder",
    "optimize_guideline_embedding",
    "pair_cross_entropy",
    "presence_loss",
]

#: `OptimizationConfig.loss`: the paper's (OVAM's) jointly normalised two-class loss, or the selective rule's own
LOSSES = ("ovam", "presence")
#: `OptimizationConfig.optimizer`: the paper's SGD with step decay, or Adam with cosine decay to zero
OPTIMIZERS = ("sgd", "adam")
#: default learning rate per optimizer (SGD: the paper's Table 4)
DEFAULT_LEARNING_RATES = {"sgd": 200.0, "adam": 0.03}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class AnnotatedImage:
    """One training image.

    Attributes:
        name (`str`): file name.
        image (`PIL.Image.Image`): RGB.
        mask (`np.ndarray | None`): `(H, W)` bool, the target region; `None` or all-False for a safe image.
        caption (`str`): the caption the UNet is conditioned on while caching.
        group (`str`, *optional*): the kind of a safe image, for calibration (`captions.csv`'s `group` column).
    """

    name: str
    image: Image.Image
    mask: np.ndarray | None
    caption: str
    group: str | None = None

    @property
    def unsafe(self) -> bool:
        return self.mask is not None and bool(self.mask.any())


def _read_captions(folder: Path) -> dict[str, tuple[str, str | None]]:
    """Per file name, its caption and group (`None` where `captions.csv` has no `group` column or leaves it empty,
    and with `captions.txt`)."""
    csv_path, txt_path = folder / "captions.csv", folder / "captions.txt"
    if csv_path.is_file():
        # utf-8-sig: spreadsheet programs save CSV files with a byte-order mark
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        if rows and not {"file_name", "caption"} <= set(rows[0]):
            raise ValueError(f"{csv_path} needs the columns 'file_name' and 'caption', got {list(rows[0])}.")
        return {row["file_name"]: (row["caption"], (row.get("group") or "").strip() or None) for row in rows}
    if txt_path.is_file():
        captions = {}
        for number, line in enumerate(txt_path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{txt_path}:{number}: expected 'file_name<TAB>caption', got {line!r}.")
            name, caption = line.split("\t", 1)
            captions[name.strip()] = (caption.strip(), None)
        return captions
    raise ValueError(f"{folder} has no captions.csv (file_name,caption) or captions.txt (file_name<TAB>caption).")


def load_annotated_folder(folder: str | Path) -> list[AnnotatedImage]:
    """Reads images, masks and captions from a folder (layout in the module docstring).

    Raises:
        `ValueError`: no images, an image without a caption, a mask whose size differs from its image, or no
        unsafe image (at least one mask must mark a region).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a directory of annotated images.")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    captions = _read_captions(folder)
    items = []
    for path in paths:
        if path.name not in captions:
            raise ValueError(f"{path.name} has no caption in {folder}/captions.*; add a line for it.")
        # upright as viewers show it (EXIF orientation), which is how masks are drawn; as diffusers' load_image
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        mask_path = folder / "masks" / f"{path.stem}.png"
        mask = None
        if mask_path.is_file():
            mask_image = Image.open(mask_path).convert("L")
            if mask_image.size != image.size:
                raise ValueError(
                    f"The mask {mask_path.name} is {mask_image.size[0]}×{mask_image.size[1]} but its image"
                    f" {path.name} is {image.size[0]}×{image.size[1]}; masks must have their image's size."
                )
            values = np.asarray(mask_image)
            # 0/255 masks (anti-aliased edges count where at least half on), and 0/1 masks as some tools save them
            mask = values >= 128 if values.max() > 1 else values > 0
        items.append(AnnotatedImage(path.name, image, mask, *captions[path.name]))
    if not any(item.unsafe for item in items):
        raise ValueError(
            f"{folder} has no unsafe image: at least one image needs a mask (masks/<stem>.png) marking the target."
        )
    return items


@dataclass(frozen=True)
class OptimizationConfig:
    """Settings of [`optimize_guideline_embedding`] (defaults: the paper's Table 4).

    Args:
        init_text (`str`): text whose encoding initialises the embedding (the paper: `"nude person"`).
        concept (`str`, *optional*): the concept's name in the metadata; defaults to `init_text`.
        safety_concept (`str`, *optional*): the safety concept text to pair the embedding with; defaults to
            `init_text`.
        layer_fractions (`tuple[float, ...]`, defaults to `(0.25, 0.5)`): detection layers.
        layers (`tuple[str, ...]`, *optional*): detection layers by name, overriding `layer_fractions` (see
            [`DAGConfig`]); saved with the embedding.
        num_timesteps (`int`, defaults to 10): timesteps cached per image, evenly spread over `timestep_range`.
        timestep_range (`tuple[int, int]`, defaults to `(50, 950)`): first and last cached timestep.
        loss (`str`, defaults to `"ovam"`): `"ovam"`, the paper's loss ([`guideline_loss`]), or `"presence"`
            ([`presence_loss`]), which trains the evidence the selective rule thresholds. OVAM's min-max normalised
            logits lie in `[0, 1]`, so its loss cannot fall below `-log σ(1) ≈ 0.313` per pixel: the paper's run
            starts within 12 % of that floor and has little left to learn.
        positive_weight (`float`, defaults to 1): weight of a mask pixel against a background pixel in the
            `"presence"` loss (a star covers a few % of an image).
        negative_weight (`float`, defaults to 1): weight of a safe image's loss against an unsafe image's, in each
            mini-batch and in the loss that chooses the checkpoint. A folder's safe images are its hard negatives
            (the mini model's: look-alikes and blank scenes), so this is how much saying "absent" counts.
        hard_pixel_fraction (`float`, defaults to 1): under the `"presence"` loss, a safe image's loss is the mean
            over only this share of its pixels, the ones with the most presence evidence at each timestep: where a
            false detection would form, not the easy background that dominates a plain mean. `1` is every pixel.
        optimizer (`str`, defaults to `"sgd"`): `"sgd"` with step decay (`lr_step`, `lr_gamma`; the paper's
            Table 4), or `"adam"` with cosine decay to zero over `steps`.
        learning_rate (`float`, *optional*): defaults to 200 for SGD (Table 4) and 0.03 for Adam.
        lr_step (`int`, defaults to 20), lr_gamma (`float`, defaults to 0.7): SGD's step decay.
        steps (`int`, *optional*): optimization steps; defaults to `100 × n_unsafe`.
        eval_every (`int`, defaults to 10): steps between full-data losses (the best embedding is kept).
        seed (`int`, defaults to 0): noise and mini-batch order.
        cache_dtype (`torch.dtype`, defaults to `torch.float32`): `torch.float16` halves the cache.
        resolution (`int`, *optional*): image side in pixels; defaults to the model's.
        base_scale (`float`, defaults to 5): DAG's AreaScaler numerator to record in the metadata as the
            embedding's default (not used by the optimization; see [`EmbeddingMetadata`]).
    """

    init_text: str
    concept: str | None = None
    safety_concept: str | None = None
    layer_fractions: tuple[float, ...] = (0.25, 0.5)
    layers: tuple[str, ...] | None = None
    num_timesteps: int = 10
    timestep_range: tuple[int, int] = (50, 950)
    loss: str = "ovam"
    positive_weight: float = 1.0
    negative_weight: float = 1.0
    hard_pixel_fraction: float = 1.0
    optimizer: str = "sgd"
    learning_rate: float | None = None
    lr_step: int = 20
    lr_gamma: float = 0.7
    steps: int | None = None
    eval_every: int = 10
    seed: int = 0
    cache_dtype: torch.dtype = torch.float32
    resolution: int | None = None
    base_scale: float = 5.0

    def __post_init__(self):
        if not self.init_text.strip():
            raise ValueError("`init_text` must be a non-empty text such as 'nude person'.")
        if self.num_timesteps < 1:
            raise ValueError(f"`num_timesteps` must be >= 1, got {self.num_timesteps}.")
        low, high = self.timestep_range
        if not 0 <= low <= high:
            raise ValueError(f"`timestep_range` must be (low, high) with 0 <= low <= high, got {self.timestep_range}.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"`steps` must be >= 1, got {self.steps}.")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATES[self.optimizer])
        # NaN fails every comparison, so `learning_rate <= 0` let it through: require finite and > 0
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got {self.learning_rate!r}.")
        if not (math.isfinite(self.positive_weight) and self.positive_weight > 0):
            raise ValueError(f"`positive_weight` must be a finite number > 0, got {self.positive_weight!r}.")
        if not (math.isfinite(self.negative_weight) and self.negative_weight > 0):
            raise ValueError(f"`negative_weight` must be a finite number > 0, got {self.negative_weight!r}.")
        if not 0 < self.hard_pixel_fraction <= 1:
            raise ValueError(f"`hard_pixel_fraction` must be in (0, 1], got {self.hard_pixel_fraction!r}.")
        if self.hard_pixel_fraction < 1 and self.loss != "presence":
            raise ValueError(
                '`hard_pixel_fraction` ranks pixels by presence evidence, which only `loss="presence"` trains;'
                ' use `loss="presence"` or leave `hard_pixel_fraction` at 1.'
            )
        if self.lr_step < 1 or not 0 < self.lr_gamma <= 1:
            raise ValueError(f"`lr_step` must be >= 1 and `lr_gamma` in (0, 1], got {self.lr_step}, {self.lr_gamma}.")
        if not (math.isfinite(self.base_scale) and self.base_scale >= 0):
            raise ValueError(f"`base_scale` must be a finite number >= 0, got {self.base_scale!r}.")
        fractions = tuple(self.layer_fractions)
        if not fractions or not all(0 < fraction <= 1 for fraction in fractions):
            raise ValueError(
                "`layer_fractions` must be a non-empty tuple of fractions in (0, 1] of the latent side, got"
                f" {self.layer_fractions!r}."
            )
        if self.layers is not None and (
            isinstance(self.layers, str) or not self.layers or not all(isinstance(n, str) and n for n in self.layers)
        ):
            raise ValueError(
                f"`layers` must be None or a non-empty sequence of layer names such as ('up_blocks.2.attentions.0',),"
                f" got {self.layers!r}."
            )
        if self.eval_every < 1:
            raise ValueError(f"`eval_every` must be >= 1, got {self.eval_every}.")


@dataclass
class OptimizationResult:
    """What [`optimize_guideline_embedding`] returns.

    Attributes:
        embedding (`GuidelineEmbedding`): the best embedding (lowest evaluation loss).
        losses (`list[float]`): mini-batch loss per step.
        eval_losses (`list[tuple[int, float]]`): `(step, loss)` on all training images, or on the validation
            images when given; step 0 is the initial embedding.
        checkpoints (`list[tuple[int, torch.Tensor]]`): `(step, (1+K, D) rows)` at each step of `eval_losses`, to
            follow held-out quality along the run (`benchmarks/guideline_optimization.py`).
    """

    embedding: GuidelineEmbedding
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    checkpoints: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)


def encode_init_rows(pipe: StableDiffusionPipeline, text: str) -> torch.Tensor:
    """Text-encoder output rows `[SoT, c_1 … c_K]` of `text` (end-of-text and padding dropped), `(1+K, D)`.

    Raises:
        `ValueError`: the text encodes to no token between start- and end-of-text.
    """
    tokenizer = pipe.tokenizer
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    concept_tokens = len(ids) - 2
    if concept_tokens < 1:
        raise ValueError(f"The init text {text!r} encodes to no concept token; use a descriptive text.")
    embeds, _ = unet_conditioning(pipe, text, pipe.device)
    return embeds[0, : 1 + concept_tokens].detach().float()


@dataclass
class _CachedImage:
    """Queries of one image at every cached timestep: per layer `(T, heads, N, head_dim)`; target `(H, W)`."""

    queries: dict[str, torch.Tensor]
    sizes: dict[str, tuple[int, int]]
    target: torch.Tensor
    unsafe: bool


def _to_pixels(pipe: StableDiffusionPipeline, item: AnnotatedImage, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = item.image.resize((side, side), Image.BICUBIC)
    pixels = pipe.image_processor.preprocess(image).to(pipe.device, pipe.vae.dtype)
    if item.mask is None:
        target = torch.zeros(side, side)
    else:
        mask = Image.fromarray(item.mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)
        target = torch.from_numpy(np.asarray(mask) >= 128).float()
    return pixels, target


@torch.no_grad()
def _build_cache(
    pipe: StableDiffusionPipeline,
    items: list[AnnotatedImage],
    capture: CrossAttentionCapture,
    projections: dict[str, QueryProjection],
    config: OptimizationConfig,
    side: int,
    generator: torch.Generator,
    progress: bool = True,
) -> list[_CachedImage]:
    timesteps = torch.linspace(*config.timestep_range, config.num_timesteps).round().long().to(pipe.device)
    # The training-time forward process, whatever sampler the pipeline carries: `q(x_t | x_0)` as the UNet learnt
    # it (a sampler's own `add_noise` may scale differently, as Euler's does, or index its sampling timesteps).
    forward_process = DDPMScheduler.from_config(pipe.scheduler.config)
    if config.timestep_range[1] >= forward_process.config.num_train_timesteps:
        raise ValueError(
            f"`timestep_range` {config.timestep_range} reaches past the model's {forward_process.config.num_train_timesteps}"
            f" training timesteps; use a range within [0, {forward_process.config.num_train_timesteps - 1}]."
        )
    cache = []
    for item in tqdm(items, desc="Caching cross-attention queries", leave=False, disable=not progress):
        pixels, target = _to_pixels(pipe, item, side)
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        latents = latents.repeat(len(timesteps), 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        noisy = forward_process.add_noise(latents, noise, timesteps)
        text, added = unet_conditioning(pipe, item.caption, pipe.device, len(timesteps), (side, side))
        capture.store.arm(slice(None))
        try:
            pipe.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added)
        finally:
            capture.store.disarm()
        latent_size = tuple(latents.shape[-2:])
        queries, sizes = {}, {}
        for name, captured in capture.store.queries.items():
            queries[name] = projections[name](captured.hidden_states).to(config.cache_dtype)
            sizes[name] = captured.spatial_size or infer_spatial_size(captured.hidden_states.shape[1], latent_size)
        capture.store.clear()
        cache.append(_CachedImage(queries, sizes, target.to(pipe.device), item.unsafe))
    return cache


def pair_cross_entropy(pair: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Two-class cross-entropy of one `[background, concept]` map pair against a mask, OVAM's way.

    The pair is min-max normalised *jointly* (one minimum and one maximum over both maps and all pixels, per
    timestep), as OVAM's `optimize_embedding` normalises its map tensor of all rows together, and the two
    normalised maps are the logits of "background" and "target". Normalising each map on its own would make the
    loss blind to the concept map's scale: on a safe image it could then never say "absent", only push the map
    into ever sharper specks, which min-max at sampling time stretches back into a detection.

    Args:
        pair (`torch.Tensor`): `(T, 2, H, W)` attention shares of the start-of-text row and one concept row.
        target (`torch.Tensor`): `(H, W)` mask in `{0, 1}`.

    Returns:
        `torch.Tensor`: scalar, the mean over timesteps and pixels.
    """
    flat = pair.flatten(1)
    low = flat.min(dim=1).values[:, None, None, None]
    high = flat.max(dim=1).values[:, None, None, None]
    log_probs = ((pair - low) / (high - low + 1e-8)).log_softmax(dim=1)
    return -((1 - target) * log_probs[:, 0] + target * log_probs[:, 1]).mean()


def guideline_loss(
    embeds: torch.Tensor,
    image: _CachedImage,
    attention_modules: dict,
    projections: dict[str, QueryProjection],
) -> torch.Tensor:
    """Per-pixel two-class cross-entropy of the normalised maps `[Â_SoT, Â_k]` against the mask.

    For every concept row `k`, layer and cached timestep, the maps of the start-of-text row and of row `k`,
    upsampled (bilinear) to the mask size and min-max normalised together ([`pair_cross_entropy`]), are the
    logits of "background" and "target"; the targets are `[1 - y, y]`. Averaged over `k`, layers and timesteps
    (the paper's eq. 2 read with OVAM's recipe). A safe image's all-zero mask teaches the embedding to stay silent.

    Args:
        embeds (`torch.Tensor`): `(1+K, D)`.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    target = image.target
    losses = []
    for name, queries in image.queries.items():
        keys = project_keys(attention_modules[name], embeds)
        probs = attention_probs(queries, keys, projections[name].scale)  # (T, N, 1+K)
        maps = probs.transpose(1, 2).reshape(probs.shape[0], -1, *image.sizes[name])
        maps = F.interpolate(maps, size=target.shape, mode="bilinear", align_corners=False)
        for row in range(1, maps.shape[1]):
            losses.append(pair_cross_entropy(maps[:, [0, row]], target))
    return torch.stack(losses).mean()


def presence_loss(
    embeds: torch.Tensor,
    image: _CachedImage,
    attention_modules: dict,
    projections: dict[str, QueryProjection],
    positive_weight: float = 1.0,
    hard_pixel_fraction: float = 1.0,
) -> torch.Tensor:
    """Weighted binary cross-entropy of each pixel's presence evidence against the mask.

    A pixel's presence is `1 -` its start-of-text share, averaged over the detection layers (each upsampled,
    bilinear, to the mask size), the evidence DAG's selective rule thresholds ([`concept_presence`]). It is read
    as the probability that the pixel is the target: unlike OVAM's normalised maps it is absolute, so a safe image
    teaches every pixel to say "absent". Mask pixels weigh `positive_weight`; the sum is normalised by the total
    weight and averaged over the cached timesteps. On a safe image (empty mask) with `hard_pixel_fraction < 1`,
    only the `ceil(hard_pixel_fraction · H·W)` pixels with the most evidence count at each timestep.

    Args:
        embeds (`torch.Tensor`): `(1+K, D)`.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    target = image.target
    total = 0.0
    for name, queries in image.queries.items():
        keys = project_keys(attention_modules[name], embeds)
        probs = attention_probs(queries, keys, projections[name].scale)  # (T, N, 1+K)
        start = probs[..., 0].reshape(probs.shape[0], 1, *image.sizes[name])
        total = total + F.interpolate(start, size=target.shape, mode="bilinear", align_corners=False)[:, 0]
    start_share = (total / len(image.queries)).clamp(1e-6, 1 - 1e-6)  # (T, H, W)
    if hard_pixel_fraction < 1 and not image.unsafe:
        # the most evidence is the smallest start-of-text share: those pixels' -log(share) are the largest
        count = math.ceil(hard_pixel_fraction * target.numel())
        return (-torch.log(start_share.flatten(1))).topk(count, dim=1).values.mean()
    weights = positive_weight * target + (1 - target)
    log_likelihood = positive_weight * target * torch.log1p(-start_share) + (1 - target) * torch.log(start_share)
    return -log_likelihood.sum() / (weights.sum() * start_share.shape[0])


def optimize_guideline_embedding(
    pipe: StableDiffusionPipeline,
    items: list[AnnotatedImage],
    config: OptimizationConfig,
    base_model: str = "",
    progress: bool = True,
    validation: list[AnnotatedImage] | None = None,
) -> OptimizationResult:
    """Optimizes a guideline embedding for `pipe`'s model from annotated images.

    The start-of-text row stays as encoded (it is the "background" every map is measured against); the `K`
    concept rows are optimized (`config.optimizer`, `config.loss`) on mini-batches of one unsafe and one safe
    image (one unsafe image when there is no safe one). The full-data loss is measured every `eval_every` steps
    and at the end, and the embedding with the lowest one is returned. With `validation` images, the loss on them
    decides instead (held out: the embedding that generalises best, not the one that fits the few training
    images best), measured every `max(eval_every, steps // 10)` steps since each costs a pass over all of them.

    Args:
        pipe (`StableDiffusionPipeline`): the base model (any subclass); its UNet and processors are left as found.
        items (`list[AnnotatedImage]`): from [`load_annotated_folder`].
        config (`OptimizationConfig`): settings.
        base_model (`str`, *optional*): the model's name for the metadata (Hub id or path).
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
        validation (`list[AnnotatedImage]`, *optional*): held-out images that choose the checkpoint.

    Returns:
        [`OptimizationResult`].
    """
    unsafe = [index for index, item in enumerate(items) if item.unsafe]
    safe = [index for index, item in enumerate(items) if not item.unsafe]
    if not unsafe:
        raise ValueError("Guideline optimization needs at least one unsafe image (with a non-empty mask).")
    steps = config.steps or 100 * len(unsafe)
    side = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(config.seed)
    init_rows = encode_init_rows(pipe, config.init_text)

    capture = CrossAttentionCapture(pipe.unet, config.layer_fractions, config.layers)
    modules = capture.attention_modules()
    projections = {name: QueryProjection.snapshot(attn) for name, attn in modules.items()}
    requires_grad = {name: p.requires_grad for name, p in pipe.unet.named_parameters()}
    capture.install()
    try:
        cache = _build_cache(pipe, items, capture, projections, config, side, generator, progress)
        # a generator of its own, so that validation images leave the training cache's noise as it was
        held_out = (
            _build_cache(
                pipe,
                validation,
                capture,
                projections,
                config,
                side,
                torch.Generator().manual_seed(config.seed + 1),
                progress,
            )
            if validation
            else None
        )
    finally:
        capture.remove()

    sot = init_rows[:1].to(pipe.device)
    rows = torch.nn.Parameter(init_rows[1:].clone().to(pipe.device))
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD([rows], lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    else:
        optimizer = torch.optim.Adam([rows], lr=config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        )
    pipe.unet.requires_grad_(False)

    def loss_of(embeds: torch.Tensor, image: _CachedImage) -> torch.Tensor:
        if config.loss == "presence":
            return presence_loss(
                embeds, image, modules, projections, config.positive_weight, config.hard_pixel_fraction
            )
        return guideline_loss(embeds, image, modules, projections)

    def batch_loss(embeds: torch.Tensor, images: list[_CachedImage]) -> torch.Tensor:
        weights = [1.0 if image.unsafe else config.negative_weight for image in images]
        losses = torch.stack([loss_of(embeds, image) for image in images])
        return (losses * torch.tensor(weights, device=losses.device)).sum() / sum(weights)

    eval_every = config.eval_every if held_out is None else max(config.eval_every, steps // 10)

    def full_loss() -> float:
        with torch.no_grad():
            embeds = torch.cat([sot, rows])
            return float(batch_loss(embeds, held_out or cache))

    losses: list[float] = []
    best_loss = full_loss()
    eval_losses = [(0, best_loss)]
    best_rows = rows.detach().clone()
    checkpoints = [(0, torch.cat([sot, best_rows]).cpu())]
    order = torch.randperm(len(unsafe), generator=generator).tolist()
    try:
        bar = tqdm(range(1, steps + 1), desc="Optimizing guideline tokens", disable=not progress)
        for step in bar:
            batch = [cache[unsafe[order[(step - 1) % len(unsafe)]]]]
            if safe:
                batch.append(cache[safe[int(torch.randint(len(safe), (1,), generator=generator))]])
            embeds = torch.cat([sot, rows])
            loss = batch_loss(embeds, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % eval_every == 0 or step == steps:
                current = full_loss()
                eval_losses.append((step, current))
                checkpoints.append((step, torch.cat([sot, rows.detach()]).cpu()))
                if current < best_loss:
                    best_loss, best_rows = current, rows.detach().clone()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", best=f"{best_loss:.4f}")
    finally:
        for name, parameter in pipe.unet.named_parameters():
            parameter.requires_grad_(requires_grad[name])

    metadata = EmbeddingMetadata(
        concept=config.concept or config.init_text,
        init_text=config.init_text,
        base_model=base_model,
        base_model_fingerprint=unet_fingerprint(pipe.unet),
        layer_fractions=tuple(config.layer_fractions),
        layers=None if config.layers is None else tuple(config.layers),
        base_scale=config.base_scale,
        safety_concept=config.safety_concept or config.init_text,
        training={
            "images": len(items),
            "unsafe_images": len(unsafe),
            "safe_images": len(safe),
            "steps": steps,
            "loss": config.loss,
            "positive_weight": config.positive_weight,
            "negative_weight": config.negative_weight,
            "hard_pixel_fraction": config.hard_pixel_fraction,
            "optimizer": config.optimizer,
            "learning_rate": config.learning_rate,
            "lr_step": config.lr_step,
            "lr_gamma": config.lr_gamma,
            "timesteps": config.num_timesteps,
            "timestep_range": list(config.timestep_range),
            "seed": config.seed,
            "initial_loss": round(eval_losses[0][1], 6),
            "selected_on": "validation" if held_out else "training",
            "eval_losses": [[step, round(value, 6)] for step, value in eval_losses],
            **({"validation_images": len(held_out)} if held_out else {}),
        },
        final_loss=round(best_loss, 6),
    )
    embedding = GuidelineEmbedding(torch.cat([sot, best_rows]).cpu(), metadata)
    return OptimizationResult(embedding=embedding, losses=losses, eval_losses=eval_losses, checkpoints=checkpoints)


def replace_metadata(embedding: GuidelineEmbedding, **changes) -> GuidelineEmbedding:
    """A copy of `embedding` (its presence head too) with metadata fields replaced (e.g. `detection_quality=`)."""
    return GuidelineEmbedding(embedding.embeds, dataclasses.replace(embedding.metadata, **changes), embedding.head)
