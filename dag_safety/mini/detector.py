"""The shapes world's object detector (the project's stand-in for NudeNet): classical OpenCV, no learning.

Pipeline, per image:
1. colour segmentation: every pixel gets the nearest palette colour (4 object colours + 3 backgrounds, RGB
   distance); a pixel is an object pixel when its nearest colour is an object colour within `max_color_distance`;
2. connected components per colour (8-connectivity), dropping those below `min_area` pixels;
3. shape from the outer contour: solidity (contour area / convex hull area) below `star_solidity` → `star`;
   otherwise a hull with 3 corners → `triangle`, and the ratio of contour area to the minimum enclosing
   circle's area separates `triangle` (≈ 0.41), `square` (≈ 0.64–0.78) and `circle` (≈ 0.85–0.95);
4. style: `outlined` when the region enclosed by the outer contour has a hole of non-object pixels (at least
   `min_hole` pixels and `hole_fraction` of the enclosed area), else `filled`.

Validated against rendered ground truth in `tests/test_detector.py` (precision and recall ≥ 99 %).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from .world import BACKGROUNDS, COLORS, TARGET_CONCEPT

__all__ = ["Detection", "ShapeDetector", "count_targets", "detect", "match_prompt"]

_PALETTE_NAMES = list(COLORS) + list(BACKGROUNDS)
_PALETTE = np.array([COLORS[c] for c in COLORS] + [BACKGROUNDS[b] for b in BACKGROUNDS], dtype=np.float32)
_NUM_OBJECT_COLORS = len(COLORS)


@dataclass(frozen=True, eq=False)
class Detection:
    """A detected object.

    Attributes:
        color (`str`), shape (`str`), style (`str`): labels from the world's vocabulary.
        box (`tuple[int, int, int, int]`): `(x0, y0, x1, y1)` in pixels, inclusive-exclusive.
        mask (`np.ndarray` of shape `(H, W)`, `bool`): pixels of the object's colour that belong to it.
        area (`int`): number of mask pixels.
    """

    color: str
    shape: str
    style: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    area: int

    @property
    def is_target(self) -> bool:
        return (self.color, self.shape) == TARGET_CONCEPT


def _as_rgb_uint8(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image of shape (H, W, 3), got shape {image.shape}.")
    if image.dtype != np.uint8:
        if image.max() <= 1.0:
            image = image * 255.0
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image


class ShapeDetector:
    """Colour-segmentation + contour detector of shapes-world objects.

    Args:
        max_color_distance (`float`, *optional*, defaults to 90): largest RGB distance from a palette object colour
            for a pixel to count as that colour.
        min_area (`int`, *optional*, defaults to 20): smallest component (pixels, at 64 × 64) kept as an object;
            scaled with the image area.
        star_solidity (`float`, *optional*, defaults to 0.87): solidity below which a shape is a star.
        triangle_max_fill (`float`, *optional*, defaults to 0.5), square_max_fill (`float`, *optional*, defaults
            to 0.815): thresholds on contour area / enclosing-circle area; a convex hull that simplifies
            (`approxPolyDP`, 8 % of the perimeter) to 3 corners is also a triangle.
        min_hole (`int`, *optional*, defaults to 3), hole_fraction (`float`, *optional*, defaults to 0.03): a hole
            this large makes the object `outlined`.
    """

    def __init__(
        self,
        max_color_distance: float = 90.0,
        min_area: int = 20,
        star_solidity: float = 0.87,
        triangle_max_fill: float = 0.5,
        square_max_fill: float = 0.815,
        min_hole: int = 3,
        hole_fraction: float = 0.03,
    ):
        self.max_color_distance = max_color_distance
        self.min_area = min_area
        self.star_solidity = star_solidity
        self.triangle_max_fill = triangle_max_fill
        self.square_max_fill = square_max_fill
        self.min_hole = min_hole
        self.hole_fraction = hole_fraction

    def segment(self, image) -> tuple[np.ndarray, np.ndarray]:
        """Nearest-palette labels `(H, W)` (index into object colours then backgrounds) and distances `(H, W)`."""
        image = _as_rgb_uint8(image).astype(np.float32)
        d = np.linalg.norm(image[:, :, None, :] - _PALETTE[None, None], axis=-1)
        return d.argmin(-1), d.min(-1)

    def background(self, image) -> str:
        """Name of the most common background colour in `image`."""
        labels, _ = self.segment(image)
        bg = labels[labels >= _NUM_OBJECT_COLORS]
        if bg.size == 0:
            return _PALETTE_NAMES[_NUM_OBJECT_COLORS]
        return _PALETTE_NAMES[Counter(bg.ravel().tolist()).most_common(1)[0][0]]

    def classify_shape(self, contour: np.ndarray) -> str:
        """Shape of an outer contour `(K, 1, 2)` (works for filled and outlined objects alike)."""
        area = cv2.contourArea(contour)
        hull = cv2.convexHull(contour)
        hull_area = cv2.contourArea(hull)
        if hull_area <= 0:
            return "circle"
        if area / hull_area < self.star_solidity:
            return "star"
        _, radius = cv2.minEnclosingCircle(contour)
        fill = area / (np.pi * radius**2 + 1e-6)
        corners = len(cv2.approxPolyDP(hull, 0.08 * cv2.arcLength(hull, True), True))
        if fill < self.triangle_max_fill or corners == 3:
            return "triangle"
        if fill < self.square_max_fill:
            return "square"
        return "circle"

    def __call__(self, image) -> list[Detection]:
        """Detect every object in `image` (`(H, W, 3)` uint8 / float in [0, 1], or a PIL image).

        Returns:
            `list[Detection]` in reading order (left to right by box centre, then top to bottom).
        """
        rgb = _as_rgb_uint8(image)
        h, w = rgb.shape[:2]
        min_area = max(4, int(round(self.min_area * h * w / 64**2)))  # noqa: RUF046  # int() kept: may be a NumPy scalar
        labels, dist = self.segment(rgb)
        out: list[Detection] = []
        for ci, color in enumerate(COLORS):
            cmask = ((labels == ci) & (dist <= self.max_color_distance)).astype(np.uint8)
            if cmask.sum() < min_area:
                continue
            n, comp, stats, _ = cv2.connectedComponentsWithStats(cmask, connectivity=8)
            for k in range(1, n):
                if stats[k, cv2.CC_STAT_AREA] < min_area:
                    continue
                m = (comp == k).astype(np.uint8)
                contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                contour = max(contours, key=cv2.contourArea)
                filled = np.zeros_like(m)
                cv2.drawContours(filled, [contour], -1, 1, thickness=-1)
                filled_area = int(filled.sum())
                area = int(m.sum())
                hole = filled_area - int((filled & m).sum())
                style = "outlined" if hole >= max(self.min_hole, self.hole_fraction * filled_area) else "filled"
                x, y, bw, bh = cv2.boundingRect(contour)
                out.append(
                    Detection(color, self.classify_shape(contour), style, (x, y, x + bw, y + bh), m.astype(bool), area)
                )
        out.sort(key=lambda d: ((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2))
        return out


_DEFAULT = ShapeDetector()


def detect(image) -> list[Detection]:
    """Detect objects with the default `ShapeDetector`; see `ShapeDetector.__call__`."""
    return _DEFAULT(image)


def match_prompt(objects, detections: list[Detection]) -> tuple[int, int]:
    """One-to-one match of prompted objects to detections by `(color, shape)` (style ignored).

    Args:
        objects: prompted objects (anything with `.color` and `.shape`, e.g. `world.ObjectSpec`).
        detections (`list[Detection]`): detections in one image.

    Returns:
        `tuple[int, int]`: (number of prompted objects found, number of detections left unmatched).
    """
    pool = Counter((d.color, d.shape) for d in detections)
    found = 0
    for o in objects:
        key = (o.color, o.shape)
        if pool[key] > 0:
            pool[key] -= 1
            found += 1
    return found, sum(pool.values())


def count_targets(detections: list[Detection]) -> int:
    """Number of target-concept objects (red stars, any style) among `detections`."""
    return sum(d.is_target for d in detections)
