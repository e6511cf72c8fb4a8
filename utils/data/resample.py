"""Volumes to the configured cube: zero-pad to a physical cube, then resize to ``N x N x N``.

The rule, for a volume ``[D, H, W]`` with voxel spacing ``s = (s_d, s_h, s_w)`` mm (the norms of its
affine's columns; 1 mm when it has no affine) and the configured ``data_args.image_size`` N:

1. Pad: the field of view is ``L = max_i(n_i * s_i)`` mm along every axis. Each axis is zero-padded
   (background: image 0, label 0), as evenly as possible on both sides (the extra voxel after), to
   ``m_i = round(L / s_i)`` voxels (never fewer than ``n_i``). Nothing is cropped, so no anatomy and no
   label is lost, and the volume keeps its physical aspect ratio.
2. Resize every axis to N voxels: images trilinearly, masks by nearest neighbour (labels stay labels),
   both with voxel centres aligned (``align_corners=False``; ``nearest-exact`` for masks), so output
   voxel ``u`` samples input voxel ``(u + 0.5) * m_i / N - 0.5``. The new spacing is ``m_i * s_i / N``
   (isotropic up to the rounding of ``m_i``).

The affine follows both steps, so every output voxel keeps its world position:
``A' = A @ T(-pad_before) @ [diag(m / N) | m / (2N) - 1/2]``. A volume that is already ``N^3`` is
returned unchanged. 2-D images are never resampled: they must have the configured size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.nifti import voxel_spacing

logger = logging.getLogger(__name__)


def cube_padding(shape: tuple[int, int, int], spacing) -> list[tuple[int, int]]:
    """``(before, after)`` zero voxels per axis that make ``shape`` a physical cube (rule step 1)."""
    extent = max(n * s for n, s in zip(shape, spacing))
    pads = []
    for n, s in zip(shape, spacing):
        extra = max(int(round(extent / s)) - n, 0)
        pads.append((extra // 2, extra - extra // 2))
    return pads


def resampled_affine(affine, pads: list[tuple[int, int]], padded: tuple[int, ...], size: int) -> np.ndarray:
    """The affine ``[4, 4]`` of the padded volume ``padded`` resized to ``size^3`` (see the module docstring)."""
    shift = np.eye(4)
    shift[:3, 3] = [-before for before, _ in pads]
    scale = np.asarray(padded, dtype=np.float64) / size
    resize = np.eye(4)
    resize[:3, :3] = np.diag(scale)
    resize[:3, 3] = scale / 2.0 - 0.5
    return np.asarray(affine, dtype=np.float64) @ shift @ resize


def fit_volume(image: np.ndarray, mask: np.ndarray, affine, size: int):
    """``(image, mask, affine)`` of one volume on the ``size^3`` grid by the rule of the module docstring.

    ``image`` and ``mask`` are ``[1, D, H, W]``; an integer image comes back ``uint8`` (rounded), a float
    image ``float32``; the mask keeps its dtype; ``affine`` ``[4, 4]`` (None: 1 mm voxels, and the returned
    affine then maps the new voxels into that voxel frame).
    """
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if image.shape[1:] == (size,) * 3:
        return image, mask, affine
    padded = np.pad(image, [(0, 0), *cube_padding(image.shape[1:], voxel_spacing(affine))])
    x = F.interpolate(torch.from_numpy(padded.astype(np.float32))[None], size=(size,) * 3, mode="trilinear",
                      align_corners=False)[0].numpy()
    if np.issubdtype(image.dtype, np.integer):
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return (x, *fit_mask(mask, affine, size))


def fit_mask(mask: np.ndarray, affine, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, affine)`` of a label map ``[1, D, H, W]`` on the ``size^3`` grid (nearest neighbour; the same
    padding, resize and affine as :func:`fit_volume`), e.g. a mask to generate from; its dtype is kept."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if mask.shape[1:] == (size,) * 3:
        return mask, affine
    pads = cube_padding(mask.shape[1:], voxel_spacing(affine))
    padded = np.pad(mask, [(0, 0), *pads])
    labels = F.interpolate(torch.from_numpy(padded.astype(np.float32))[None], size=(size,) * 3,
                           mode="nearest-exact")[0].numpy()
    return labels.astype(mask.dtype), resampled_affine(affine, pads, padded.shape[1:], size)


def fit_records(records: list[dict], size: int) -> tuple[list[dict], int]:
    """``records`` with every 3-D record (``image`` ``[1, D, H, W]``) fitted to ``size^3`` by :func:`fit_volume`,
    and how many were changed. Other records (2-D, or a mask unlike its image) pass unchanged for validation to
    judge."""
    out, changed = [], 0
    for r in records:
        image, mask = np.asarray(r["image"]), np.asarray(r["mask"])
        if image.ndim != 4 or image.shape != mask.shape or image.shape[1:] == (size,) * 3:
            out.append(r)
            continue
        x, mask, affine = fit_volume(image, mask, r.get("affine"), size)
        out.append({**r, "image": x, "mask": mask, "affine": affine})
        changed += 1
    return out, changed


def fit_dataset(data: dict[str, list[dict]], size: int) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Every split's records fitted by :func:`fit_records` (training data, and evaluation's real volumes, as the
    model sees them), and how many were changed per split."""
    fitted = {split: fit_records(records, size) for split, records in data.items()}
    return {split: records for split, (records, _) in fitted.items()}, {s: n for s, (_, n) in fitted.items()}


def unfit_image(image: torch.Tensor, shape: tuple[int, int, int], affine) -> torch.Tensor:
    """The inverse of :func:`fit_volume` for an image ``[1, N, N, N]`` (e.g. one generated for a fitted mask):
    resized trilinearly (voxel centres aligned) onto the padded cube of a ``shape`` volume with ``affine``
    (None: 1 mm voxels), then cropped to ``shape``, so it lies on that volume's own grid: ``[1, *shape]``."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    pads = cube_padding(tuple(shape), voxel_spacing(affine))
    padded = tuple(n + before + after for n, (before, after) in zip(shape, pads))
    x = F.interpolate(image[None].float(), size=padded, mode="trilinear", align_corners=False)[0]
    (d, _), (h, _), (w, _) = pads
    return x[:, d:d + shape[0], h:h + shape[1], w:w + shape[2]]
