"""The query-capture hooks: what `to_q` sees is what they keep, the attention output is untouched, and they come
off again."""

import pytest
import torch
from conftest import hooked_layers
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from dag_safety.attention import CrossAttentionCapture, QueryStore, _QueryHook, cross_attention_layers

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
    "4-D, residual, rescale": {
        "attn": {
            "query_dim": 8,
            "heads": 2,
            "dim_head": 4,
            "residual_connection": True,
            "rescale_output_factor": 2.0,
            "bias": True,
        },
        "four_d": True,
    },
    "attention_mask": {
        "attn": {"query_dim": 8, "cross_attention_dim": 6, "heads": 2, "dim_head": 4},
        "context": 6,
        "mask": True,
    },
}


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
@pytest.mark.parametrize("case", list(CASES))
def test_the_hook_keeps_what_to_q_sees_and_changes_nothing(case, processor):
    """Oracle: a forward hook on `to_q` records its input; the capture hook must keep exactly the conditional
    rows of it, whatever processor runs, and the layer's output must not change."""
    spec = CASES[case]
    torch.manual_seed(0)
    attn = Attention(**spec["attn"]).eval()
    attn.set_processor(processor())
    batch = 4
    hidden = torch.randn(batch, 8, 3, 5) if spec.get("four_d") else torch.randn(batch, 15, 8)
    kwargs = {}
    if "context" in spec:
        kwargs["encoder_hidden_states"] = torch.randn(batch, 7, spec["context"])
    if spec.get("mask"):
        mask = torch.zeros(batch, 1, 7)
        mask[:, :, 5:] = -10000.0
        kwargs["attention_mask"] = mask
    seen = []
    attn.to_q.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        reference = attn(hidden, **kwargs)
        store = QueryStore()
        store.arm(slice(2, 4))
        handle = attn.register_forward_pre_hook(_QueryHook(store, "layer"), with_kwargs=True)
        ours = attn(hidden, **kwargs)
        handle.remove()
    assert torch.equal(ours, reference)
    captured = store.queries["layer"]
    assert torch.equal(captured.hidden_states, seen[-1][2:])
    assert captured.spatial_size == ((3, 5) if spec.get("four_d") else None)


def test_unarmed_store_captures_nothing():
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    store = QueryStore()
    attn.register_forward_pre_hook(_QueryHook(store, "layer"), with_kwargs=True)
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


def test_layer_selection_by_name(components):
    """A name selects the `attn2` layers under that module (a block, or one layer by its full path); a name that
    selects nothing is refused with the UNet's blocks listed."""
    unet = components["unet"]
    names = list(cross_attention_layers(unet))
    by_block = CrossAttentionCapture(unet, (0.5,), layers=("up_blocks.1",))
    assert set(by_block.layers) == {name for name in names if name.startswith("up_blocks.1.")}
    assert by_block.layers and len(by_block.layers) < len(names)
    one = names[0].removesuffix(".processor")
    assert set(CrossAttentionCapture(unet, (0.5,), layers=(one,)).layers) == {names[0]}
    with CrossAttentionCapture(unet, (0.5,), layers=("down_blocks.1", "up_blocks.1.attentions.0")) as capture:
        assert hooked_layers(unet) == {name.removesuffix(".processor") for name in capture.layers}
        assert {name.split(".transformer_blocks")[0] for name in capture.layers} == {
            name.split(".transformer_blocks")[0]
            for name in names
            if name.startswith(("down_blocks.1.", "up_blocks.1.attentions.0."))
        }
    with pytest.raises(
        ValueError, match=r"'up_blocks\.9' selects no cross-attention layer.*up_blocks\.1\.attentions\.0"
    ):
        CrossAttentionCapture(unet, (0.5,), layers=("up_blocks.9",))
    with pytest.raises(ValueError, match="selects no"):
        CrossAttentionCapture(unet, (0.5,), layers=("up_blocks.1.attentions.0.transformer",))  # not a module boundary


def test_install_and_remove_keep_user_processors(components):
    unet = components["unet"]
    custom = AttnProcessor()
    names = list(unet.attn_processors)
    unet.set_attn_processor({name: (custom if "attn1" in name else AttnProcessor2_0()) for name in names})
    before = dict(unet.attn_processors)
    capture = CrossAttentionCapture(unet, (0.5,))
    capture.install()
    assert hooked_layers(unet) == {name.removesuffix(".processor") for name in capture.layers}
    assert all(unet.attn_processors[name] is before[name] for name in names)
    with pytest.raises(ValueError, match="already installed"):
        capture.install()
    capture.remove()
    assert hooked_layers(unet) == set()
    assert all(unet.attn_processors[name] is before[name] for name in names)


def test_a_custom_processor_keeps_running_and_is_captured(components):
    """Any processor at a detection layer (here one that doubles the output) keeps running under the hooks."""
    unet = components["unet"]

    class Doubling(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            return 2 * super().__call__(*args, **kwargs)

    capture = CrossAttentionCapture(unet, (0.5,))
    name = next(iter(capture.layers))
    processors = dict(unet.attn_processors)
    processors[name] = Doubling()
    unet.set_attn_processor(processors)
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 24, 32)
    with torch.no_grad():
        reference = unet(sample, 10, encoder_hidden_states=context).sample
        with capture:
            capture.store.arm(slice(None))
            ours = unet(sample, 10, encoder_hidden_states=context).sample
            assert set(capture.store.queries) == set(capture.layers)
    assert torch.equal(ours, reference)
    assert isinstance(unet.attn_processors[name], Doubling)


def test_refuses_a_layer_that_normalises_its_queries(components):
    unet = components["unet"]
    capture = CrossAttentionCapture(unet, (0.5,))
    attn = next(iter(capture.attention_modules().values()))
    attn.group_norm = torch.nn.GroupNorm(2, attn.to_q.in_features)
    with pytest.raises(ValueError, match="normalises its input before `to_q`"):
        CrossAttentionCapture(unet, (0.5,))
