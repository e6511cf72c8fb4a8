"""Masks to generate from: a split of a dataset file, or a folder of label maps (PNG/NPY images, NIfTI volumes).
Every mask is checked.

Volumes (``spatial_dims`` 3) of another size than the model's N^3 are fitted to it as training volumes are
(:func:`utils.data.resample.fit_mask`: padded to a physical cube, nearest neighbour) and keep their own grid
(:class:`VolumeGrid`), so the outputs can be written back onto it; images of another size need ``resize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MASK_SUFFIXES = (".png", ".npy")


class MaskError(ValueError):
    """A mask that cannot be used; the message names the file or sample."""


@dataclass(frozen=True)
class VolumeGrid:
    """Where a volume mask came from: its ``affine`` (voxel -> world mm; identity when unknown) and, when it was
    fitted to the model's grid, the ``mask`` (1, D', H', W') uint8 on its own grid and ``fitted_affine``, the
    affine of the model's grid (:func:`utils.data.resample.fit_mask`)."""

    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    mask: torch.Tensor | None = None
    fitted_affine: np.ndarray | None = None

    @property
    def model_affine(self) -> np.ndarray:
        """The affine of the volume on the model's N^3 grid: ``fitted_affine`` when fitted, else ``affine``."""
        return self.affine if self.fitted_affine is None else self.fitted_affine


@dataclass
class MaskSource:
    masks: torch.Tensor  # (N, 1, H, W) or (N, 1, D, H, W) uint8 labels
    ids: list  # per mask: index in the split (int) or file name (str)
    description: str
    classes: list | None = None  # per mask from a dataset split: its record's class (None where it has none)
    grids: list[VolumeGrid] | None = None  # volumes: each mask's own grid


def read_single_channel(path: Path, modes: tuple[str, ...], what: str) -> tuple[np.ndarray, str | None]:
    """A ``.npy`` array (no pickles) or a PNG in one of ``modes``, and the PNG's mode (None for ``.npy``);
    anything unreadable is a :class:`MaskError` naming the file and ``what`` it should be."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False), None
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in modes:
                raise MaskError(f"{path}: a {what} must be a single-channel PNG, got mode {im.mode}")
            return np.asarray(im), im.mode
    except MaskError:
        raise
    except Exception as e:
        raise MaskError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from e


def _read_label_map(path: Path) -> np.ndarray:
    arr, _ = read_single_channel(path, ("L", "P", "I", "I;16"), "label map")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise MaskError(f"{path}: expected a 2-D label map (H, W) or (1, H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(arr == np.round(arr)):
        raise MaskError(f"{path}: label map holds non-integer values")
    return arr


def _check_labels(mask: np.ndarray, where: str, num_classes: int) -> None:
    labels = np.unique(mask)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise MaskError(f"{where}: label(s) {outside.tolist()} outside the model's classes 0..{num_classes - 1}")


def _check(mask: np.ndarray, where: str, num_classes: int, image_size: int, resize: bool) -> torch.Tensor:
    _check_labels(mask, where, num_classes)
    t = torch.from_numpy(np.array(mask, dtype=np.uint8).reshape(1, 1, *mask.shape[-2:]))  # a copy: PIL's is read-only
    if t.shape[-2:] != (image_size, image_size):
        if not resize:
            raise MaskError(f"{where}: mask is {tuple(t.shape[-2:])}, the model makes {image_size}x{image_size} "
                            "images; pass --resize to resize masks (nearest neighbour)")
        t = F.interpolate(t.float(), size=(image_size, image_size), mode="nearest").to(torch.uint8)
    return t[0]


def _check_volume(mask: np.ndarray, where: str, num_classes: int, image_size: int,
                  affine: np.ndarray | None) -> tuple[torch.Tensor, VolumeGrid]:
    """A volume mask [D, H, W] or [1, D, H, W] as (1, N, N, N) uint8 on the model's grid, and its own grid."""
    from utils.data.resample import fit_mask

    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 3:
        raise MaskError(f"{where}: expected a volume mask [D, H, W] or [1, D, H, W], got shape {list(mask.shape)}")
    if 1 in mask.shape:
        raise MaskError(f"{where}: a mask of shape {list(mask.shape)} is a 2-D label map (one slice), and the model "
                        "makes volumes (model_args.spatial_dims 3); give 3-D masks")
    _check_labels(mask, where, num_classes)
    source = np.asarray(mask, dtype=np.uint8)[None]
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    fitted, fitted_affine = fit_mask(source, affine, image_size)
    if fitted.shape == source.shape:
        return torch.from_numpy(np.ascontiguousarray(fitted)), VolumeGrid(affine)
    return torch.from_numpy(np.ascontiguousarray(fitted)), VolumeGrid(affine, torch.from_numpy(source), fitted_affine)


def _load_nifti_masks(files: list[Path], num_classes: int, image_size: int) -> MaskSource:
    from utils.data.layout import DatasetError
    from utils.data.nifti import nifti_stem
    from utils.data.nifti_folder import read_mask_volume

    masks, grids = [], []
    for f in files:
        try:
            array, affine = read_mask_volume(f)
        except DatasetError as e:
            raise MaskError(str(e)) from e
        mask, grid = _check_volume(array, str(f), num_classes, image_size, affine)
        masks.append(mask)
        grids.append(grid)
    return MaskSource(torch.stack(masks), [nifti_stem(f) for f in files], f"{len(files)} NIfTI masks in "
                      f"{files[0].parent}", grids=grids)


def load_masks(path: str | Path, split: str, num_classes: int, image_size: int, resize: bool = False,
               spatial_dims: int = 2) -> MaskSource:
    """Masks from a label-map folder (``*.png``/``*.npy`` files; for volumes ``*.nii.gz``/``*.nii``; sorted by
    name) or a dataset's ``split``; volumes carry their :class:`VolumeGrid` (a record's ``affine``, else
    identity)."""
    from utils.data.nifti import is_nifti

    path = Path(path)
    if not path.exists():
        raise MaskError(f"{path}: no such file or folder")
    entries = list(path.iterdir()) if path.is_dir() else []
    nifti = sorted(p for p in entries if is_nifti(p))
    if nifti and spatial_dims == 3:
        return _load_nifti_masks(nifti, num_classes, image_size)
    if nifti and not any(p.suffix.lower() in MASK_SUFFIXES for p in entries):
        raise MaskError(f"{path}: holds NIfTI volumes ({nifti[0].name}), the model makes 2-D images "
                        f"(model_args.spatial_dims 2); give a folder of {'/'.join(MASK_SUFFIXES)} label maps")
    files = sorted(p for p in entries if p.suffix.lower() in MASK_SUFFIXES)
    if path.is_dir() and not any(p.is_dir() for p in entries) and not files:  # nor a dataset folder
        raise MaskError(f"{path}: holds no {'/'.join(MASK_SUFFIXES)} label maps; expected a folder of label maps, "
                        "a dataset folder or a dataset file")
    if files and spatial_dims == 3:
        raise MaskError(f"{path}: holds 2-D label maps ({files[0].name}), the model makes volumes; give a folder "
                        "of NIfTI masks (.nii.gz) or a 3-D dataset file")
    if files:
        masks = [_check(_read_label_map(f), str(f), num_classes, image_size, resize) for f in files]
        return MaskSource(torch.stack(masks), [f.name for f in files], f"{len(files)} label maps in {path}")
    from utils.data.dataset_io import load_dataset

    data = load_dataset(path)
    if not data.get(split):
        raise MaskError(f"{path}: split '{split}' is missing or empty (has: {', '.join(sorted(data))})")
    records, where = data[split], f"{path}: {split}"
    classes = [r.get("class") for r in records]
    if spatial_dims == 3:
        checked = [_check_volume(np.asarray(r["mask"]), f"{where}[{i}]", num_classes, image_size, r.get("affine"))
                   for i, r in enumerate(records)]
        return MaskSource(torch.stack([m for m, _ in checked]), list(range(len(records))), f"split '{split}' of "
                          f"{path}", classes, [g for _, g in checked])
    masks = [_check(np.asarray(r["mask"]), f"{where}[{i}]", num_classes, image_size, resize)
             for i, r in enumerate(records)]
    return MaskSource(torch.stack(masks), list(range(len(masks))), f"split '{split}' of {path}", classes)
