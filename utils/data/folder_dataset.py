"""A dataset as a folder of PNG images or NIfTI volumes: images and masks paired by file name.

Layout (``ROOT`` is the path given to :func:`load_folder_dataset` or to
``utils.data.dataset_io.load_dataset``)::

    ROOT/train/images/NAME.png   ROOT/train/masks/NAME.png
    ROOT/valid/images/...        ROOT/valid/masks/...
    ROOT/test/images/...         ROOT/test/masks/...

Each split folder that is present becomes that split; absent ones are simply
missing (``validate_dataset`` says which are required). A flat folder
``ROOT/images`` + ``ROOT/masks`` (no split folders) is read as the ``test``
split alone: the usual shape of a set of masks to generate images for.

- Images: 8-bit grayscale PNGs (PIL mode ``L``), stored as ``uint8 [1, H, W]``.
- Masks: 8-bit PNGs whose pixel values are the labels (mode ``L``, or ``P``
  where the palette indices are the labels), stored as ``uint8 [1, H, W]``.
- Or NIfTI volumes (``*.nii.gz``/``*.nii``), read and checked by
  :mod:`utils.data.nifti_folder`: ``image`` ``uint8 [1, D, H, W]``, ``mask``
  ``uint8 [1, D, H, W]`` and the image's ``affine``.
- Files pair by stem (``images/a.png`` with ``masks/a.png``, ``images/a.nii.gz``
  with ``masks/a.nii.gz``); records are sorted by stem and carry
  ``metadata = {"name": stem}``. Only PNG and NIfTI files count, and a dataset
  holds one of the two: PNG and NIfTI files in one folder or across splits are
  an error.

Any file without a partner, an unreadable file, or an image that is not 8-bit
grayscale raises :class:`~utils.data.dataset_io.DatasetError` naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from utils.data.layout import SPLITS, DatasetError
from utils.data.nifti import is_nifti, nifti_stem
from utils.data.nifti_folder import read_volume_pair

logger = logging.getLogger(__name__)

_IMAGE_MODES = ("L",)
_MASK_MODES = ("L", "P")


def load_folder_dataset(path: str | Path) -> dict[str, list[dict]]:
    """Read the folder layout described in the module docstring into ``{split: [record, ...]}``."""
    root = Path(path)
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    flat = (root / "images").is_dir() or (root / "masks").is_dir()
    if split_dirs and flat:
        raise DatasetError(f"{root}: has both split folders {split_dirs} and a flat images/ or masks/ "
                           "folder; use one layout")
    if not split_dirs and not flat:
        raise DatasetError(
            f"{root}: no dataset folders found; expected {'/'.join(SPLITS)} folders each holding images/ "
            "and masks/ (PNG or NIfTI files with matching names), or a flat images/ + masks/ pair (read as 'test')"
        )
    folders = {"test": root} if flat else {split: root / split for split in split_dirs}
    kinds = {split: _file_kind(folder) for split, folder in folders.items()}
    if len(set(kinds.values())) > 1:
        raise DatasetError(f"{root}: splits hold different file formats {kinds}; use PNG or NIfTI throughout")
    return {split: _load_split(folder, split, kinds[split]) for split, folder in folders.items()}


def _file_kind(folder: Path) -> str:
    """``"nifti"`` or ``"png"``: the one format of the files in ``folder``'s images/ and masks/."""
    files = [p for sub in ("images", "masks") if (folder / sub).is_dir() for p in (folder / sub).iterdir()]
    png = [p for p in files if p.suffix.lower() == ".png"]
    nifti = [p for p in files if is_nifti(p)]
    if png and nifti:
        raise DatasetError(f"{folder}: holds both PNG ({png[0]}) and NIfTI ({nifti[0]}) files; use one format")
    return "nifti" if nifti else "png"


def _load_split(folder: Path, split: str, kind: str) -> list[dict]:
    images, masks = _files(folder / "images", kind), _files(folder / "masks", kind)
    for have, other, lacking in ((images, masks, "masks"), (masks, images, "images")):
        unpaired = sorted(set(have) - set(other))
        if unpaired:
            more = f" (and {len(unpaired) - 1} more)" if len(unpaired) > 1 else ""
            raise DatasetError(f"{have[unpaired[0]]}: no file of the same name in {folder / lacking}{more}")
    if not images:
        raise DatasetError(f"{folder}: images/ and masks/ hold no .png, .nii or .nii.gz files")
    read = read_volume_pair if kind == "nifti" else _read_png_pair
    records = [read(images[stem], masks[stem], stem) for stem in sorted(images)]
    logger.info("%s: %d image/mask pairs as split '%s'", folder, len(records), split)
    return records


def _read_png_pair(image_path: Path, mask_path: Path, name: str) -> dict:
    image = _read_png(image_path, _IMAGE_MODES, "an 8-bit grayscale image")
    mask = _read_png(mask_path, _MASK_MODES, "an 8-bit label mask (values are the labels)")
    if image.shape != mask.shape:
        raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                           f"{image_path} is {image.shape[1]}x{image.shape[0]}")
    return {"image": image[None], "mask": mask[None], "metadata": {"name": name}}


def _files(folder: Path, kind: str) -> dict[str, Path]:
    """``{stem: path}`` of the ``kind`` ("png" or "nifti") files in ``folder``; two files of one stem are an error."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder (a split folder holds images/ and masks/)")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not (is_nifti(p) if kind == "nifti" else p.suffix.lower() == ".png"):
            continue
        stem = nifti_stem(p) if kind == "nifti" else p.stem
        if stem in found:
            raise DatasetError(f"{p}: same name as {found[stem]}; keep one file per name")
        found[stem] = p
    return found


def _read_png(path: Path, modes: tuple[str, ...], what: str) -> np.ndarray:
    """The pixel array ``uint8 [H, W]`` of ``path``, which must be a PNG in one of ``modes``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.asarray(im)
    except Exception as e:  # PIL raises several types for a damaged or non-image file
        raise DatasetError(f"{path}: cannot read as PNG ({type(e).__name__}: {e})") from e
    if mode not in modes:
        raise DatasetError(f"{path}: PIL mode '{mode}', expected {what} (mode {' or '.join(modes)})")
    return array.astype(np.uint8, copy=False)
