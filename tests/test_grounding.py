"""The mini model's token grounding loss (dag_safety/mini/training/grounding.py): targets, loss, recording processor."""

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dag_safety.mini import TRAIN_SEEDS
from dag_safety.mini.tokenizer import MAX_LENGTH, build_tokenizer
from dag_safety.mini.training.grounding import (
    MASK_SIDE,
    MAX_WORDS,
    GroundingTargets,
    RecordingAttnProcessor,
    _word_positions,
    grounding_loss,
    grounding_targets,
    install_recorders,
)
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
    targets = grounding_targets(scenes)
    assert targets.tokens.shape == targets.objects.shape == (4, MAX_WORDS)
    assert targets.masks.shape == (4, 3, MASK_SIDE, MASK_SIDE)
    for b, scene in enumerate(scenes):
        assert int((targets.tokens[b] >= 0).sum()) == len(_word_positions(scene))
    keep = torch.tensor([True, False, True, False])
    selected = targets.select(torch.arange(4), keep)
    assert (selected.tokens[1] == -1).all() and (selected.tokens[3] == -1).all()
    assert torch.equal(selected.tokens[0], targets.tokens[0])
    empty = targets.select(torch.arange(4), torch.zeros(4, dtype=torch.bool))
    assert grounding_loss({"a": RecordingAttnProcessor()}, empty).item() == 0.0


def test_cached_masks_pool_exactly_to_every_layer():
    """Masks cached at 16² and pooled on to 8² and 4² equal the exact 64² masks pooled directly."""
    scene = render_scene(TRAIN_SEEDS[5])
    cached = grounding_targets([scene]).masks[0, : len(scene.objects)].float()
    exact = torch.from_numpy(scene.masks).float()[:, None]
    for side in (16, 8, 4):
        direct = F.adaptive_avg_pool2d(exact, side)[:, 0]
        torch.testing.assert_close(F.avg_pool2d(cached[:, None], MASK_SIDE // side)[:, 0], direct, atol=1e-3, rtol=0)


def _one_word_targets(masks: torch.Tensor, token: int) -> GroundingTargets:
    tokens = torch.full((1, MAX_WORDS), -1)
    tokens[0, 0] = token
    return GroundingTargets(tokens, torch.zeros(1, MAX_WORDS, dtype=torch.long), masks)


def test_loss_is_the_share_of_attention_outside_the_mask():
    masks = torch.zeros(1, 3, MASK_SIDE, MASK_SIDE)
    masks[0, 0, : MASK_SIDE // 2] = 1  # top half of the canvas
    targets = _one_word_targets(masks, token=2)
    recorder = RecordingAttnProcessor()
    probs = torch.full((1, 16, 5), 0.2)  # a 4 x 4 layer, 5 tokens
    probs[0, :, 2] = torch.tensor([1.0] * 8 + [0.0] * 8)  # token 2 attends to the top half only
    recorder.probs = probs
    assert grounding_loss({"a": recorder}, targets).item() == 0.0
    probs[0, :, 2] = 1.0  # uniformly: half its attention is outside
    assert abs(grounding_loss({"a": recorder}, targets).item() - 0.25) < 1e-6


def test_loss_averages_words_over_the_batch_and_layers():
    """Every grounded word of every caption counts once per layer, whatever caption it sits in."""
    scenes = [render_scene(seed) for seed in TRAIN_SEEDS[:3]]
    targets = grounding_targets(scenes)
    torch.manual_seed(0)
    recorders = {}
    for name, side in (("fine", 16), ("coarse", 4)):
        recorders[name] = RecordingAttnProcessor()
        recorders[name].probs = torch.rand(3, side * side, MAX_LENGTH).softmax(dim=-1)
    expected = []
    for recorder in recorders.values():
        side = int(recorder.probs.shape[1] ** 0.5)
        per_word = []
        for b, scene in enumerate(scenes):
            for position, obj_index in _word_positions(scene):
                mask = F.adaptive_avg_pool2d(torch.from_numpy(scene.masks[obj_index]).float()[None], side).flatten()
                attention = recorder.probs[b, :, position]
                per_word.append((1 - (attention * mask).sum() / attention.sum()) ** 2)
        expected.append(torch.stack(per_word).mean())
    torch.testing.assert_close(grounding_loss(recorders, targets), torch.stack(expected).mean(), atol=1e-4, rtol=0)


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

    from dag_safety.mini.training.train_unet import unet_config

    unet = UNet2DConditionModel(**unet_config())
    recorders = install_recorders(unet)
    assert recorders and all(name.endswith("attn2") for name in recorders)
    assert all(
        isinstance(p, RecordingAttnProcessor) == k.endswith("attn2.processor") for k, p in unet.attn_processors.items()
    )
