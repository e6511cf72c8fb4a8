"""NIfTI volumes (``.nii``/``.nii.gz``) in and out, through nibabel.

A volume is a numpy array ``[D, H, W]`` in the file's own voxel axes ``(i, j, k)``, with no
transposition or flip, and its affine ``float64 [4, 4]`` mapping a voxel index ``(d, h, w, 1)``
to world millimetres, exactly as nibabel gives it (``img.affine``): so the affine read with a
volume applies to the array unchanged, and :func:`write_volume` of that array with that affine
gives back the same file geometry. The voxel spacing is the norm of each of the affine's first
three columns (:func:`voxel_spacing`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.data.layout import DatasetError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without ``.nii.gz``/``.nii``: ``case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array [D, H, W], affine float64 [4, 4])`` of the NIfTI file ``path``.

    The array keeps the stored dtype (a float when the header scales the values); trailing axes of
    length 1 (``[D, H, W, 1]``, as some tools write) are dropped. A file that nibabel cannot read,
    or whose data is not 3-D, raises :class:`DatasetError` naming the file.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(path, mmap=False)  # read into memory: no open memory map of the file outlives the call
        array = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises several types for a damaged or non-NIfTI file
        raise DatasetError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DatasetError(f"{path}: NIfTI data has shape {list(shape)}, expected a 3-D volume [D, H, W]")
    return np.ascontiguousarray(array), affine


def write_volume(path: str | Path, array, affine, labels: bool = False) -> Path:
    """Write ``array [D, H, W]`` with ``affine [4, 4]`` (voxel -> world mm) to ``path`` (.nii or .nii.gz).

    ``labels``: the array is a label map, stored as ``uint8`` (values must be integers in 0..255).
    Otherwise ``uint8`` images stay ``uint8`` and any other dtype is stored as ``float32``.
    The affine is written as both the sform and the qform (code 1, scanner coordinates), in millimetres.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: a NIfTI file name ends in .nii or .nii.gz")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a volume [D, H, W], got shape {list(array.shape)}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: expected an affine [4, 4], got shape {list(affine.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: the affine is not finite or is singular (a voxel axis of size 0), NIfTI cannot "
                         f"store it:\n{affine}")
    if labels:
        if array.size and (array.min() < 0 or array.max() > 255 or np.any(array != np.round(array))):
            raise ValueError(f"{path}: labels must be integers in 0..255")
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")  # the affine is in millimetres; "unknown" units leave viewers guessing
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def voxel_spacing(affine) -> np.ndarray:
    """The voxel size in mm along each array axis ``(d, h, w)``: the norms of the affine's first 3 columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
