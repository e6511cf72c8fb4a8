"""Reference images for reference-guided generation (``inferer.py --reference``): one image file, a folder of
them, or a split of a dataset file. Images are read with the dataset's one intensity rule (integers / 255,
floats as they are, in [0, 1]) and identified by SHA-256 in the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.masks import MaskError, read_single_channel

IMAGE_SUFFIXES = (".png", ".npy")


@dataclass
class ReferenceSource:
    images: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    ids: list  # per image: index in the split (int) or file name (str)
    description: str
    sha256: dict  # file name -> SHA-256 of each file read


def _read_image(path: Path) -> np.ndarray:
    from utils.data.dataset_io import normalise_image

    arr, mode = read_single_channel(path, ("L", "I", "I;16"), "reference image")
    if mode not in (None, "L"):  # 16-bit PNG: to [0, 1] by its own range
        arr = arr.astype(np.float32) / 65535.0
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise MaskError(f"{path}: expected a 2-D grey image, got shape {arr.shape}")
    image = normalise_image(arr)
    if image.min() < 0 or image.max() > 1:
        raise MaskError(f"{path}: a float reference image must lie in [0, 1], got [{image.min()}, {image.max()}]")
    return image


def _sized(image: np.ndarray, where: str, image_size: int, resize: bool) -> torch.Tensor:
    bad = int((~np.isfinite(image)).sum())
    if bad:
        raise MaskError(f"{where}: {bad} pixel(s) of the reference image are NaN or infinite; expected values in "
                        "[0, 1]")
    t = torch.from_numpy(np.asarray(image, dtype=np.float32)).reshape(1, 1, *image.shape[-2:])
    if t.shape[-2:] != (image_size, image_size):
        if not resize:
            raise MaskError(f"{where}: reference is {tuple(t.shape[-2:])}, the model makes {image_size}x"
                            f"{image_size} images; pass --resize to resize it (bilinear)")
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return t[0]


def load_references(path: str | Path, split: str, image_size: int, resize: bool = False) -> ReferenceSource:
    """Reference images from a PNG/NPY file, a folder of them (sorted by name), or a dataset's ``split``."""
    from utils.files import sha256_file

    path = Path(path)
    if not path.exists():
        raise MaskError(f"{path}: no such reference file or folder")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = []
    if files:
        images = [_sized(_read_image(f), str(f), image_size, resize) for f in files]
        return ReferenceSource(torch.stack(images), [f.name for f in files], f"{len(files)} reference image(s) in "
                               f"{path}", {f.name: sha256_file(f) for f in files})
    if path.is_dir() and not any(p.is_dir() for p in path.iterdir()):
        raise MaskError(f"{path}: holds no {'/'.join(IMAGE_SUFFIXES)} images; expected an image, a folder of "
                        "images, a dataset folder or a dataset file")
    from utils.data.dataset_io import load_dataset, normalise_image

    data = load_dataset(path)
    if not data.get(split):
        raise MaskError(f"{path}: split '{split}' is missing or empty (has: {', '.join(sorted(data))})")
    images = [_sized(normalise_image(np.asarray(r["image"])).squeeze(), f"{path}: {split}[{i}]", image_size, resize)
              for i, r in enumerate(data[split])]
    digest = {path.name: sha256_file(path)} if path.is_file() else {}
    return ReferenceSource(torch.stack(images), list(range(len(images))), f"split '{split}' of {path}", digest)
