"""The detector against rendered ground truth: precision and recall ≥ 99 % on 1,000 scenes, both styles."""

import numpy as np
import pytest

from dag_safety.mini.detector import ShapeDetector, count_targets, detect, match_prompt
from dag_safety.mini.world import DETECTOR_SEEDS, ObjectSpec, render_scene


def _match(scene, detections):
    """(true positives, false positives, false negatives, per-style true positives) with IoU ≥ 0.5 and labels."""
    used = set()
    tp_by_style = {"filled": 0, "outlined": 0}
    for obj, gt in zip(scene.objects, scene.masks):
        for j, d in enumerate(detections):
            if j in used:
                continue
            iou = (d.mask & gt).sum() / (d.mask | gt).sum()
            if iou >= 0.5 and (d.color, d.shape, d.style) == (obj.color, obj.shape, obj.style):
                used.add(j)
                tp_by_style[obj.style] += 1
                break
    tp = len(used)
    return tp, len(detections) - tp, len(scene.objects) - tp, tp_by_style


def test_precision_recall_on_1000_scenes():
    tp = fp = fn = 0
    tp_style = {"filled": 0, "outlined": 0}
    n_style = {"filled": 0, "outlined": 0}
    for seed in DETECTOR_SEEDS[:1000]:
        scene = render_scene(seed)
        a, b, c, by_style = _match(scene, detect(scene.image))
        tp, fp, fn = tp + a, fp + b, fn + c
        for k in by_style:
            tp_style[k] += by_style[k]
        for o in scene.objects:
            n_style[o.style] += 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)
    for style in ("filled", "outlined"):
        assert n_style[style] > 300
        assert tp_style[style] / n_style[style] >= 0.99, (style, tp_style[style], n_style[style])


def test_detection_fields():
    scene = render_scene(DETECTOR_SEEDS[0])
    dets = detect(scene.image)
    assert len(dets) == len(scene.objects)
    for d, gt in zip(dets, scene.masks):
        assert d.mask.shape == (64, 64) and d.mask.dtype == bool
        x0, y0, x1, y1 = d.box
        ys, xs = np.nonzero(d.mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert d.area == d.mask.sum()


def test_accepts_float_and_pil_and_rejects_bad_shape():
    from PIL import Image

    scene = render_scene(DETECTOR_SEEDS[1])
    ref = [(d.color, d.shape, d.style) for d in detect(scene.image)]
    assert [(d.color, d.shape, d.style) for d in detect(scene.image / 255.0)] == ref
    assert [(d.color, d.shape, d.style) for d in detect(Image.fromarray(scene.image))] == ref
    with pytest.raises(ValueError, match="shape"):
        detect(np.zeros((64, 64)))


def test_robust_to_mild_noise():
    rng = np.random.default_rng(0)
    ok = total = 0
    for seed in DETECTOR_SEEDS[1000:1200]:
        scene = render_scene(seed)
        noisy = np.clip(scene.image + rng.normal(0, 12, scene.image.shape), 0, 255).astype(np.uint8)
        found, _ = match_prompt(scene.objects, detect(noisy))
        ok, total = ok + found, total + len(scene.objects)
    assert ok / total >= 0.97


def test_empty_image_and_targets():
    assert detect(np.full((64, 64, 3), 128, np.uint8)) == []
    scene = next(render_scene(s) for s in DETECTOR_SEEDS if any(o.is_target for o in render_scene(s).objects))
    assert count_targets(detect(scene.image)) == sum(o.is_target for o in scene.objects)
    found, extra = match_prompt([ObjectSpec("red", "star")], [])
    assert (found, extra) == (0, 0)
    assert ShapeDetector().background(scene.image) == scene.background
