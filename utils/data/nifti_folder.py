"""3-D records from NIfTI image/mask pairs, and a dataset written back as a NIfTI folder.

The folder layout is :mod:`utils.data.folder_dataset`'s (``{split}/images/NAME.nii.gz`` with
``{split}/masks/NAME.nii.gz``, also ``.nii``); this module reads and checks one pair:

- the mask's shape equals the image's, and its affine too (voxel spacing compared first, then the
  whole affine; tolerance 1e-3 mm), so that a label lies on the voxel it labels;
- mask values are integers in 0..255 (the range check against ``num_classes`` is
  :func:`utils.data.dataset_io.validate_dataset`'s, which names the record and this ``name``);
- images of any numeric dtype become ``uint8``: a ``uint8`` volume is kept as it is; any other is
  rescaled per volume, clipped to its 0.5th and 99.5th percentiles (so a few very bright voxels do
  not darken the rest) and mapped linearly to [0, 255]; a constant volume becomes zeros.

A record is ``{"image": uint8 [1, D, H, W], "mask": uint8 [1, D, H, W], "affine": float64 [4, 4],
"metadata": {"name": NAME}}``, arrays in the file's voxel axes (see :mod:`utils.data.nifti`).
Each error is a :class:`DatasetError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.data.layout import DatasetError, as_labels
from utils.data.nifti import read_volume, voxel_spacing, write_volume

AFFINE_TOLERANCE = 1e-3  # mm: image and mask geometry must agree to this
PERCENTILES = (0.5, 99.5)  # per-volume intensity window of a non-uint8 image


def read_volume_pair(image_path: Path, mask_path: Path, name: str) -> dict:
    """The checked record of one image/mask pair (see the module docstring)."""
    image, image_affine = read_volume(image_path)
    mask, mask_affine = read_mask_volume(mask_path)
    if mask.shape != image.shape:
        raise DatasetError(f"{mask_path}: mask has shape {list(mask.shape)} but its image {image_path} has "
                           f"{list(image.shape)}")
    _check_same_geometry(image_path, image_affine, mask_path, mask_affine)
    return {"image": volume_to_uint8(image, image_path)[None], "mask": mask[None], "affine": image_affine,
            "metadata": {"name": name}}


def read_mask_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(labels uint8 [D, H, W], affine float64 [4, 4])`` of a NIfTI label map; non-integer, negative or
    > 255 values are a :class:`DatasetError` naming ``path``."""
    mask, affine = read_volume(path)
    return _labels(mask, path), affine


def _check_same_geometry(image_path: Path, image_affine, mask_path: Path, mask_affine) -> None:
    image_spacing, mask_spacing = voxel_spacing(image_affine), voxel_spacing(mask_affine)
    if not np.allclose(image_spacing, mask_spacing, rtol=0.0, atol=AFFINE_TOLERANCE):
        raise DatasetError(f"{mask_path}: voxel spacing {_mm(mask_spacing)} mm differs from its image "
                           f"{image_path} ({_mm(image_spacing)} mm); resample the mask onto the image's grid")
    if not np.allclose(image_affine, mask_affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        raise DatasetError(f"{mask_path}: affine differs from its image {image_path} by up to "
                           f"{np.abs(image_affine - mask_affine).max():.4g} (same spacing, another origin or "
                           f"orientation; tolerance {AFFINE_TOLERANCE}); mask:\n{mask_affine}\nimage:\n{image_affine}")


def _mm(spacing) -> str:
    return " x ".join(f"{s:.4g}" for s in spacing)


def _labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """``mask`` as ``uint8`` labels; non-integer, negative or > 255 values are an error naming ``path``."""
    if mask.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: mask dtype {mask.dtype}, expected integer labels")
    mask = as_labels(mask, str(path))
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DatasetError(f"{path}: mask labels span [{float(mask.min()):g}, {float(mask.max()):g}]; labels are "
                           "0..255 (0 background)")
    return mask.astype(np.uint8)


def volume_to_uint8(volume: np.ndarray, path: Path) -> np.ndarray:
    """An image volume as ``uint8``: kept when it is ``uint8``, else the per-volume percentile window."""
    if volume.dtype == np.uint8:
        return volume
    if volume.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: image dtype {volume.dtype} is not numeric")
    volume = volume.astype(np.float64)
    if not np.all(np.isfinite(volume)):
        raise DatasetError(f"{path}: image holds NaN or inf values")
    lo, hi = np.percentile(volume, PERCENTILES)
    if hi <= lo:
        return np.zeros(volume.shape, np.uint8)
    return np.rint(np.clip((volume - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_nifti_folder(root: str | Path, data: dict[str, list[dict]]) -> Path:
    """Write 3-D records as ``root/{split}/images|masks/NAME.nii.gz`` (NAME: ``metadata["patient"]``, else
    ``metadata["name"]``, else the record index); records without an affine get 1 mm voxels (identity)."""
    root = Path(root)
    for split, records in data.items():
        for i, r in enumerate(records):
            meta = r.get("metadata") or {}
            name = str(meta.get("patient", meta.get("name", f"{i:05d}")))
            affine = r.get("affine", np.eye(4))
            write_volume(root / split / "images" / f"{name}.nii.gz", np.asarray(r["image"])[0], affine)
            write_volume(root / split / "masks" / f"{name}.nii.gz", np.asarray(r["mask"])[0], affine, labels=True)
    return root
