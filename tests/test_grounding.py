"""The mini model's token grounding loss (dag_safety/mini/grounding.py): targets, loss, recording processor."""

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dag_safety.mini import TRAIN_SEEDS
from dag_safety.mini.grounding import (
    GroundingTargets,
    RecordingAttnProcessor,
    _word_positions,
    grounding_loss,
    grounding_targets,
    install_recorders,
)
from dag_safety.mini.tokenizer import MAX_LENGTH, build_tokenizer
from dag_safety.mini.world import render_scene


def test_word_positions_point_at_each_objects_words():
    tokenizer = build_tokenizer()
    checked = 0
    for seed in TRAIN_SEEDS[:300]:
        scene = render_scene(seed)
        ids = tokenizer(scene.caption, max_length=MAX_LENGTH, truncation=True).input_ids
        words = tokenizer.convert_ids_to_tokens(ids)
        for position, obj_index in _word_positions(scene):
            obj = scene.objects[obj_index]
            assert words[position].removesuffix("</w>") in {obj.color, obj.shape, "outlined"}
            checked += 1
        expected = sum(3 if o.style == "outlined" else 2 for o in scene.objects)
        assert len(_word_positions(scene)) == expected
    assert checked > 300


def test_targets_skip_dropped_captions():
    scenes = [render_scene(seed) for seed in TRAIN_SEEDS[:4]]
    keep = torch.tensor([True, False, True, False])
    targets = grounding_targets(scenes, keep)
    assert set(targets.sample.tolist()) == {0, 2}
    assert targets.masks.shape[1:] == (64, 64) and len(targets.masks) == len(targets.token)
    empty = grounding_targets(scenes, torch.zeros(4, dtype=torch.bool))
    assert grounding_loss({}, empty).item() == 0.0


def test_loss_is_the_share_of_attention_outside_the_mask():
    masks = torch.zeros(1, 64, 64)
    masks[0, :32] = 1  # top half of the canvas
    targets = GroundingTargets(torch.tensor([0]), torch.tensor([2]), masks)
    recorder = RecordingAttnProcessor()
    probs = torch.full((1, 16, 5), 0.2)  # a 4 x 4 layer, 5 tokens
    probs[0, :, 2] = torch.tensor([1.0] * 8 + [0.0] * 8)  # token 2 attends to the top half only
    recorder.probs = probs
    assert grounding_loss({"a": recorder}, targets).item() == 0.0
    probs[0, :, 2] = 1.0  # uniformly: half its attention is outside
    assert abs(grounding_loss({"a": recorder}, targets).item() - 0.25) < 1e-6


def test_recording_processor_matches_the_default_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    hidden, context = torch.randn(2, 64, 32), torch.randn(2, 7, 16)
    reference = AttnProcessor2_0()(attn, hidden, context)
    recorder = RecordingAttnProcessor()
    out = recorder(attn, hidden, context)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert recorder.probs.shape == (2, 64, 7)
    torch.testing.assert_close(recorder.probs.sum(-1), torch.ones(2, 64))


def test_install_recorders_only_on_cross_attention():
    from diffusers import UNet2DConditionModel

    from dag_safety.mini.train_unet import unet_config

    unet = UNet2DConditionModel(**unet_config())
    recorders = install_recorders(unet)
    assert recorders and all(name.endswith("attn2") for name in recorders)
    assert all(
        isinstance(p, RecordingAttnProcessor) == k.endswith("attn2.processor") for k, p in unet.attn_processors.items()
    )
