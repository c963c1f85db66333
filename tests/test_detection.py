"""Guideline-token maps against diffusers' own attention scores."""

import pytest
import torch
import torch.nn.functional as F

from dag_safety.attention import CapturedQuery, CrossAttentionCapture
from dag_safety.detection import (
    QueryProjection,
    attention_probs,
    combine_concepts,
    concept_map,
    infer_spatial_size,
    layer_token_maps,
    minmax_normalize,
    project_keys,
    token_maps,
    validate_embedding,
)


def _encode(components, text):
    tokenizer, encoder = components["tokenizer"], components["text_encoder"]
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def test_prompt_tokens_reproduce_standard_cross_attention_maps(components):
    """A guideline embedding equal to the prompt's encoded rows gives that prompt's attention probabilities
    over the same rows (softmax restricted to them), layer by layer."""
    unet = components["unet"]
    context = _encode(components, "a red star on white background")  # (1, L, D)
    rows = 1 + 3  # SoT, "a", "red", "star"
    embedding = context[0, :rows]
    capture = CrossAttentionCapture(unet, (0.25, 0.5))
    modules = capture.attention_modules()
    inputs = {}
    hooks = [
        modules[name].register_forward_pre_hook(
            lambda module, args, kwargs, name=name: inputs.__setitem__(name, args[0]), with_kwargs=True
        )
        for name in capture.layers
    ]
    capture.install()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    capture.store.arm(slice(1, 2))
    with torch.no_grad():
        unet(latents, 500, encoder_hidden_states=context.repeat(2, 1, 1))
    capture.store.disarm()
    queries = dict(capture.store.queries)
    capture.remove()
    for hook in hooks:
        hook.remove()

    for name, attn in modules.items():
        hidden = inputs[name][1:2]
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context[:, :rows]))
        reference = attn.get_attention_scores(query, key).view(1, attn.heads, -1, rows).mean(dim=1)
        with torch.no_grad():
            projection = QueryProjection.snapshot(attn)
            ours = layer_token_maps(queries[name], projection, project_keys(attn, embedding), (16, 16))
        side = int(hidden.shape[1] ** 0.5)
        assert ours.shape == (1, rows, side, side)
        assert torch.allclose(ours.flatten(2).transpose(1, 2), reference, atol=1e-6)


def test_token_maps_upsample_and_average():
    keys = torch.zeros(1, 2, 1)
    keys[0, 1, 0] = 1.0
    # one head, head_dim 1, identity projection: the concept row wins where the query is large
    identity = QueryProjection(weight=torch.ones(1, 1), bias=None, heads=1, scale=1.0)
    coarse = torch.zeros(1, 4, 1)
    coarse[0, 0, 0] = 10.0  # top-left pixel of a 2x2 layer
    fine = torch.zeros(1, 16, 1)
    queries = {"a": CapturedQuery(coarse, None), "b": CapturedQuery(fine, None)}
    maps = token_maps(queries, {"a": identity, "b": identity}, {"a": keys, "b": keys}, (4, 4))
    assert maps.shape == (1, 2, 4, 4)
    assert torch.allclose(maps.sum(dim=1), torch.ones(1, 4, 4))
    dag_map = concept_map(maps)
    assert dag_map[0, 0, 0] == 1.0 and dag_map[0, 3, 3] == 0.0
    assert dag_map.min() == 0 and dag_map.max() == 1


def test_token_maps_batch_same_shape_layers_as_the_per_layer_definition():
    """Layers sharing shapes are computed in one batched product; the result is the mean over layers of each
    layer's upsampled [`layer_token_maps`] (the spec's definition), up to float rounding."""
    generator = torch.Generator().manual_seed(0)

    def layer(tokens, channels, heads=2, bias=False):
        projection = QueryProjection(
            weight=torch.randn(heads * 3, channels, generator=generator),
            bias=torch.randn(heads * 3, generator=generator) if bias else None,
            heads=heads,
            scale=3**-0.5,
        )
        captured = CapturedQuery(torch.randn(2, tokens, channels, generator=generator), None)
        return captured, projection, torch.randn(heads, 3, 3, generator=generator)

    layers = {"a": layer(16, 5), "b": layer(16, 5), "c": layer(16, 5), "d": layer(4, 7), "e": layer(16, 5, bias=True)}
    queries, projections, keys = ({name: parts[i] for name, parts in layers.items()} for i in range(3))
    reference = torch.stack(
        [
            F.interpolate(layer_token_maps(queries[n], projections[n], keys[n], (8, 8)), size=(8, 8), mode="bilinear")
            for n in sorted(layers)
        ]
    ).mean(dim=0)
    maps = token_maps(queries, projections, keys, (8, 8))
    assert maps.shape == (2, 3, 8, 8)
    torch.testing.assert_close(maps, reference, atol=1e-6, rtol=1e-5)


def test_query_projection_snapshot_of_a_wrapped_linear():
    """An unfused adapter around to_q is snapshotted as the affine map it computes."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=6, cross_attention_dim=5, heads=2, dim_head=3, bias=True)

    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.delta = base, torch.nn.Linear(6, 6, bias=False)

        def forward(self, x):
            return self.base(x) + self.delta(x)

    attn.to_q = Wrapped(attn.to_q)
    hidden = torch.randn(2, 7, 6)
    projection = QueryProjection.snapshot(attn)
    with torch.no_grad():
        expected = attn.to_q(hidden).view(2, 7, 2, 3).transpose(1, 2)
        assert torch.allclose(projection(hidden), expected, atol=1e-6)
        attn.to_q.delta.weight.add_(1.0)  # later changes do not reach the snapshot
        assert torch.allclose(projection(hidden), expected, atol=1e-6)


def test_query_projection_snapshot_freezes_norm_q():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=6, cross_attention_dim=5, heads=2, dim_head=3, qk_norm="layer_norm")
    hidden = torch.randn(2, 7, 6)
    projection = QueryProjection.snapshot(attn)
    with torch.no_grad():
        expected = projection(hidden)
        attn.norm_q.weight.mul_(3.0)  # later weight loading does not reach the snapshot
        assert torch.equal(projection(hidden), expected)


def test_float16_scores_do_not_overflow():
    """q·k above float16's 65504 before the softmax scale: the scores are formed in float32."""
    query = torch.full((1, 1, 4, 8), 100.0, dtype=torch.float16)
    keys = torch.full((1, 2, 8), 100.0, dtype=torch.float16)
    keys[0, 1] = 90.0
    probs = attention_probs(query, keys, scale=8**-0.5)
    assert torch.isfinite(probs).all() and probs.dtype == torch.float32
    assert torch.allclose(probs, attention_probs(query.float(), keys.float(), scale=8**-0.5))


def test_minmax_and_combine():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    normalized = minmax_normalize(maps)
    assert torch.allclose(normalized[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(normalized[1], torch.zeros(2, 2))  # a constant map detects nothing
    assert torch.equal(combine_concepts([normalized, 1 - normalized]), torch.maximum(normalized, 1 - normalized))


def test_validate_embedding_errors():
    import pytest

    with pytest.raises(ValueError, match="width 16.*cross_attention_dim.*32"):
        validate_embedding(torch.zeros(3, 16), 32)
    with pytest.raises(ValueError, match="start-of-text row and K >= 1"):
        validate_embedding(torch.zeros(1, 32), 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_embedding(torch.tensor([[0.0] * 32, [float("nan")] * 32]), 32)
    with pytest.raises(ValueError, match="torch.Tensor"):
        validate_embedding([[0.0] * 32] * 2, 32)
    validate_embedding(torch.zeros(2, 32), 32)


def test_layer_sizes_round_up_as_the_unet_downsamples(components):
    """Latent sides not divisible by the down-sampling factors (SD at 512×360 px has a 64×45 latent): each layer's
    size is inferred from its query count as the UNet really produces it."""
    assert [infer_spatial_size(h * w, (64, 45)) for h, w in ((64, 45), (32, 23), (16, 12), (8, 6))] == [
        (64, 45),
        (32, 23),
        (16, 12),
        (8, 6),
    ]
    with pytest.raises(ValueError, match="Cannot infer the spatial size of a layer with 7 queries"):
        infer_spatial_size(7, (64, 45))
    unet = components["unet"]
    seen = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[-2:]))
        for name, module in unet.named_modules()
        if name.endswith("attentions.0")
    ]
    latent_size = (18, 10)
    with torch.no_grad():
        unet(torch.randn(1, 4, *latent_size), 10, encoder_hidden_states=_encode(components, "a red star"))
    for hook in hooks:
        hook.remove()
    assert {tuple(size) for size in seen.values()} == {(9, 5), (5, 3)}
    for size in seen.values():
        assert infer_spatial_size(size[0] * size[1], latent_size) == tuple(size)
