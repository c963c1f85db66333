"""Tiny seeded Stable Diffusion components built in memory (no Hub access), as diffusers' own pipeline tests do."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = (  # noqa: SIM905  # one readable string of words beats a 31-line list literal
    "a an and on of the red green blue yellow star circle square triangle white gray black background outlined"
    " nudity image showing hate harassment violence sexual blood weapons cat dog photo"
).split()


def make_tokenizer(max_length: int = 24) -> CLIPTokenizer:
    """A small CLIP tokenizer over `WORDS` (each word gets its chain of merges; a few still split in two)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int, **changes) -> CLIPTextConfig:
    """A two-layer CLIP text model's config over `tokenizer`'s vocabulary, `hidden_size` wide."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        **changes,
    )


def get_dummy_components(cross_attention_dim: int = 32) -> dict:
    """UNet with cross-attention at 1/2 and 1/4 of a 16² latent, 2× VAE (32 px images), tiny CLIP text model."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
    )
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, cross_attention_dim))
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def get_dummy_sdxl_components() -> dict:
    """SDXL-shaped: two tiny CLIP encoders (32 + 32 = 64-wide context, 16-wide pooled projection), a UNet with
    `text_time` added conditioning and cross-attention at 1/2 and 1/4 of a 16² latent, the 2× VAE of
    [`get_dummy_components`]."""
    from transformers import CLIPTextModelWithProjection

    base = get_dummy_components()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16,  # six time ids + the pooled projection
        cross_attention_dim=64,
        norm_num_groups=4,
    )
    tokenizer = make_tokenizer()

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, 32))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, 32, projection_dim=16))
    return {
        "unet": unet,
        "scheduler": base["scheduler"],
        "vae": base["vae"],
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": make_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


#: modules that train, benchmark or generate with the bundled mini model throughout
SLOW_MODULES = {"test_mini_model.py", "test_training.py", "test_benchmarks.py", "test_weights_mini.py"}


def hooked_layers(unet) -> set[str]:
    """Names of the UNet modules that carry a DAG query-capture hook."""
    from dag_safety.attention import _QueryHook

    return {
        name
        for name, module in unet.named_modules()
        if any(isinstance(hook, _QueryHook) for hook in module._forward_pre_hooks.values())
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow`: a test that runs the bundled mini model (the `mini_pipe` fixture, or a module in `SLOW_MODULES`);
    `pytest -m "not slow"` is the quick loop on tiny in-memory components."""
    for item in items:
        if "mini_pipe" in getattr(item, "fixturenames", ()) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def mini_pipe():
    """The bundled mini model, loaded once per module, its tests on one CPU thread."""
    from dag_safety import DAGStableDiffusionPipeline
    from dag_safety.mini import MODEL_PATH

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipeline = DAGStableDiffusionPipeline.from_pretrained(MODEL_PATH, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    torch.set_num_threads(threads)


def make_embedding(pipe, rows: int = 3, **changes):
    """A random `GuidelineEmbedding` for `pipe`'s UNet (its fingerprint), with test metadata; `changes` override it."""
    from dag_safety.guideline_embedding import EmbeddingMetadata, GuidelineEmbedding, unet_fingerprint

    torch.manual_seed(0)
    metadata = EmbeddingMetadata(
        concept="red star",
        init_text="red star",
        base_model="tiny",
        base_model_fingerprint=unet_fingerprint(pipe.unet),
        layer_fractions=(0.5,),
        safety_concept="a red star",
        unsafe_threshold=0.6,
        edit_mask_threshold=0.02,
        base_scale=40.0,
        training={"steps": 3},
        final_loss=0.5,
    )
    for key, value in changes.items():
        metadata = EmbeddingMetadata(**{**metadata.as_dict(), key: value})
    return GuidelineEmbedding(torch.randn(rows, pipe.unet.config.cross_attention_dim), metadata)


@pytest.fixture
def components() -> dict:
    return get_dummy_components()


@pytest.fixture
def pipe(components):
    from dag_safety import DAGStableDiffusionPipeline

    pipeline = DAGStableDiffusionPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def red_star_rows(tmp_path_factory):
    """The committed red-star embedding's guideline rows alone, saved: no presence head, no threshold, the paper's
    rule and erase settings. What the rows' selective rule is calibrated from (the committed embedding itself
    carries a head, and a threshold that is the head's)."""
    from dag_safety.config import PAPER_ERASE_SETTINGS
    from dag_safety.embeddings import RED_STAR
    from dag_safety.guideline_embedding import GuidelineEmbedding

    committed = GuidelineEmbedding.from_pretrained(RED_STAR)
    metadata = dataclasses.replace(
        committed.metadata, detection="paper", presence_threshold=None, calibration={}, **PAPER_ERASE_SETTINGS
    )
    directory = tmp_path_factory.mktemp("red-star-rows")
    GuidelineEmbedding(committed.embeds, metadata).save_pretrained(directory)
    return directory
