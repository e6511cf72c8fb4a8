"""Training data: a dataset file turned into tensors, and the Lightning DataModule."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.config import DataConfig
from utils.data.dataset_io import DatasetError, load_dataset, normalise_image, validate_dataset
from utils.data.resample import fit_dataset
from utils.distributed import wait_for

log = logging.getLogger(__name__)


def scaled_label_values(num_classes: int) -> torch.Tensor:
    """enc(label) = label / (num_classes - 1) * 2 - 1, in [-1, 1]."""
    return torch.linspace(-1.0, 1.0, num_classes)


def missing_dataset_message(path: Path) -> str:
    return (
        f"dataset file {path} does not exist. Make it with one of:\n"
        f"  python -m utils.data.synthetic_echo --output {path}            (the built-in synthetic echo set)\n"
        f"  python -m utils.data.synthetic_echo --dims 3 --output {path}   (the synthetic 3-D brain set)\n"
        f"  python -m utils.data.camus --root CAMUS_DIR --output {path}    (from a CAMUS download)\n"
        "or point data_args.path at an existing .npz/.pkl file or image folder (--set data_args.path=...)."
    )


def load_training_data(cfg: DataConfig, rank: int = 0, timeout: float = 3600.0,
                       spatial_dims: int = 2) -> dict[str, list[dict]]:
    """Load (building the synthetic set first when configured and missing) and validate the dataset.

    Only rank 0 builds the synthetic set; other ranks wait for the file (written atomically).
    ``spatial_dims`` (``model_args.spatial_dims``): 2 wants images ``[1, H, W]`` of exactly
    ``image_size``; 3 wants volumes ``[1, D, H, W]``, and fits each to ``image_size^3`` by the rule of
    :mod:`utils.data.resample` (pad to a physical cube, then resize). A dataset of the other
    dimensionality is an error naming the file and both shapes.
    """
    path = Path(cfg.path)
    if not path.exists():
        if cfg.synthetic is None:
            raise FileNotFoundError(missing_dataset_message(path))
        if rank != 0:
            wait_for(path.exists, f"build the synthetic dataset {path}", timeout)
        else:
            from utils.data.synthetic_echo import ensure_synthetic_dataset

            ensure_synthetic_dataset(path, cfg.synthetic.size, tuple(cfg.synthetic.patients), cfg.synthetic.seed,
                                     dims=spatial_dims)
    data = load_dataset(path)
    if spatial_dims == 3:
        data = _fit_volumes(data, path, cfg.image_size)
    validate_dataset(data, path, num_classes=cfg.num_classes, image_size=cfg.image_size,
                     spatial_dims=spatial_dims)
    return data


def _fit_volumes(data: dict[str, list[dict]], path: Path, size: int) -> dict[str, list[dict]]:
    """Every split's volumes fitted to ``size^3`` (:func:`utils.data.resample.fit_dataset`), logged."""
    out, changed = fit_dataset(data, size)
    for split, n in changed.items():
        if n:
            log.info("%s: %d of %d '%s' volumes padded to a cube and resized to %d^3 (utils.data.resample)",
                     path, n, len(data[split]), split, size)
    return out


class SegmentedImages(Dataset):
    """One split as tensors: ``x_1`` float32 (N, 1, H, W) in [-1, 1], ``mask`` uint8 (N, 1, H, W) (volumes:
    (N, 1, D, H, W) both),
    ``patient`` int64 (N,) (a code per patient id, -1 when unknown), ``classes`` int64 (N,) (the record's
    ``class``, -1 when it has none)."""

    def __init__(self, records: list[dict], patient_codes: dict[str, int]):
        self.x_1 = torch.from_numpy(np.stack([normalise_image(r["image"]) for r in records]) * 2.0 - 1.0)
        self.mask = torch.from_numpy(np.stack([np.asarray(r["mask"]).astype(np.uint8) for r in records]))
        patients = [str(r.get("metadata", {}).get("patient", "")) for r in records]
        self.patient = torch.tensor([patient_codes.get(p, -1) if p else -1 for p in patients])
        self.classes = torch.tensor([int(r.get("class", -1)) for r in records], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.x_1)

    def __getitem__(self, i: int) -> dict:
        return {"x_1": self.x_1[i], "mask": self.mask[i], "patient": self.patient[i], "class": self.classes[i],
                "index": i}


def mean_label_intensity(x_1: torch.Tensor, mask: torch.Tensor, num_classes: int) -> list[float]:
    """Each label's mean image value in [-1, 1] (labels absent from the data get label/(C-1)*2-1)."""
    values = scaled_label_values(num_classes)
    for label in range(num_classes):
        sel = mask == label
        if sel.any():
            values[label] = x_1[sel].mean()
    return [round(float(v), 6) for v in values]


def class_names(data: dict[str, list[dict]], path) -> list[str]:
    """See :meth:`EchoDataModule.class_names`; ``path`` names the dataset in errors."""
    names: dict[int, str] = {}
    for split, records in data.items():
        for i, r in enumerate(records):
            if "class" not in r:
                if split in ("train", "valid"):
                    raise DatasetError(f"{path}: {split}[{i}] has no class; a class-conditional model "
                                       "(conditioning_args.mode class or mask+class) needs one in every train and "
                                       "valid record (the synthetic echo set has one since view x phase was "
                                       "added: rebuild an older file with python -m utils.data.synthetic_echo)")
                continue
            k, name = int(r["class"]), (r.get("metadata") or {}).get("class_name")
            if name is not None and names.setdefault(k, str(name)) != str(name):
                raise DatasetError(f"{path}: {split}[{i}]: class {k} is named {name!r} here and {names[k]!r} "
                                   "elsewhere")
    found = sorted({int(r["class"]) for records in data.values() for r in records if "class" in r})
    if found[0] < 0:
        raise DatasetError(f"{path}: class {found[0]} is negative; classes are indices 0..K-1")
    top = found[-1]
    missing = sorted(set(range(top + 1)) - set(found))
    if missing:
        log.warning("%s: classes %s (%d of %d) have no record, yet the model gets one class per index 0..%d "
                    "(found %s); renumber the classes 0..K-1 if that is not meant", path, _ranges(missing),
                    len(missing), top + 1, top, _ranges(found))
    return [names.get(k, str(k)) for k in range(top + 1)]


def _ranges(values: list[int]) -> str:
    """Sorted integers as runs: [0, 1, 2, 5, 7, 8] -> '0..2, 5, 7..8'."""
    runs = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)


class EchoDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, spatial_dims: int = 2):
        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.data = load_training_data(cfg, rank, spatial_dims=spatial_dims)
        for split in ("train", "valid"):
            if not self.data.get(split):
                raise DatasetError(f"{cfg.path}: the '{split}' split is missing or empty; training needs it")
        ids = sorted({str(r.get("metadata", {}).get("patient", "")) for s in self.data.values() for r in s} - {""})
        codes = {p: i for i, p in enumerate(ids)}
        self.train_set = SegmentedImages(self.data["train"], codes)
        self.val_set = SegmentedImages(self.data["valid"], codes)
        log.info("dataset %s: %d train, %d valid images of %s", cfg.path, len(self.train_set),
                 len(self.val_set), "x".join(map(str, self.train_set.x_1.shape[2:])))

    def label_values(self, encoding: str) -> list[float]:
        """enc(label) per label for the prior's ``mask_encoding`` (see utils.config.PriorConfig)."""
        if encoding == "mean_intensity":
            return mean_label_intensity(self.train_set.x_1, self.train_set.mask, self.cfg.num_classes)
        values = scaled_label_values(self.cfg.num_classes)
        if encoding == "unit_labels":
            values = (values + 1.0) / 2.0
        return [round(float(v), 6) for v in values]

    def voxel_spacings(self) -> list[tuple[float, ...]]:
        """The voxel spacing (mm per array axis) of every train record with an ``affine``, on the training grid
        (after fitting, so a resampled volume's voxels are isotropic up to rounding)."""
        from utils.data.nifti import voxel_spacing

        return [tuple(float(v) for v in voxel_spacing(r["affine"])) for r in self.data["train"]
                if r.get("affine") is not None]

    def class_names(self) -> list[str]:
        """The image classes, in index order, for a class-conditional model: every train and valid record needs
        a ``class``; class k is named by its records' ``metadata.class_name`` (one name per class), else "k"."""
        return class_names(self.data, self.cfg.path)

    def train_dataloader(self) -> DataLoader:
        # The order of epoch e is a permutation seeded by (seed, e) on one process or many (the Trainer calls
        # set_epoch), each rank taking its share: a resumed run does not replay epoch 0's order.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0,
                          drop_last=len(self.train_set) >= 2 * self.batch_size * world)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0)
