"""Masks to generate from: a split of a dataset file, or a folder of label maps. Every mask is checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MASK_SUFFIXES = (".png", ".npy")


class MaskError(ValueError):
    """A mask that cannot be used; the message names the file or sample."""


@dataclass
class MaskSource:
    masks: torch.Tensor  # (N, 1, H, W) uint8 labels
    ids: list  # per mask: index in the split (int) or file name (str)
    description: str
    classes: list | None = None  # per mask from a dataset split: its record's class (None where it has none)


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


def _check(mask: np.ndarray, where: str, num_classes: int, image_size: int, resize: bool) -> torch.Tensor:
    labels = np.unique(mask)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise MaskError(f"{where}: label(s) {outside.tolist()} outside the model's classes 0..{num_classes - 1}")
    t = torch.from_numpy(np.asarray(mask, dtype=np.uint8).reshape(1, 1, *mask.shape[-2:]))
    if t.shape[-2:] != (image_size, image_size):
        if not resize:
            raise MaskError(f"{where}: mask is {tuple(t.shape[-2:])}, the model makes {image_size}x{image_size} "
                            "images; pass --resize to resize masks (nearest neighbour)")
        t = F.interpolate(t.float(), size=(image_size, image_size), mode="nearest").to(torch.uint8)
    return t[0]


def load_masks(path: str | Path, split: str, num_classes: int, image_size: int, resize: bool = False) -> MaskSource:
    """Masks from a label-map folder (``*.png``/``*.npy`` files, sorted by name) or a dataset's ``split``."""
    path = Path(path)
    if not path.exists():
        raise MaskError(f"{path}: no such file or folder")
    entries = list(path.iterdir()) if path.is_dir() else []
    files = sorted(p for p in entries if p.suffix.lower() in MASK_SUFFIXES)
    if path.is_dir() and not any(p.is_dir() for p in entries) and not files:  # nor a dataset folder
        raise MaskError(f"{path}: holds no {'/'.join(MASK_SUFFIXES)} label maps; expected a folder of label maps, "
                        "a dataset folder or a dataset file")
    if files:
        masks = [_check(_read_label_map(f), str(f), num_classes, image_size, resize) for f in files]
        return MaskSource(torch.stack(masks), [f.name for f in files], f"{len(files)} label maps in {path}")
    from utils.data.dataset_io import load_dataset

    data = load_dataset(path)
    if not data.get(split):
        raise MaskError(f"{path}: split '{split}' is missing or empty (has: {', '.join(sorted(data))})")
    masks = [_check(np.asarray(r["mask"]), f"{path}: {split}[{i}]", num_classes, image_size, resize)
             for i, r in enumerate(data[split])]
    return MaskSource(torch.stack(masks), list(range(len(masks))), f"split '{split}' of {path}",
                      [r.get("class") for r in data[split]])
