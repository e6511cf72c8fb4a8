"""A dataset as a folder of PNG files: images and masks paired by file name.

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
- Files pair by stem (``images/a.png`` with ``masks/a.png``); records are sorted
  by stem and carry ``metadata = {"name": stem}``. Only ``*.png`` files count.

Any file without a partner, an unreadable file, or an image that is not 8-bit
grayscale raises :class:`~utils.data.dataset_io.DatasetError` naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from utils.data.layout import SPLITS, DatasetError

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
    if flat:
        return {"test": _load_split(root, "test")}
    if not split_dirs:
        raise DatasetError(
            f"{root}: no dataset folders found; expected {'/'.join(SPLITS)} folders each holding images/ "
            "and masks/ (PNG files with matching names), or a flat images/ + masks/ pair (read as 'test')"
        )
    return {split: _load_split(root / split, split) for split in split_dirs}


def _load_split(folder: Path, split: str) -> list[dict]:
    images, masks = _pngs(folder / "images"), _pngs(folder / "masks")
    for have, other, lacking in ((images, masks, "masks"), (masks, images, "images")):
        unpaired = sorted(set(have) - set(other))
        if unpaired:
            more = f" (and {len(unpaired) - 1} more)" if len(unpaired) > 1 else ""
            raise DatasetError(f"{have[unpaired[0]]}: no file of the same name in {folder / lacking}{more}")
    if not images:
        raise DatasetError(f"{folder}: images/ and masks/ hold no .png files")
    records = []
    for stem in sorted(images):
        image = _read_png(images[stem], _IMAGE_MODES, "an 8-bit grayscale image")
        mask = _read_png(masks[stem], _MASK_MODES, "an 8-bit label mask (values are the labels)")
        if image.shape != mask.shape:
            raise DatasetError(f"{masks[stem]}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                               f"{images[stem]} is {image.shape[1]}x{image.shape[0]}")
        records.append({"image": image[None], "mask": mask[None], "metadata": {"name": stem}})
    logger.info("%s: %d image/mask pairs as split '%s'", folder, len(records), split)
    return records


def _pngs(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder (a split folder holds images/ and masks/)")
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()}


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
