"""The capture processor against diffusers' AttnProcessor2_0, and processor installation / restoration."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from dag_safety.attention import CrossAttentionCapture, DAGAttnProcessor, QueryStore, cross_attention_layers

CASES = {
    "cross-attention": {"attn": {"query_dim": 8, "cross_attention_dim": 6, "heads": 2, "dim_head": 4}, "context": 6},
    "norm_cross": {
        "attn": {
            "query_dim": 8,
            "cross_attention_dim": 6,
            "heads": 2,
            "dim_head": 4,
            "cross_attention_norm": "layer_norm",
        },
        "context": 6,
    },
    "qk_norm": {
        "attn": {"query_dim": 8, "cross_attention_dim": 6, "heads": 2, "dim_head": 4, "qk_norm": "layer_norm"},
        "context": 6,
    },
    "4-D, group_norm, residual, rescale": {
        "attn": {
            "query_dim": 8,
            "heads": 2,
            "dim_head": 4,
            "norm_num_groups": 2,
            "residual_connection": True,
            "rescale_output_factor": 2.0,
            "bias": True,
        },
        "four_d": True,
    },
    "spatial_norm": {
        "attn": {"query_dim": 32, "heads": 2, "dim_head": 4, "spatial_norm_dim": 5},
        "four_d": True,
        "temb": 5,
        "channels": 32,
    },
    "attention_mask": {
        "attn": {"query_dim": 8, "cross_attention_dim": 6, "heads": 2, "dim_head": 4},
        "context": 6,
        "mask": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_attn_processor_2_0(case):
    spec = CASES[case]
    torch.manual_seed(0)
    attn = Attention(**spec["attn"]).eval()
    batch = 4
    if spec.get("four_d"):
        hidden = torch.randn(batch, spec.get("channels", 8), 3, 5)
    else:
        hidden = torch.randn(batch, 15, 8)
    kwargs = {}
    if "context" in spec:
        kwargs["encoder_hidden_states"] = torch.randn(batch, 7, spec["context"])
    if "temb" in spec:
        kwargs["temb"] = torch.randn(batch, spec["temb"], 3, 5)
    if spec.get("mask"):
        mask = torch.zeros(batch, 1, 7)
        mask[:, :, 5:] = -10000.0
        kwargs["attention_mask"] = mask
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        reference = attn(hidden, **kwargs)
        store = QueryStore()
        store.arm(slice(2, 4))
        attn.set_processor(DAGAttnProcessor(store, "layer"))
        ours = attn(hidden, **kwargs)
    assert torch.equal(ours, reference)
    captured = store.queries["layer"]
    channels = hidden.shape[1] if spec.get("four_d") else hidden.shape[-1]
    assert captured.hidden_states.shape == (2, 15, channels)
    assert captured.spatial_size == ((3, 5) if spec.get("four_d") else None)
    if not spec.get("four_d"):
        assert torch.equal(captured.hidden_states, hidden[2:])


def test_unarmed_store_captures_nothing():
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    store = QueryStore()
    attn.set_processor(DAGAttnProcessor(store, "layer"))
    attn(torch.randn(2, 4, 8), encoder_hidden_states=torch.randn(2, 3, 6))
    assert store.queries == {}


def test_layer_selection_by_fraction(components):
    unet = components["unet"]
    layers = cross_attention_layers(unet)
    assert sorted(set(layers.values())) == [2, 4]
    half = CrossAttentionCapture(unet, (0.5,))
    assert set(half.layers) == {name for name, factor in layers.items() if factor == 2}
    both = CrossAttentionCapture(unet, (0.25, 0.5))
    assert set(both.layers) == set(layers)
    with pytest.raises(ValueError, match=r"no cross-attention layer at \[0.125\].*1/2"):
        CrossAttentionCapture(unet, (0.125,))


def test_install_and_remove_restore_user_processors(components):
    unet = components["unet"]
    custom = AttnProcessor()
    names = list(unet.attn_processors)
    unet.set_attn_processor({name: (custom if "attn1" in name else AttnProcessor2_0()) for name in names})
    before = dict(unet.attn_processors)
    capture = CrossAttentionCapture(unet, (0.5,))
    capture.install()
    after_install = unet.attn_processors
    for name in names:
        if name in capture.layers:
            assert isinstance(after_install[name], DAGAttnProcessor)
        else:
            assert after_install[name] is before[name]
    with pytest.raises(ValueError, match="already installed"):
        capture.install()
    capture.remove()
    restored = unet.attn_processors
    assert all(restored[name] is before[name] for name in names)


def test_refuses_to_replace_a_custom_processor(components):
    unet = components["unet"]

    class Custom(AttnProcessor2_0):
        pass

    name = next(iter(CrossAttentionCapture(unet, (0.5,)).layers))
    processors = dict(unet.attn_processors)
    processors[name] = Custom()
    unet.set_attn_processor(processors)
    with pytest.raises(ValueError, match="uses Custom"):
        CrossAttentionCapture(unet, (0.5,)).install()
