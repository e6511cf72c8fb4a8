"""Images a person can open: tensors in [-1, 1] to uint8 PNGs and grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_unit(x: torch.Tensor, image_range: tuple[float, ...] = (-1.0, 1.0)) -> torch.Tensor:
    """Model range ``image_range`` ([-1, 1] unless a flow says otherwise) to [0, 1] (clamped; the same rule for
    real and generated images)."""
    lo, hi = image_range
    return ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def mask_to_unit(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels to grey levels in [0, 1] for display."""
    return mask.float() / max(num_classes - 1, 1)


MIN_TILE = 128  # px: every tile of a grid is shown at least this wide (nearest-neighbour upscaling)


def grid_image(rows: list[torch.Tensor], pad: int = 2, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, min_tile: int = MIN_TILE) -> np.ndarray:
    """Rows of (N, 1, H, W) images in [0, 1] to one uint8 grey array with padding and optional labels.

    Tiles narrower than ``min_tile`` are enlarged by the smallest integer factor that reaches it (nearest
    neighbour: pixels stay pixels); labels go in a left column (rows) and a top band (columns).
    """
    factor = max(1, -(-min_tile // rows[0].shape[-1]))
    tiles = [[np.kron(np.rint(img[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8),
                      np.ones((factor, factor), dtype=np.uint8)) for img in row] for row in rows]
    h, w = tiles[0][0].shape
    left = _label_width(row_labels) if row_labels else 0
    top = LABEL_HEIGHT if col_labels else 0
    n = max(len(r) for r in tiles)
    canvas = np.zeros((top + len(tiles) * (h + pad) + pad, left + n * (w + pad) + pad), dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = top + pad + r * (h + pad), left + pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    if row_labels or col_labels:
        canvas = _draw_labels(canvas, row_labels or [], col_labels or [], top, left, h, w, pad)
    return canvas


LABEL_HEIGHT = 14  # px of the band holding column labels (PIL's default bitmap font is 11 px high)


def _label_width(labels: list[str]) -> int:
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("L", (1, 1))), ImageFont.load_default()
    return 8 + max(int(draw.textlength(t, font=font)) for t in labels)


def _draw_labels(canvas: np.ndarray, row_labels: list[str], col_labels: list[str], top: int, left: int,
                 h: int, w: int, pad: int) -> np.ndarray:
    from PIL import ImageDraw

    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for r, text in enumerate(row_labels):
        draw.text((4, top + pad + r * (h + pad) + h // 2 - 5), text, fill=255)
    for c, text in enumerate(col_labels):
        draw.text((left + pad + c * (w + pad) + 2, 1), text, fill=255)
    return np.asarray(img)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# The three orthogonal planes of a volume [D, H, W], named by the two array axes each slice spans (the third is
# held fixed): HW at a fixed d, DW at a fixed h, DH at a fixed w. Named by array axes, not anatomy: a NIfTI
# volume keeps its file's voxel axes (utils.data.nifti), so which plane is axial depends on the file. For
# RAS-ordered voxel axes (d left-right, h posterior-anterior, w inferior-superior: the brain phantom, BraTS)
# HW is sagittal, DW coronal and DH axial. One vocabulary for the PNGs and the 2.5-D FID.
PLANES = ("HW", "DW", "DH")


def mid_slices(volumes: torch.Tensor) -> torch.Tensor:
    """The three orthogonal mid-slices of ``volumes`` (N, 1, D, H, W), each zero-padded (centred) to S x S with
    S = max(D, H, W): (N, 3, S, S), planes in :data:`PLANES` order (the middle D slice [H, W], the middle H
    slice [D, W], the middle W slice [D, H])."""
    d, h, w = volumes.shape[-3:]
    planes = (volumes[:, 0, d // 2], volumes[:, 0, :, h // 2], volumes[:, 0, :, :, w // 2])
    size = max(d, h, w)

    def centred(p: torch.Tensor) -> torch.Tensor:
        dy, dx = size - p.shape[-2], size - p.shape[-1]
        return torch.nn.functional.pad(p, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))

    return torch.stack([centred(p) for p in planes], dim=1)


def display_tiles(images: torch.Tensor) -> torch.Tensor:
    """Tiles for :func:`grid_image`: images (N, 1, H, W) as they are; volumes (N, 1, D, H, W) as their three
    mid-slices side by side, (3N, 1, S, S) (sample-major)."""
    if images.ndim == 4:
        return images
    return mid_slices(images).flatten(0, 1).unsqueeze(1)
