"""Print what a dataset file holds and validate it.

Example::

    python -m utils.data.dataset_info data/camus_dataset.pkl --image_size 256

Prints per split: records, patients, image shapes and dtypes, the intensity
range after the one intensity rule (``normalise_image``), the label histogram
(pixel fractions), classes, metadata fields and the values of the categorical
ones, and which patients (if any) are shared between splits. Then runs
``utils.data.dataset_io.validate_dataset``; the exit status is 0 when the dataset is
valid and 1 (with the error) when it is unreadable or invalid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_MAX_CATEGORIES = 12  # metadata fields with at most this many distinct strings get value counts


def format_summary(data: dict[str, list[dict]], path: str | Path) -> str:
    """A human-readable summary of ``data`` (record layout); tolerates invalid records."""
    from utils.data.dataset_io import normalise_image

    lines = [f"{path}: splits {list(data)}"]
    patients: dict[str, set] = {}
    for split, records in data.items():
        shapes = Counter(str(list(np.shape(r.get("image")))) for r in records)
        dtypes = Counter(str(np.asarray(r.get("image")).dtype) for r in records)
        patients[split] = {r["metadata"]["patient"] for r in records
                           if "patient" in (r.get("metadata") or {})}
        lines.append(f"{split}: {len(records)} records, {len(patients[split])} patients, image shapes "
                     f"{dict(shapes)}, dtypes {dict(dtypes)}")
        if not records:
            continue
        lo, hi, total, count = np.inf, -np.inf, 0.0, 0
        histogram: Counter = Counter()
        for r in records:
            x = normalise_image(r["image"])
            lo, hi = min(lo, float(np.min(x))), max(hi, float(np.max(x)))
            total, count = total + float(np.sum(x, dtype=np.float64)), count + x.size
            histogram.update(_label_counts(np.asarray(r["mask"])))
        pixels = sum(histogram.values())
        lines.append(f"  intensity (normalised to [0, 1]): min {lo:.3f}, max {hi:.3f}, "
                     f"mean {total / count:.3f}")
        lines.append("  labels: " + ", ".join(f"{k}: {v / pixels:.1%}" for k, v in sorted(histogram.items())))
        classes = Counter(r["class"] for r in records if "class" in r)
        if classes:
            lines.append(f"  classes: {dict(sorted(classes.items()))}")
        fields = sorted({f for r in records for f in (r.get("metadata") or {})})
        lines.append(f"  metadata fields: {fields}")
        for field in fields:
            values = Counter(r["metadata"].get(field) for r in records if r.get("metadata"))
            categorical = len(values) <= _MAX_CATEGORIES and all(isinstance(v, str) for v in values)
            if field != "patient" and categorical:
                lines.append(f"    {field}: {dict(sorted(values.items()))}")
    shared = sorted({p for a in patients for b in patients if a < b for p in patients[a] & patients[b]})
    if any(patients.values()):
        lines.append(f"patients shared between splits: {shared[:10] if shared else 'none'}"
                     + (f" ({len(shared)} in all)" if len(shared) > 10 else ""))
    else:
        lines.append("patients shared between splits: unknown (no metadata 'patient')")
    return "\n".join(lines)


def _label_counts(mask: np.ndarray) -> dict:
    """``{label: pixel count}``; ``bincount`` for non-negative integer masks (fast), ``unique`` otherwise."""
    if mask.dtype.kind in "ub" or (mask.dtype.kind == "i" and mask.size and mask.min() >= 0):
        counts = np.bincount(mask.ravel().astype(np.intp, copy=False))
        return {label: int(c) for label, c in enumerate(counts) if c}
    labels, counts = np.unique(mask, return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


def build_parser() -> argparse.ArgumentParser:
    from utils.data.dataset_io import SPLITS

    parser = argparse.ArgumentParser(
        prog="python -m utils.data.dataset_info",
        description="Print what a dataset file (.pkl, .npz, PNG or NIfTI folder) holds and validate it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m utils.data.dataset_info data/camus_dataset.pkl --image_size 256",
    )
    parser.add_argument("path", type=Path, help="dataset file (.pkl, .npz) or folder (images/ + masks/)")
    parser.add_argument("--num_classes", type=int, default=4, help="number of mask labels (default 4, CAMUS)")
    parser.add_argument("--image_size", type=int, default=None, help="required side, if any: H = W of images, D = H = W of volumes")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="splits that must be present and non-empty (default: all three)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.cli import configure_logging

    configure_logging(timestamps=False)
    from utils.data.dataset_io import DatasetError, load_dataset, validate_dataset

    try:
        data = load_dataset(args.path)
    except (DatasetError, FileNotFoundError) as e:
        print(f"INVALID: {e}")
        return 1
    print(format_summary(data, args.path))
    try:
        validate_dataset(data, args.path, num_classes=args.num_classes, image_size=args.image_size,
                         splits=tuple(args.splits))
    except DatasetError as e:
        print(f"INVALID: {e}")
        return 1
    print(f"valid: splits {args.splits} present, {args.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
