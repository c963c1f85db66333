"""Pictures of what DAG detects: a DAG map blended over its image."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

__all__ = ["heat_map"]


def heat_map(image: Image.Image, dag_map: torch.Tensor) -> Image.Image:
    """`image` with a DAG map blended over it as a JET heat map, half and half.

    Args:
        image (`PIL.Image.Image`): the generated image, `H×W`.
        dag_map (`torch.Tensor`): `(h, w)` in `[0, 1]` at latent resolution (an entry of `dag_maps`); resized to
            the image bilinearly.

    Returns:
        `PIL.Image.Image`: RGB, `H×W`.
    """
    rgb = np.asarray(image.convert("RGB"))
    resized = cv2.resize(dag_map.numpy().astype(np.float32), rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.uint8(np.clip(resized, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    return Image.fromarray(np.uint8(0.5 * rgb + 0.5 * colored))
