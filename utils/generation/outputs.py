"""Writing generated images in forms people and tools open: npz, PNGs, a grid, a manifest, a pickle; for volumes
also NIfTI files on the source mask's grid and PNGs of their orthogonal mid-slices."""

from __future__ import annotations

import json
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from utils.data.masks import VolumeGrid
from utils.images import PLANES, display_tiles, grid_image, mask_to_unit, save_png

GRID_COLUMNS = 8
GRID_VOLUMES = 8  # volumes shown in grid.png, one row each


def write_samples(out_dir: Path, images: torch.Tensor, masks: torch.Tensor, ids: list, manifest: dict,
                  num_classes: int, png: bool = False, pkl: bool = False, split: str = "test",
                  classes: torch.Tensor | None = None, grids: list[VolumeGrid] | None = None) -> None:
    """``images`` (N, 1, H, W) or (N, 1, D, H, W) float32 in [0, 1]; ``masks`` like them, uint8; ``ids`` source of
    each mask; ``classes`` (N,) the image class each was made with (class-conditional models); ``grids``
    (volumes) each sample's source mask grid for its NIfTI files (None: the model's grid, identity affine).

    Writes ``samples.npz`` (images, masks, indices, and classes when given), ``grid.png`` (masks over generated images),
    ``manifest.json``, and optionally ``png/NNNNN.png`` and ``samples.pkl`` ({split: [{image, mask, name}]}). Volumes
    always get ``nifti/NNNNN_image.nii.gz`` and ``NNNNN_mask.nii.gz`` (:func:`write_nifti_pair`) and
    ``png/NNNNN.png`` (mask and image mid-slices), and their ``grid.png`` shows one volume per row.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = np.asarray(ids) if all(isinstance(i, int) for i in ids) else np.asarray([str(i) for i in ids])
    extra = {} if classes is None else {"classes": classes.numpy().astype(np.int64)}
    np.savez_compressed(out_dir / "samples.npz", images=images.numpy().astype(np.float32),
                        masks=masks.numpy().astype(np.uint8), indices=indices, **extra)
    if images.ndim == 5:
        _write_volumes(out_dir, images, masks, num_classes, grids or [VolumeGrid()] * len(images))
    else:
        _write_image_pngs(out_dir, images, masks, num_classes, png)
    if pkl:
        records = [{"image": images[i].numpy(), "mask": masks[i].numpy(), "name": str(ids[i]),
                    **({} if classes is None else {"class": int(classes[i])})} for i in range(len(images))]
        with open(out_dir / "samples.pkl", "wb") as f:
            pickle.dump({split: records}, f, protocol=pickle.HIGHEST_PROTOCOL)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _write_image_pngs(out_dir: Path, images: torch.Tensor, masks: torch.Tensor, num_classes: int, png: bool) -> None:
    """grid.png (rows of masks over their images) and, with ``png``, one PNG per image (N, 1, H, W)."""
    k = min(GRID_COLUMNS * 2, len(images))
    rows = []
    for start in range(0, k, GRID_COLUMNS):
        sl = slice(start, min(start + GRID_COLUMNS, k))
        rows += [mask_to_unit(masks[sl], num_classes), images[sl]]
    save_png(grid_image(rows, row_labels=["mask", "generated"] * (len(rows) // 2)), out_dir / "grid.png")
    if png:
        for i, img in enumerate(images):
            save_png(np.rint(img[0].numpy() * 255).astype(np.uint8), out_dir / "png" / f"{i:05d}.png")


MID_SLICE_LABELS = [f"mask {p}" for p in PLANES] + list(PLANES)


def volume_row(image: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One volume's mid-slice tiles (6, 1, S, S): its mask's three planes, then its image's (:data:`PLANES`)."""
    return torch.cat([display_tiles(mask_to_unit(mask[None], num_classes)), display_tiles(image[None])])


def _write_volumes(out_dir: Path, images: torch.Tensor, masks: torch.Tensor, num_classes: int,
                   grids: list[VolumeGrid]) -> None:
    """Per volume a NIfTI pair and a mid-slice PNG; grid.png with the first :data:`GRID_VOLUMES` volumes."""
    rows = [volume_row(images[i], masks[i], num_classes) for i in range(len(images))]
    for i, (row, grid) in enumerate(zip(rows, grids)):
        write_nifti_pair(out_dir / "nifti" / f"{i:05d}", images[i], masks[i], grid)
        save_png(grid_image([row], col_labels=MID_SLICE_LABELS), out_dir / "png" / f"{i:05d}.png")
    save_png(grid_image(rows[:GRID_VOLUMES], col_labels=MID_SLICE_LABELS), out_dir / "grid.png")


def write_nifti_pair(stem: Path, image: torch.Tensor, mask: torch.Tensor, grid: VolumeGrid) -> tuple[Path, Path]:
    """``<stem>_image.nii.gz`` (float32 in [0, 1]) and ``<stem>_mask.nii.gz`` (uint8) with ``grid.affine``.

    ``image`` (1, N, N, N) and ``mask`` (1, N, N, N) are on the model's grid. When the source mask was fitted
    to it (``grid.mask``, on its own grid), the image is taken back onto that grid
    (:func:`utils.data.resample.unfit_image`: trilinear, voxel centres aligned, padding cropped) and written
    with the source mask itself: both files lie on the mask's own grid.
    """
    from utils.data.nifti import write_volume
    from utils.data.resample import unfit_image

    if grid.mask is not None:
        image = unfit_image(image, tuple(grid.mask.shape[1:]), grid.affine).clamp(0.0, 1.0)
    source_mask = mask if grid.mask is None else grid.mask
    paths = (stem.with_name(f"{stem.name}_image.nii.gz"), stem.with_name(f"{stem.name}_mask.nii.gz"))
    write_volume(paths[0], image[0].numpy().astype(np.float32), grid.affine)
    write_volume(paths[1], source_mask[0].numpy(), grid.affine, labels=True)
    return paths


EXPORT_SUFFIXES = (".npz", ".pkl")


def export_paths(path: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """The dataset file and its manifest (``<stem>.manifest.json`` beside it), checked before any work:
    a known suffix, and neither file present unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise ValueError(f"{path}: unknown export format '{path.suffix}' (expected {' or '.join(EXPORT_SUFFIXES)})")
    manifest = path.with_name(f"{path.stem}.manifest.json")
    for p in (path, manifest):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
    return path, manifest


def export_dataset(path: str | Path, images: torch.Tensor, masks: torch.Tensor, sources: list[dict], manifest: dict,
                   split: str = "train", overwrite: bool = False, affines: list | None = None) -> Path:
    """Generated images as a dataset file (:func:`utils.data.dataset_io.save_dataset`, ``.npz`` or the MOTFM
    ``.pkl`` layout by suffix) holding the one split ``split``, and its manifest.

    ``images`` (N, 1, H, W) float in [0, 1] are stored as uint8 (rounded); ``masks`` (N, 1, H, W) uint8 are
    the masks that conditioned them. ``sources[i]`` describes sample i's mask: ``source`` (index in its split
    or file name), and when the mask came from a dataset record its ``class`` and ``patient``; records get
    ``metadata`` ``{"sample": i, "source": ..., "source_patient": ...}`` (``source_patient``, not
    ``patient``: the image is not that patient's) and ``class`` when every source has one. ``affines``
    (volumes): each sample's affine [4, 4] on the model's grid, stored as the records' ``affine``.
    """
    from utils.data.dataset_io import save_dataset, to_uint8

    path, manifest_path = export_paths(path, overwrite)
    with_class = all("class" in s for s in sources)
    records = []
    for i, source in enumerate(sources):
        meta = {"sample": i, "source": str(source["source"])}
        if "patient" in source:
            meta["source_patient"] = str(source["patient"])
        record = {"image": to_uint8(images[i].numpy()), "mask": masks[i].numpy().astype(np.uint8), "metadata": meta}
        if with_class:
            record["class"] = int(source["class"])
        if affines is not None:
            record["affine"] = np.asarray(affines[i], dtype=np.float64)
        records.append(record)
    save_dataset(path, {split: records}, overwrite=overwrite)
    manifest_path.write_text(json.dumps({**manifest, "dataset": str(path), "split": split,
                                         "num_records": len(records)}, indent=2, default=str) + "\n")
    return path


class SamplesError(ValueError):
    """A samples file that cannot be read or evaluated; the message names the file and what was expected."""


def upgrade_manifest(manifest: dict) -> dict:
    """A manifest of an earlier layout in today's names: there ``method`` was the sampler and
    ``generation_method`` the method; now ``sampler`` and ``method``."""
    if "generation_method" not in manifest:
        return manifest
    manifest = dict(manifest)
    manifest["sampler"], manifest["method"] = manifest.get("method"), manifest.pop("generation_method")
    return manifest


SAMPLE_ARRAYS = ("images", "masks", "indices")


def read_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """images (N, 1, H, W) or volumes (N, 1, D, H, W) float in [0, 1], masks of their shape (integer), indices
    (N,) of an inferer.py samples.npz, and the manifest.json beside it (in today's names: :func:`upgrade_manifest`);
    anything else is a :class:`SamplesError` naming the file."""
    images, masks, indices = _read_npz(path)
    expected = "expected an inferer.py samples.npz"
    for ok, problem in (
        (images.ndim in (4, 5) and images.shape[0] >= 1 and images.shape[1] == 1,
         f"images have shape {list(images.shape)}, expected [N, 1, H, W] or [N, 1, D, H, W] with N >= 1"),
        (masks.shape == images.shape, f"masks have shape {list(masks.shape)}, images {list(images.shape)}"),
        (indices.shape == images.shape[:1], f"indices have shape {list(indices.shape)}, expected [{len(images)}]"),
        (images.dtype.kind == "f", f"images are {images.dtype}, expected float"),
        (masks.dtype.kind in "iu", f"masks are {masks.dtype}, expected integer labels"),
    ):
        if not ok:
            raise SamplesError(f"{path}: {problem}; {expected}")
    if not np.isfinite(images).all():
        raise SamplesError(f"{path}: images hold NaN or inf; {expected} (images in [0, 1])")
    if images.min() < 0 or images.max() > 1:
        raise SamplesError(f"{path}: images span [{images.min():.4g}, {images.max():.4g}], expected [0, 1]")
    if indices.dtype.kind not in "iu":
        raise SamplesError(f"{path} was generated from label-map files, which have no paired real "
                         "images; evaluate samples generated from a dataset split")
    manifest_path = path.with_name("manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SamplesError(f"{manifest_path}: not valid JSON ({e}); expected inferer.py's manifest") from None
    return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(indices), upgrade_manifest(manifest)


def _read_npz(path: Path):
    """The images, masks and indices arrays of ``path``, or a SamplesError naming the file."""
    expected = "expected an inferer.py samples.npz"
    if not path.is_file():
        raise SamplesError(f"{path}: no such file; {expected}")
    if not zipfile.is_zipfile(path):  # numpy would read it as a pickle and suggest allow_pickle
        raise SamplesError(f"{path}: cannot read as an .npz archive: no complete zip archive (truncated, or another "
                           f"kind of file); {expected}")
    try:
        z = np.load(path, allow_pickle=False)
        with z:
            missing = sorted(set(SAMPLE_ARRAYS) - set(z.files))
            if missing:
                raise SamplesError(f"{path} lacks {missing}; {expected}")
            return tuple(z[k] for k in SAMPLE_ARRAYS)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, corrupt, a pickle
        raise SamplesError(f"{path}: cannot read as an .npz archive ({type(e).__name__}: {e}); "
                         f"{expected}") from None
