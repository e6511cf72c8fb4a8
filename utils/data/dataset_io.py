"""Dataset files: the one in-memory layout, and reading/writing it safely.

A dataset is ``{split: [record, ...]}`` with splits ``train``, ``valid``,
``test``. A record is a dict:

- ``image``: array ``[1, H, W]`` (2-D) or ``[1, D, H, W]`` (3-D), grayscale;
  ``uint8`` in [0, 255] or a float array in [0, 1] (see :func:`normalise_image`);
- ``mask``: integer array of labels, the image's shape (CAMUS: 0 background,
  1 LV cavity, 2 myocardium, 3 LA cavity);
- ``affine`` (optional, 3-D): ``float64 [4, 4]``, voxel index ``(d, h, w)`` ->
  world mm, as nibabel gives it for the volume's voxel axes (see
  :mod:`utils.data.nifti`);
- ``class`` (optional): an int;
- ``metadata`` (optional): a flat dict of str/int/float values, e.g.
  ``patient``, ``view``, ``phase``.

:func:`load_dataset` also reads MOTFM's pickle layout without conversion: an
``image``/``mask`` of shape ``[H, W]`` gets the channel axis added (``[1, H, W]``),
tensors become arrays, a float mask holding integer values becomes ``uint8``
labels, string classes become indices into their sorted set (the name is kept as
``metadata["class_name"]``), and other scalar top-level fields (MOTFM's ``name``)
move into ``metadata``. :func:`validate_dataset` then checks every record.

On disk:

- ``.npz`` (the native format, read with ``allow_pickle=False``): per split,
  ``{split}_images`` ``uint8 [N,1,H,W]``, ``{split}_masks`` ``uint8 [N,1,H,W]``,
  (3-D: ``[N,1,D,H,W]``), ``{split}_meta_{field}`` arrays of length N (strings
  or numbers); ``{split}_class`` when records carry a class; ``{split}_affine``
  ``float64 [N,4,4]`` when they carry an affine.
- ``.pkl`` (the seed's/MOTFM's layout): the dict above pickled; read only
  through a restricted unpickler that admits plain containers, numbers,
  strings, numpy arrays and torch tensors and refuses any other global
  without running it.
"""

from __future__ import annotations

import functools
import io
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np

from utils.data.folder_dataset import load_folder_dataset
from utils.data.layout import SPLITS, DatasetError, as_labels
from utils.files import atomic_path

logger = logging.getLogger(__name__)

# Globals a dataset pickle may name: how numpy arrays and torch tensors pickle.
_SAFE_GLOBALS = {
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"),
    ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "bool"),
    ("builtins", "slice"), ("builtins", "range"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch", "Size"),
    ("torch.storage", "_load_from_bytes"),
}
_NUMPY_DTYPE_MODULES = ("numpy.dtypes", "numpy")
_RECORD_KEYS = ("image", "mask", "affine", "class", "metadata")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as pickle protocols 0-2 use it to store bytes; only text -> latin-1 bytes."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only for latin-1 text, got {encoding!r}")
    return obj.encode("latin-1", errors)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return functools.partial(_torch_storage_from_bytes, path=self._path)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _SAFE_GLOBALS or (
            module in _NUMPY_DTYPE_MODULES and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise DatasetError(
            f"{self._path}: refused to unpickle global '{module}.{name}': dataset pickles may hold "
            "only containers, numbers, strings, numpy arrays and torch tensors"
        )


def _torch_storage_from_bytes(data: bytes, path: Path):
    """A tensor storage pickled by ``pickle.dump(tensor)``: load it with ``weights_only``."""
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        raise DatasetError(
            f"{path}: refused a torch tensor storage that torch.load(weights_only=True) cannot read as "
            "plain tensor data"
        ) from e


def load_pickle_safely(path: Path):
    """Unpickle ``path`` admitting only data (see module docstring)."""
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except DatasetError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise DatasetError(f"{path}: not a readable dataset pickle ({type(e).__name__}: {e})") from e


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _scalar(value):
    """A python str/int/float/bool for a (numpy or torch) scalar, or None when ``value`` is not one."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "detach") or isinstance(value, (np.ndarray, np.generic)):
        value = _to_numpy(value)
        return value.item() if value.ndim == 0 and value.dtype.kind in "biufU" else None
    return None


def load_dataset(path: str | Path) -> dict[str, list[dict]]:
    """Read a dataset file (``.npz``, ``.pkl``/``.pickle``, or an image folder) into the record layout."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_dir():
        return load_folder_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = _load_npz(path)
    elif suffix in (".pkl", ".pickle"):
        data = load_pickle_safely(path)
    else:
        raise DatasetError(f"{path}: unknown dataset format '{suffix}' (expected .npz, .pkl or a folder)")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a dict of splits, got {type(data).__name__}")
    for split, records in data.items():
        if not isinstance(records, (list, tuple)):
            raise DatasetError(
                f"{path}: split '{split}' is a {type(records).__name__}, expected a list of records"
            )
    class_index = _class_index(data)
    if class_index:
        logger.info("%s: string classes indexed as %s", path, class_index)
    return {
        split: [_normalise_record(r, path, split, i, class_index) for i, r in enumerate(records)]
        for split, records in data.items()
    }


def _class_index(data: dict) -> dict[str, int]:
    """MOTFM may store classes as strings: index them by their sorted set over all splits."""
    names = {r["class"] for records in data.values() for r in records
             if isinstance(r, dict) and isinstance(r.get("class"), str)}
    return {name: i for i, name in enumerate(sorted(names))}


def _normalise_record(record, path: Path, split: str, i: int, class_index: dict[str, int]) -> dict:
    """One record in the dataset layout (see the module docstring for what is converted)."""
    where = f"{path}: {split}[{i}]"
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is a {type(record).__name__}, expected a dict")
    for key in ("image", "mask"):
        if key not in record:
            raise DatasetError(f"{where} has no '{key}' (keys: {sorted(record)})")
    image, mask = _to_numpy(record["image"]), _to_numpy(record["mask"])
    out = {"image": image[None] if image.ndim == 2 else image,
           "mask": as_labels(mask[None] if mask.ndim == 2 else mask, where)}
    if record.get("affine") is not None:
        out["affine"] = _affine(record["affine"], where)
    meta = record.get("metadata") or {}
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}.metadata is a {type(meta).__name__}, expected a dict")
    meta = {k: v if _scalar(v) is None else _scalar(v) for k, v in meta.items()}
    cls = record.get("class")
    if isinstance(cls, str):
        meta["class_name"] = cls
        out["class"] = class_index[cls]
    elif cls is not None:
        value = _scalar(cls)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise DatasetError(f"{where}: class {cls!r} is neither an integer nor a string")
        out["class"] = int(value)
    for key, value in record.items():  # MOTFM's "name" and any other scalar field
        if key not in _RECORD_KEYS and _scalar(value) is not None:
            meta.setdefault(key, _scalar(value))
    out["metadata"] = meta
    return out


def _affine(value, where: str) -> np.ndarray:
    """A record's ``affine`` as a finite ``float64 [4, 4]`` array whose voxel axes have a length (a zero voxel
    size would divide by zero when the volume is fitted, far from the record)."""
    affine = _to_numpy(value)
    if affine.shape != (4, 4) or affine.dtype.kind not in "iuf" or not np.all(np.isfinite(affine)):
        raise DatasetError(f"{where}: affine has shape {list(affine.shape)} and dtype {affine.dtype}, expected "
                           "finite numbers [4, 4] (voxel index -> world mm)")
    affine = affine.astype(np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DatasetError(f"{where}: affine is singular (voxel sizes {np.linalg.norm(affine[:3, :3], axis=0).tolist()}"
                           f" mm); every voxel axis needs a non-zero size and its own direction")
    return affine


def _load_npz(path: Path) -> dict[str, list[dict]]:
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: not a readable .npz file: no complete zip archive (numpy.savez writes one), "
                           "so it is truncated or another kind of file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    with z:
        keys = set(z.files)
        splits = sorted({k[: -len("_images")] for k in keys if k.endswith("_images")},
                        key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
        data = {}
        for split in splits:
            if f"{split}_masks" not in keys:
                raise DatasetError(f"{path}: has '{split}_images' but no '{split}_masks'")
            images, masks = z[f"{split}_images"], z[f"{split}_masks"]
            if len(images) != len(masks):
                raise DatasetError(
                    f"{path}: {split} has {len(images)} images but {len(masks)} masks"
                )
            prefix = f"{split}_meta_"
            meta = {k[len(prefix):]: z[k] for k in keys if k.startswith(prefix)}
            classes = z[f"{split}_class"] if f"{split}_class" in keys else None
            affines = z[f"{split}_affine"] if f"{split}_affine" in keys else None
            records = []
            for i in range(len(images)):
                rec = {
                    "image": images[i],
                    "mask": masks[i],
                    "metadata": {f: v[i].item() for f, v in meta.items()},
                }
                if classes is not None:
                    rec["class"] = int(classes[i])
                if affines is not None:
                    rec["affine"] = _affine(affines[i], f"{path}: {split}[{i}]")
                records.append(rec)
            data[split] = records
    return data


def save_dataset(path: str | Path, data: dict[str, list[dict]], overwrite: bool = False) -> Path:
    """Write ``data`` (record layout) to ``.npz`` or ``.pkl`` by the suffix of ``path``.

    Images are stored as uint8 (float images in [0, 1] are rounded), masks as uint8, 2-D or 3-D alike.
    Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = {}
        for split, records in data.items():
            if not records:  # an npz split has no shape to store without a record
                raise DatasetError(f"{path}: split '{split}' is empty; a .npz dataset needs records in every split")
            arrays[f"{split}_images"] = np.stack([to_uint8(r["image"]) for r in records])
            arrays[f"{split}_masks"] = np.stack([np.asarray(r["mask"]).astype(np.uint8) for r in records])
            fields = sorted({f for r in records for f in (r.get("metadata") or {})})
            for f in fields:
                arrays[f"{split}_meta_{f}"] = np.asarray([r["metadata"].get(f, "") for r in records])
            if records and all("class" in r for r in records):
                arrays[f"{split}_class"] = np.asarray([r["class"] for r in records], dtype=np.int64)
            with_affine = sum(r.get("affine") is not None for r in records)
            if with_affine == len(records):
                arrays[f"{split}_affine"] = np.stack([np.asarray(r["affine"], np.float64) for r in records])
            elif with_affine:
                raise DatasetError(f"{path}: {with_affine} of {len(records)} '{split}' records have an affine; "
                                   "a .npz split stores an affine for every record or for none")
        with atomic_path(path, ".tmp.npz") as tmp:
            np.savez_compressed(tmp, **arrays)
    elif suffix in (".pkl", ".pickle"):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        raise DatasetError(f"{path}: unknown dataset format '{suffix}' (expected .npz or .pkl)")
    return path


def to_uint8(image) -> np.ndarray:
    """An image in the dataset convention as uint8 [0, 255]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(normalise_image(image) * 255.0), 0, 255).astype(np.uint8)


def normalise_image(image) -> np.ndarray:
    """The one intensity rule, as float32 in [0, 1]: integer images / 255, float images as they are.

    So a dataset stores either integer images in [0, 255] (normally ``uint8``) or float images
    already in [0, 1]; :func:`validate_dataset` refuses anything else (a float image in [0, 255]
    is an error naming the record, not something guessed per image). The model sees
    ``2 * normalise_image(image) - 1`` in [-1, 1]; generated images are mapped back with the
    inverse. Nothing is rescaled per split or per image.
    """
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


def validate_dataset(
    data: dict[str, list[dict]],
    path: str | Path,
    num_classes: int = 4,
    image_size: int | tuple[int, ...] | None = None,
    splits: tuple[str, ...] = SPLITS,
    spatial_dims: int | None = None,
) -> None:
    """Check a dataset in the record layout; raise :class:`DatasetError` at the first problem.

    Every split in ``splits`` must be present and non-empty; every record of every split must
    have ``image`` and ``mask`` of one shape ``[1, H, W]`` or ``[1, D, H, W]`` (one shape per
    split; ``spatial_dims`` spatial axes when given; equal to ``image_size`` when given, an int
    meaning a square or a cube), an ``affine`` (if any) of finite numbers ``[4, 4]``,
    finite image values in the range of :func:`normalise_image`
    (integers in [0, 255], floats in [0, 1]), integer mask labels in ``[0, num_classes)``, an
    int ``class`` when present and a dict ``metadata``; a ``metadata["patient"]`` may appear in
    one split only. Messages name ``path``, the split, the record index and its ``metadata["name"]``
    (a folder dataset's file name) when it has one.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a dict of splits, got {type(data).__name__}")
    for split in splits:
        if split not in data:
            raise DatasetError(f"{path}: missing split '{split}' (has: {sorted(data)})")
        if len(data[split]) == 0:
            raise DatasetError(f"{path}: split '{split}' is empty")
    patient_splits: dict[str, set[str]] = {}
    for split, records in data.items():
        shape = None
        for i, record in enumerate(records):
            where = f"{path}: {split}[{i}]{_named(record)}"
            shape = _check_record(record, where, num_classes, shape, image_size, spatial_dims)
            patient = (record.get("metadata") or {}).get("patient")
            if patient is not None:
                patient_splits.setdefault(str(patient), set()).add(split)
    shared = {p: s for p, s in patient_splits.items() if len(s) > 1}
    if shared:
        patient, in_splits = min(shared.items())
        raise DatasetError(
            f"{path}: patient '{patient}' appears in splits {sorted(in_splits)} ({len(shared)} patients "
            "are shared between splits); split by patient so no patient is in two splits"
        )


def _named(record) -> str:
    """`` (NAME)`` for a record whose metadata has a ``name`` (a folder dataset's file stem), else ``""``."""
    meta = record.get("metadata") if isinstance(record, dict) else None
    return f" ({meta['name']})" if isinstance(meta, dict) and "name" in meta else ""


def _check_record(record, where: str, num_classes: int, shape, image_size, spatial_dims) -> tuple[int, ...]:
    """Check one record (see :func:`validate_dataset`); returns the image shape."""
    if not isinstance(record, dict) or "image" not in record or "mask" not in record:
        raise DatasetError(f"{where}: expected a dict with 'image' and 'mask'")
    image, mask = _to_numpy(record["image"]), _to_numpy(record["mask"])
    _check_shape(image, mask, where, shape, image_size, spatial_dims)
    if record.get("affine") is not None:
        _affine(record["affine"], where)
    if image.dtype.kind == "f":
        if not np.all(np.isfinite(image)):
            raise DatasetError(f"{where}: image holds NaN or inf values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(
                f"{where}: float image values span [{lo:g}, {hi:g}], outside [0, 1]; float images must "
                "already be in [0, 1] (the one intensity rule): store images as uint8 in [0, 255], or "
                "divide float images by 255 (or by the dataset's fixed maximum) before saving"
            )
    elif image.dtype.kind in "ui":
        if image.min() < 0 or image.max() > 255:
            raise DatasetError(f"{where}: integer image values span [{image.min()}, {image.max()}], "
                               "outside [0, 255]; convert the images to uint8")
    else:
        raise DatasetError(f"{where}: image dtype {image.dtype} is neither integer nor float")
    if mask.dtype.kind not in "uib":
        raise DatasetError(f"{where}: mask dtype {mask.dtype}, expected integer labels")
    if mask.min() < 0 or mask.max() >= num_classes:
        labels = np.unique(mask)
        outside = labels[(labels < 0) | (labels >= num_classes)]
        raise DatasetError(f"{where}: mask labels {outside.tolist()} outside 0..{num_classes - 1} "
                           f"(num_classes={num_classes})")
    if "class" in record and not isinstance(record["class"], (int, np.integer)):
        raise DatasetError(f"{where}: class {record['class']!r} is not an int")
    if not isinstance(record.get("metadata", {}), dict):
        raise DatasetError(f"{where}: metadata is a {type(record['metadata']).__name__}, expected a dict")
    return image.shape


def _check_shape(image: np.ndarray, mask: np.ndarray, where: str, shape, image_size, spatial_dims) -> None:
    """Image and mask ``[1, *spatial]`` alike, as earlier records, ``spatial_dims`` and ``image_size`` ask."""
    if image.ndim not in (3, 4) or image.shape[0] != 1:
        raise DatasetError(f"{where}: image has shape {list(image.shape)}, expected [1, H, W] or [1, D, H, W]")
    dims = image.ndim - 1
    if spatial_dims is not None and dims != spatial_dims:
        expected = ([1, *(image_size,) * spatial_dims] if isinstance(image_size, int)
                    else "[1, H, W]" if spatial_dims == 2 else "[1, D, H, W]")
        raise DatasetError(f"{where}: image has shape {list(image.shape)} ({dims}-D), but the model is "
                           f"{spatial_dims}-D (model_args.spatial_dims) and expects {expected}")
    if mask.shape != image.shape:
        raise DatasetError(f"{where}: mask has shape {list(mask.shape)} but image has {list(image.shape)}")
    if shape is not None and image.shape != shape:
        raise DatasetError(f"{where}: image has shape {list(image.shape)}, earlier records {list(shape)}")
    if image_size is not None:
        expected = (image_size,) * dims if isinstance(image_size, int) else tuple(image_size)
        if image.shape[1:] != expected:
            raise DatasetError(f"{where}: image is {'x'.join(map(str, image.shape[1:]))}, expected "
                               f"{'x'.join(map(str, expected))}")
