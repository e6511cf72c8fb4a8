"""Memorisation audit: is a generated image a near copy of a training image?

For every generated image, its nearest training image by pixel distance (RMSE on [0, 1]: ``sqrt(mean((a -
b)^2))``, computed in chunks with one matrix product per chunk, so thousands of images run on a CPU), and
the same for every real test image (patients the generator never saw). The reference is how close unseen
real patients come to the training set:

- ``typical``: the median test-to-train nearest distance; ``ratio`` = a generated image's distance / typical
  (1: as close as a typical unseen patient; near 0: a copy);
- ``threshold``: the test distances' 1st percentile (numpy ``method="lower"``: an observed distance, the
  smallest one while there are at most 100 test images); a generated image strictly below it is *flagged*:
  closer to a training image than (all but 1% of) real unseen patients are. A real test image is therefore
  never flagged when there are at most 100 of them.

Outputs (:func:`write_audit`): ``memorisation.json`` (summary and the flagged images with their nearest
training image and its patient), ``memorisation.csv`` (every generated image), ``memorisation_hist.png``
(histograms of both distance sets and the threshold) and ``memorisation_pairs.png`` (the 8 closest generated
images over their nearest training images, volumes by their three mid-slices; the flagged ones are among
them when any). Volumes ``[N, 1, D, H, W]`` are audited as images are: voxel RMSE.

Example (a synthetic set before sharing it):
    python -m utils.evaluation.memorisation --generated synth.npz --data_path data/synthetic_echo_64.npz \\
        --output_dir audit
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from utils.cli import add_renamed, configure_logging, docstring_parser

if TYPE_CHECKING:  # torch is imported where it runs, so that `--help` answers before it loads
    import torch

log = logging.getLogger(__name__)

PAIRS_SHOWN = 8


def nearest(queries01: torch.Tensor, reference01: torch.Tensor, chunk: int = 256,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each query ``(N, 1, H, W)`` (or volume ``(N, 1, D, H, W)``) the nearest reference ``(M, 1, ...)``: RMSE
    ``float64 [N]`` and index ``int64 [N]``. ``||q - r||^2 = ||q||^2 + ||r||^2 - 2 q.r`` per chunk of ``chunk``
    queries."""
    import torch

    if queries01.shape[1:] != reference01.shape[1:]:
        raise ValueError(f"images of {tuple(queries01.shape[1:])} cannot be compared with training images of "
                         f"{tuple(reference01.shape[1:])}")
    ref = reference01.flatten(1).float()
    ref_sq = (ref * ref).sum(1)
    dims = ref.shape[1]
    dist, index = [], []
    for start in tqdm(range(0, len(queries01), chunk), desc="nearest training image", unit="chunk",
                      disable=not progress, leave=False):
        q = queries01[start:start + chunk].flatten(1).float()
        sq = ((q * q).sum(1, keepdim=True) + ref_sq[None] - 2.0 * q @ ref.T).clamp_min(0.0)
        best, arg = sq.min(1)
        dist.append((best / dims).sqrt().double())
        index.append(arg)
    return torch.cat(dist).numpy(), torch.cat(index).numpy()


def audit(generated01: torch.Tensor, train01: torch.Tensor, test01: torch.Tensor, chunk: int = 256,
          progress: bool = True) -> dict:
    """Nearest-training-image distances of the generated and real test images, threshold, typical, flags."""
    gen_dist, gen_index = nearest(generated01, train01, chunk, progress)
    test_dist, test_index = nearest(test01, train01, chunk, progress)
    typical = float(np.median(test_dist))
    threshold = float(np.percentile(test_dist, 1, method="lower"))
    return {"distance": gen_dist, "index": gen_index, "ratio": gen_dist / typical if typical > 0 else
            np.full_like(gen_dist, np.inf), "test_distance": test_dist, "test_index": test_index,
            "typical": typical, "threshold": threshold, "flagged": np.flatnonzero(gen_dist < threshold)}


def summary(result: dict, train_patients: list | None) -> dict:
    """The JSON-ready summary: counts, reference distances, ratio quantiles, the flagged images."""
    def patient(i: int):
        return None if train_patients is None else train_patients[i]

    ratio = result["ratio"]
    flagged = [{"sample": int(i), "nearest_train": int(result["index"][i]),
                "train_patient": patient(int(result["index"][i])), "distance": float(result["distance"][i]),
                "ratio": float(ratio[i])} for i in result["flagged"]]
    return {"distance": "pixel RMSE on [0, 1]", "n": len(ratio), "n_test": len(result["test_distance"]),
            "typical_test_distance": result["typical"], "threshold": result["threshold"],
            "ratio_min": float(ratio.min()), "ratio_p01": float(np.percentile(ratio, 1)),
            "ratio_median": float(np.median(ratio)), "n_flagged": len(flagged),
            "fraction_flagged": len(flagged) / len(ratio), "flagged": flagged}


def write_audit(out_dir: Path, result: dict, generated01: torch.Tensor, train01: torch.Tensor,
                train_patients: list | None) -> dict:
    """memorisation.json/.csv/_hist.png/_pairs.png in ``out_dir``; returns the summary."""
    from utils.images import display_tiles, grid_image, save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary(result, train_patients)
    (out_dir / "memorisation.json").write_text(json.dumps(s, indent=2) + "\n")
    with open(out_dir / "memorisation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "nearest_train", "train_patient", "distance", "ratio", "flagged"])
        for i, (d, j) in enumerate(zip(result["distance"], result["index"])):
            p = "" if train_patients is None else train_patients[j]
            w.writerow([i, int(j), p, f"{d:.6g}", f"{result['ratio'][i]:.6g}", int(d < result["threshold"])])
    histogram_png({"real test -> train": result["test_distance"], "generated -> train": result["distance"]},
                  result["threshold"], out_dir / "memorisation_hist.png")
    closest = list(np.argsort(result["distance"], kind="stable")[:PAIRS_SHOWN])
    nearest_train = [int(result["index"][i]) for i in closest]
    save_png(grid_image([display_tiles(generated01[closest]), display_tiles(train01[nearest_train])],
                        row_labels=["generated", "nearest train"]), out_dir / "memorisation_pairs.png")
    return s


def histogram_png(series: dict[str, np.ndarray], threshold: float, path: Path, bins: int = 40) -> None:
    """Overlaid histograms (as densities) of each series on one axis, the threshold as a vertical line."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 360, 40
    hi = max(float(v.max()) for v in series.values()) * 1.05 or 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    dens = {k: np.histogram(v, edges)[0] / len(v) for k, v in series.items()}
    top = max(float(d.max()) for d in dens.values()) or 1.0
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    colours = ((90, 90, 90), (200, 40, 40))
    bar = (width - 2 * margin) / bins
    for (name, d), colour, k in zip(dens.items(), colours, range(len(dens))):
        for b, value in enumerate(d):
            x0 = margin + b * bar + k * bar / 2
            y0 = height - margin - value / top * (height - 2 * margin)
            draw.rectangle([x0, y0, x0 + bar / 2 - 1, height - margin], fill=colour)
        draw.text((margin + 10, 10 + 14 * k), f"{name} (N = {len(series[name])})", fill=colour)
    x = margin + threshold / hi * (width - 2 * margin)
    draw.line([x, margin, x, height - margin], fill=(0, 0, 200), width=2)
    draw.text((x + 4, margin), "1st pct of real test", fill=(0, 0, 200))
    draw.line([margin, height - margin, width - margin, height - margin], fill="black")
    draw.text((margin, height - margin + 6), "0", fill="black")
    draw.text((width - margin - 60, height - margin + 6), f"{hi:.3g} RMSE", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def report_section(s: dict) -> str:
    """Markdown lines for evaluate.py's report."""
    return "\n".join([
        "## Memorisation audit", "",
        f"Nearest training image of each of {s['n']} generated images by pixel RMSE, against the {s['n_test']} "
        f"real test images' nearest distances (median {s['typical_test_distance']:.4g}, 1st percentile "
        f"{s['threshold']:.4g}).", "",
        f"- ratio to the median real test distance: min {s['ratio_min']:.3g}, 1st percentile "
        f"{s['ratio_p01']:.3g}, median {s['ratio_median']:.3g}",
        f"- flagged (closer than the real test images' 1st percentile): {s['n_flagged']} of {s['n']}"
        + "".join(f"\n  - sample {f['sample']}: train image {f['nearest_train']} (patient {f['train_patient']}), "
                  f"RMSE {f['distance']:.4g}, ratio {f['ratio']:.3g}" for f in s["flagged"][:20]),
        "- memorisation_hist.png, memorisation_pairs.png (closest generated over their nearest training image)"])


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__, prog="python -m utils.evaluation.memorisation")
    p.add_argument("--generated", required=True, help="dataset file of generated images (inferer.py --export)")
    add_renamed(p, "--data_path", "--data", required=True, help="the real dataset (its train and test splits)")
    add_renamed(p, "--output_dir", "--output", required=True, help="directory for the audit files")
    p.add_argument("--chunk", type=int, default=256, help="generated images per distance chunk (default: 256)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    from utils.data.dataset_io import load_dataset
    from utils.data.layout import DatasetError
    from utils.evaluation.segmenter import split_tensors

    try:
        generated, _ = split_tensors([r for records in load_dataset(args.generated).values() for r in records])
        real = load_dataset(args.data_path)
        if not real.get("train") or not real.get("test"):
            raise DatasetError(f"{args.data_path}: needs non-empty train and test splits")
        train, _ = split_tensors(real["train"])
        test, _ = split_tensors(real["test"])
        result = audit(generated, train, test, args.chunk)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    patients = [r["metadata"].get("patient") for r in real["train"]]
    s = write_audit(Path(args.output_dir), result, generated, train, patients)
    print(report_section(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
