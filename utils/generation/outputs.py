"""Writing generated images in forms people and tools open: npz, PNGs, a grid, a manifest, a pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

from utils.images import grid_image, mask_to_unit, save_png

GRID_COLUMNS = 8


def write_samples(out_dir: Path, images: torch.Tensor, masks: torch.Tensor, ids: list, manifest: dict,
                  num_classes: int, png: bool = False, pkl: bool = False, split: str = "test") -> None:
    """``images`` (N, 1, H, W) float32 in [0, 1]; ``masks`` (N, 1, H, W) uint8; ``ids`` source of each mask.

    Writes ``samples.npz`` (images, masks, indices), ``grid.png`` (masks over generated images),
    ``manifest.json``, and optionally ``png/NNNNN.png`` and ``samples.pkl`` ({split: [{image, mask, name}]}).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = np.asarray(ids) if all(isinstance(i, int) for i in ids) else np.asarray([str(i) for i in ids])
    np.savez_compressed(out_dir / "samples.npz", images=images.numpy().astype(np.float32),
                        masks=masks.numpy().astype(np.uint8), indices=indices)
    k = min(GRID_COLUMNS * 2, len(images))
    rows = []
    for start in range(0, k, GRID_COLUMNS):
        sl = slice(start, min(start + GRID_COLUMNS, k))
        rows += [mask_to_unit(masks[sl], num_classes), images[sl]]
    save_png(grid_image(rows, row_labels=["mask", "generated"] * (len(rows) // 2)), out_dir / "grid.png")
    if png:
        for i, img in enumerate(images):
            save_png(np.rint(img[0].numpy() * 255).astype(np.uint8), out_dir / "png" / f"{i:05d}.png")
    if pkl:
        records = [{"image": images[i].numpy(), "mask": masks[i].numpy(), "name": str(ids[i])}
                   for i in range(len(images))]
        with open(out_dir / "samples.pkl", "wb") as f:
            pickle.dump({split: records}, f, protocol=pickle.HIGHEST_PROTOCOL)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
