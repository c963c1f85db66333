"""The shapes world: deterministic rendering, exact masks, captions, seed splits, tokenizer."""

import numpy as np
import pytest

from dag_safety.mini import world
from dag_safety.mini.tokenizer import MAX_LENGTH, build_tokenizer
from dag_safety.mini.world import (
    BACKGROUNDS,
    COLORS,
    DETECTOR_SEEDS,
    HELDOUT_SEEDS,
    TRAIN_SEEDS,
    ObjectSpec,
    caption_for,
    render_scene,
    sample_prompt,
)


def test_render_is_deterministic():
    a, b = render_scene(123), render_scene(123)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.masks, b.masks)
    assert a.caption == b.caption
    assert not np.array_equal(render_scene(124).image, a.image)


@pytest.mark.parametrize("seed", range(200))
def test_scene_invariants(seed):
    s = render_scene(seed)
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert 1 <= len(s.objects) <= 3
    assert s.masks.shape == (len(s.objects), 64, 64)
    # masks are exact: disjoint, non-empty, painted in the object colour; everything else is background
    assert (s.masks.sum(0) <= 1).all()
    for o, m in zip(s.objects, s.masks):
        assert m.sum() > 20
        assert (s.image[m] == COLORS[o.color]).all()
        assert 8 <= o.radius <= 14
    assert (s.image[~s.masks.any(0)] == BACKGROUNDS[s.background]).all()
    # reading order and caption
    xs = [o.center[0] for o in s.objects]
    assert xs == sorted(xs)
    assert s.caption == caption_for([o.spec for o in s.objects], s.background)


def test_caption_format():
    objs = [ObjectSpec("red", "star"), ObjectSpec("blue", "circle", "outlined")]
    assert caption_for(objs, "white") == "a red star and an outlined blue circle on a white background"
    with pytest.raises(ValueError, match="purple"):
        ObjectSpec("purple", "star")
    with pytest.raises(ValueError, match="pink"):
        caption_for(objs, "pink")


def test_outlined_objects_have_background_inside():
    for seed in range(300):
        s = render_scene(seed)
        for o, m in zip(s.objects, s.masks):
            if o.style == "outlined":
                cy, cx = round(o.center[1]), round(o.center[0])
                assert not m[cy, cx], (seed, o)
                return
    pytest.fail("no outlined object in 300 scenes")


def test_seed_ranges_are_disjoint():
    ranges = [TRAIN_SEEDS, HELDOUT_SEEDS, DETECTOR_SEEDS]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start


def test_sample_prompt_matches_scene_and_require():
    p = sample_prompt(7)
    assert p.caption == render_scene(7).caption
    for seed in HELDOUT_SEEDS[:50]:
        p = sample_prompt(seed, require=world.TARGET_CONCEPT)
        assert p.has_target and "red star" in p.caption


def test_distribution_covers_vocabulary():
    seen = set()
    for seed in range(500):
        s = render_scene(seed)
        seen |= {(o.color, o.shape, o.style) for o in s.objects}
    assert len(seen) == 4 * 4 * 2


def test_tokenizer_one_token_per_word():
    tok = build_tokenizer()
    assert tok.model_max_length == MAX_LENGTH
    for word in world.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    for text in [world.SAFETY_CONCEPT_TEXT, world.GUIDELINE_INIT_TEXT]:
        assert len(tok(text).input_ids) == len(text.split()) + 2
    longest = " and ".join(["an outlined yellow triangle"] * 3) + " on a white background"
    assert len(tok(longest).input_ids) <= MAX_LENGTH
