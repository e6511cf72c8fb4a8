"""Convert a downloaded CAMUS release into the dataset file COMET trains on.

Example::

    python -m utils.data.camus --root ~/data/CAMUS_public --output data/camus_dataset.pkl

Releases read (``--root`` may be the release folder or its patients folder):

- public NIfTI release: ``database_nifti/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}.nii.gz``,
  the label maps ``..._{ED,ES}_gt.nii.gz``, ``Info_{2CH,4CH}.cfg``, and optionally
  ``database_split/subgroup_{training,validation,testing}.txt`` (one ``patientXXXX``
  per line) giving the official split;
- 2019 challenge release: ``training/patientXXXX/patientXXXX_{2CH,4CH}_{ED,ES}[_gt].mhd``
  (+ ``.raw``) and ``Info_{2CH,4CH}.cfg``. Its ``testing/`` folder has no label
  maps and is not read.

Every patient gives 4 records (2 views x 2 phases), each
``{"image": uint8 [1,S,S], "mask": uint8 [1,S,S], "class": int, "metadata": {...}}`` with labels
0 background, 1 LV cavity, 2 myocardium, 3 LA cavity, class view x phase (0 2CH_ED, 1 2CH_ES,
2 4CH_ED, 3 4CH_ES; for class-conditional models) and metadata ``patient``,
``view``, ``phase``, ``class_name``, ``image_quality`` (from ``Info_*.cfg``; ``"unknown"`` when the
file has no ``ImageQuality``), ``orig_rows``, ``orig_cols``, ``spacing_row_mm``,
``spacing_col_mm`` (size and pixel spacing before resizing).

Orientation rule: arrays are ``[rows, cols]`` with row 0 at the top of the
displayed image, where the probe and the sector apex are. nibabel returns a
CAMUS NIfTI 2D image as ``[x, y]`` = ``[cols, rows]``, so it is transposed;
SimpleITK's ``GetArrayFromImage`` already returns ``[rows, cols]``. Each label
map is then checked: the LA cavity (3) must lie below the LV cavity (1), i.e.
the centroid step from LV to LA points down, within 60 degrees of straight
down; otherwise the file is reported as wrongly oriented (nothing is flipped
silently).

Resizing: images with PIL's bilinear filter (its support widens with the
reduction factor, so downsampling is antialiased), masks with nearest neighbour,
straight to ``S x S`` (the aspect ratio is not kept; the original size is in
the metadata).

Split, always by patient: the official ``database_split`` files when present;
otherwise a seeded shuffle of all patient folders into 350/50/50 of 450
(valid and test get ``round(n * 50 / 450)`` patients each, at least 1; train the
rest), drawn before any patient is skipped, so a skipped patient does not move
the others. A missing or unreadable file stops the conversion with an error
naming it; with ``--skip_bad`` that patient is left out and listed at the end.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np

from utils.data.dataset_io import SPLITS, DatasetError
from utils.data.layout import view_phase_class

logger = logging.getLogger(__name__)

VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")
LABELS = (0, 1, 2, 3)
EXTENSIONS = (".nii.gz", ".nii", ".mhd")
SPLIT_FILES = {"train": "subgroup_training.txt", "valid": "subgroup_validation.txt",
               "test": "subgroup_testing.txt"}
MAX_TILT_DEGREES = 60.0
_PATIENT = re.compile(r"patient\d+")


class CamusFileError(DatasetError):
    """A missing or unusable file of one patient (``--skip_bad`` skips the patient)."""


def find_patients(root: Path) -> tuple[Path, list[str], Path | None]:
    """``(patients folder, sorted patient ids, database_split folder or None)`` of the release at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    for folder in (root / "database_nifti", root / "training", root):
        patients = sorted(p.name for p in folder.glob("patient*")
                          if p.is_dir() and _PATIENT.fullmatch(p.name))
        if patients:
            break
    else:
        raise DatasetError(
            f"{root}: no patientXXXX folders in it, in {root / 'database_nifti'} or in {root / 'training'}; "
            "pass --root the CAMUS release folder"
        )
    split_dirs = (root / "database_split", root.parent / "database_split")
    split_dir = next((d for d in split_dirs if d.is_dir()), None)
    return folder, patients, split_dir


def split_counts(n: int) -> tuple[int, int, int]:
    """Patients per (train, valid, test) for ``n`` patients: 350/50/50 of 450, scaled, none empty."""
    if n < 3:
        raise DatasetError(f"{n} patient(s) found; a train/valid/test split needs at least 3")
    held_out = max(1, round(n * 50 / 450))
    return n - 2 * held_out, held_out, held_out


def seeded_split(patients: list[str], seed: int) -> dict[str, str]:
    """``{patient: split}``: a permutation of the sorted ids by ``numpy.random.default_rng(seed)``."""
    n_train, n_valid, _ = split_counts(len(patients))
    order = np.random.default_rng(seed).permutation(len(patients))
    ids = [sorted(patients)[i] for i in order]
    return {p: "train" if k < n_train else "valid" if k < n_train + n_valid else "test"
            for k, p in enumerate(ids)}


def official_split(split_dir: Path, patients: list[str]) -> dict[str, str]:
    """``{patient: split}`` from the ``database_split`` files; every patient folder must be listed once."""
    split_of: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = split_dir / name
        if not path.is_file():
            raise DatasetError(f"{path}: missing; the official split needs {', '.join(SPLIT_FILES.values())}")
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            patient = line.strip()
            if not patient:
                continue
            if not _PATIENT.fullmatch(patient):
                raise DatasetError(f"{path}:{line_no}: '{patient}' is not a patientXXXX id")
            if patient in split_of:
                raise DatasetError(f"{path}:{line_no}: {patient} is already in the {split_of[patient]} split")
            split_of[patient] = split
    unlisted = sorted(set(patients) - set(split_of))
    if unlisted:
        raise DatasetError(
            f"{split_dir}: {len(unlisted)} patient folder(s) are in no split file, e.g. {unlisted[0]}"
        )
    return split_of


def parse_info(path: Path) -> dict[str, str]:
    """The ``key: value`` lines of a CAMUS ``Info_*.cfg`` file."""
    info = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise CamusFileError(f"{path}:{line_no}: expected 'key: value', got {line!r}")
        info[key.strip()] = value.strip()
    return info


def read_image(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """``(array [rows, cols] with the apex at row 0, (row spacing, col spacing))`` of a CAMUS 2D file."""
    try:
        if path.name.endswith(".mhd"):
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            array = np.squeeze(sitk.GetArrayFromImage(image))  # [rows, cols]
            spacing = image.GetSpacing()  # (x = col, y = row, ...)
        else:
            import nibabel as nib

            image = nib.load(str(path))
            array = np.squeeze(np.asanyarray(image.dataobj)).T  # nibabel gives [x = col, y = row]
            spacing = image.header.get_zooms()
    except Exception as e:  # nibabel, gzip, zlib and ITK raise many types for a damaged file
        raise CamusFileError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if array.ndim != 2:
        raise CamusFileError(f"{path}: expected a 2D image, got shape {list(array.shape)}")
    return array, (float(spacing[1]), float(spacing[0]))


def check_orientation(mask: np.ndarray, path: Path) -> None:
    """Raise unless the LA cavity (3) lies below the LV cavity (1) in ``mask [rows, cols]`` (apex on top)."""
    centroids = []
    for label in (1, 3):
        rows, cols = np.nonzero(mask == label)
        if rows.size == 0:
            raise CamusFileError(f"{path}: label {label} is absent, cannot check the orientation")
        centroids.append((rows.mean(), cols.mean()))
    d_row, d_col = centroids[1][0] - centroids[0][0], centroids[1][1] - centroids[0][1]
    if d_row <= 0 or abs(d_col) > d_row * np.tan(np.radians(MAX_TILT_DEGREES)):
        raise CamusFileError(
            f"{path}: wrong orientation: from the LV centroid to the LA centroid is {d_row:+.0f} rows, "
            f"{d_col:+.0f} cols; expected the LA below the LV (sector apex at the top)"
        )


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W]`` -> ``uint8 [size, size]`` with PIL's (antialiased) bilinear filter."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``uint8 [H, W]`` labels -> ``uint8 [size, size]`` by nearest neighbour (no new labels)."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))


def _find(folder: Path, stem: str, hint: str) -> Path:
    for ext in EXTENSIONS:
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    raise CamusFileError(f"{folder / (stem + hint)}: missing")


def read_patient(folder: Path, size: int) -> list[dict]:
    """The 4 records (2CH/4CH x ED/ES) of one patient folder; :class:`CamusFileError` names a bad file."""
    patient = folder.name
    if not folder.is_dir():
        raise CamusFileError(f"{folder}: missing patient folder")
    present = [ext for ext in EXTENSIONS if any(folder.glob(f"{patient}_*{ext}"))]
    hint = present[0] if present else ".nii.gz"
    records = []
    for view in VIEWS:
        info_path = folder / f"Info_{view}.cfg"
        if not info_path.is_file():
            raise CamusFileError(f"{info_path}: missing")
        info = parse_info(info_path)
        for phase in PHASES:
            image_path = _find(folder, f"{patient}_{view}_{phase}", hint)
            mask_path = _find(folder, f"{patient}_{view}_{phase}_gt", hint)
            image, spacing = read_image(image_path)
            mask, _ = read_image(mask_path)
            if mask.shape != image.shape:
                raise CamusFileError(f"{mask_path}: shape {list(mask.shape)} differs from its image "
                                     f"{image_path.name} {list(image.shape)}")
            mask = _as_labels(mask, mask_path)
            check_orientation(mask, mask_path)
            records.append({
                "image": resize_image(_as_uint8(image, image_path), size)[None],
                "mask": resize_mask(mask, size)[None],
                "class": view_phase_class(view, phase),
                "metadata": {
                    "patient": patient, "view": view, "phase": phase, "class_name": f"{view}_{phase}",
                    "image_quality": info.get("ImageQuality", "unknown"),
                    "orig_rows": int(image.shape[0]), "orig_cols": int(image.shape[1]),
                    "spacing_row_mm": spacing[0], "spacing_col_mm": spacing[1],
                },
            })
    return records


def _as_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    """CAMUS intensities are 0..255; anything else is reported, never rescaled."""
    if image.dtype == np.uint8:
        return image
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
        raise CamusFileError(f"{path}: intensities span [{image.min()}, {image.max()}], expected 0..255")
    return np.rint(image).astype(np.uint8)


def _as_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    labels = np.unique(mask)
    if not set(labels.tolist()) <= set(LABELS):
        raise CamusFileError(f"{path}: labels {labels.tolist()}, expected a subset of {list(LABELS)}")
    return mask.astype(np.uint8)


def convert_camus(
    root: str | Path, size: int = 256, seed: int = 0, skip_bad: bool = False
) -> tuple[dict[str, list[dict]], list[str]]:
    """Read a CAMUS release into ``({split: [record, ...]}, [skipped patient error, ...])``.

    Raises :class:`CamusFileError` for the first bad patient unless ``skip_bad``.
    """
    from tqdm import tqdm

    folder, patients, split_dir = find_patients(Path(root))
    if split_dir is not None:
        split_of = official_split(split_dir, patients)
        logger.info("official split from %s", split_dir)
    else:
        split_of = seeded_split(patients, seed)
        logger.info("no database_split folder: seeded split (seed %d) of %d patients", seed, len(patients))
    data: dict[str, list[dict]] = {split: [] for split in SPLITS}
    skipped: list[str] = []
    for patient in tqdm(sorted(split_of), desc="CAMUS patients", unit="patient"):
        try:
            records = read_patient(folder / patient, size)
        except CamusFileError as e:
            if not skip_bad:
                raise
            logger.warning("skipping %s: %s", patient, e)
            skipped.append(f"{patient}: {e}")
            continue
        data[split_of[patient]].extend(records)
    for split, records in data.items():
        if not records:
            raise DatasetError(f"{root}: no readable patient left in the {split} split")
    return data, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.data.camus",
        description="Convert a CAMUS release (NIfTI or 2019 MetaImage) into a COMET dataset file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m utils.data.camus --root ~/data/CAMUS_public --output data/camus_dataset.pkl",
    )
    parser.add_argument("--root", required=True, type=Path,
                        help="CAMUS release folder (or its patients folder)")
    parser.add_argument("--output", required=True, type=Path, help="dataset file to write (.pkl or .npz)")
    parser.add_argument("--size", type=int, default=256, help="output height and width (default 256)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the patient split when the release has no database_split files")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip a patient with a missing or corrupt file (listed at the end), not stop")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.cli import configure_logging

    configure_logging(timestamps=False)
    from utils.data.dataset_info import format_summary
    from utils.data.dataset_io import save_dataset

    if args.size < 1:
        logger.error("--size must be positive, got %d", args.size)
        return 2
    if args.output.exists() and not args.overwrite:
        logger.error("%s exists; pass --overwrite to replace it", args.output)
        return 1
    try:
        data, skipped = convert_camus(args.root, size=args.size, seed=args.seed, skip_bad=args.skip_bad)
    except CamusFileError as e:
        logger.error("%s (pass --skip_bad to leave this patient out and go on)", e)
        return 1
    except DatasetError as e:
        logger.error("%s", e)
        return 1
    save_dataset(args.output, data, overwrite=args.overwrite)
    print(format_summary(data, args.output))
    if skipped:
        print(f"skipped {len(skipped)} patient(s):")
        print("\n".join(f"  {line}" for line in skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
