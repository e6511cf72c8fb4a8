"""Images a person can open: tensors in [-1, 1] to uint8 PNGs and grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] to [0, 1] (clamped; the same rule for real and generated images)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def mask_to_unit(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels to grey levels in [0, 1] for display."""
    return mask.float() / max(num_classes - 1, 1)


def grid_image(rows: list[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of (N, 1, H, W) images in [0, 1] to one uint8 (rows*H, N*W) array with padding."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.zeros((len(rows) * (h + pad) + pad, n * (w + pad) + pad), dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = np.rint(img[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return canvas


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
