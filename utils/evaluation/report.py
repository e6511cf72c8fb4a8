"""What evaluate.py writes: metrics.json, per_image.csv, report.md (the paper's table, the comparison rows, mask
fidelity, memorisation) and best_worst.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from utils.evaluation.columns import HIGHER_IS_BETTER, METRICS, METRICS_3D, UNITS
from utils.images import display_tiles, grid_image, mask_to_unit, save_png


def write_results(out_dir: Path, results: dict, per_image: dict, indices, images, real, masks,
                  num_classes: int) -> None:
    """metrics.json, per_image.csv (a row per volume for volumes), report.md and best_worst.png (by SSIM;
    volumes by their three mid-slices) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "source_index", *per_image])
        for i in range(len(indices)):
            w.writerow([i, int(indices[i]), *(f"{values[i]:.6g}" for values in per_image.values())])
    (out_dir / "report.md").write_text(report(results) + "\n")
    order = np.argsort(per_image["ssim"])
    k = min(8, len(order))
    rows = []
    for pick in (order[::-1][:k], order[:k]):  # best, then worst
        pick = list(pick)
        rows += [display_tiles(x) for x in (mask_to_unit(masks[pick], num_classes), real[pick], images[pick])]
    labels = [f"{which} SSIM: mask" for which in ("best", "worst") for _ in range(3)]
    labels[1::3], labels[2::3] = ["real"] * 2, ["generated"] * 2
    save_png(grid_image(rows, row_labels=labels), out_dir / "best_worst.png")


def report(results: dict) -> str:
    """The metrics table and how to read it, then the comparison, mask fidelity and memorisation sections when they
    were computed."""
    parts = [report_table(results), "", reading_guide(results)]
    if "comparison" in results:
        parts += ["", comparison_section(results)]
    if "skipped_2d_only" in results:
        parts += ["", "Skipped on volumes: " + "; ".join(f"{k} ({v})" for k, v in results["skipped_2d_only"].items())]
    if "mask_fidelity" in results:
        from utils.evaluation.segmenter import fidelity_table

        f = results["mask_fidelity"]
        parts += ["", f"## Mask fidelity (segmenter {f['segmenter']})", "",
                  f"Each generated image segmented and scored against the mask that conditioned it (gen, N = "
                  f"{f['n']}), next to the same segmenter on the {f['n_real']} real images with their own masks "
                  f"(real: the ceiling). Means over images; NSD at {f['tolerance_px']:g} px; 95% CIs in "
                  "metrics.json.", "", fidelity_table(f)]
    if "memorisation" in results:
        from utils.evaluation.memorisation import report_section

        m = results["memorisation"]
        parts += ["", f"Memorisation audit skipped: {m['skipped']}" if "skipped" in m else report_section(m)]
    return "\n".join(parts)


def reading_guide(results: dict) -> str:
    """For a reader who is not a metrics expert: a warning when the samples score below a constant image (the
    model is untrained or broken), the direction and unit of each metric, and which rows to compare them with."""
    c = results.get("comparison", {})
    voxels = "mmd" in results["metrics"]  # volumes: the edge-map metrics count voxels
    unit = "voxels" if voxels else UNITS["hd95"]
    lines = ["## How to read these numbers", ""]
    if "rows" in c:
        from utils.evaluation.comparison import below_constant

        lines += [line for warning in below_constant(c["rows"]) for line in (warning, "")]  # a paragraph each
        oracle = ("the oracle, a perfect sampler (a second real image of each mask): the score to reach, and the "
                  "diversity to match" if c["oracle"] == "used" else c["oracle"])
        where = ("The reference values are the rows of 'Beyond paired metrics' below, scored the same way: "
                 f"{oracle}; the real images themselves, the best a set of that size scores on the distribution "
                 "metrics; the mean of K samples, what averaging scores (a paired score near it rewards blur, not "
                 f"realism); a constant image at the training split's mean intensity ({c['constant']:.3g}), what a "
                 "model that learned nothing scores.")
    else:
        where = ("No reference rows in this evaluation (" + c.get("skipped", "--no-comparison") + "): run it with "
                 "--comparison to see what a perfect sampler, the real images and a constant image score.")
    lines += ["- Direction: ↑ higher is better, ↓ lower is better (the arrow after each name); ≈ (diversity) should "
              "match the real data's, neither more nor less.",
              f"- Units: PSNR in {UNITS['psnr']} (10 log10(1 / MSE), images in [0, 1]); HD95 in {unit}, between the "
              "edge maps of a generated image and the real image of its mask; NSD counts the edge pixels within "
              f"{results['surface_dice_tolerance_px']:g} {unit} of the other map's. SSIM, MS-SSIM, B-Dice, NSD, "
              "precision, recall and coverage lie in [0, 1], 1 being the real image's (the reference's) score. FID, "
              "KID, CMMD, MMD and FRD are distances between sets, 0 for identical distributions, with no unit: "
              "compare them only at the same N against the same reference.",
              f"- {where}"]
    return "\n".join(lines)


def comparison_section(results: dict) -> str:
    """The samples beside what averaging, a perfect sampler and the real data score (or why it was skipped)."""
    c = results["comparison"]
    if "skipped" in c:
        return f"Comparison rows skipped: {c['skipped']}"
    from utils.evaluation.comparison import comparison_markdown

    oracle = "" if c["oracle"] == "used" else f" ({c['oracle']})"
    return "\n".join(["## Beyond paired metrics", "",
                      f"Distribution metrics against the {c['n_reference']} images of the training split (the "
                      f"reference); diversity among the samples of each mask{oracle}.", "",
                      comparison_markdown(c["rows"])])


def report_table(results: dict) -> str:
    """The paper's results table (markdown; the metrics of ``results["metrics"]`` in their order), with N samples,
    the number of masks and the 95% intervals."""
    names = {"b_dice": "B-Dice", "surface_dice": f"NSD@{results['surface_dice_tolerance_px']:g}px",
             "fid_3d": "3D-FID", "fid_2p5d": "2.5D-FID", "ms_ssim": "MS-SSIM"}
    shown = [m for m in results["metrics"] if m in METRICS or m in METRICS_3D]
    head = "| " + " | ".join(f"{names.get(m, m.upper())}{'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in shown) + " |"
    cells, notes = [], []
    for m in shown:
        r = results["metrics"][m]
        if "skipped" in r:
            cells.append("skipped")
            notes.append(f"- {names.get(m, m.upper())} skipped: {r['skipped'].split(': tried')[0].split('. ')[0]} "
                         "(details in metrics.json)")
        else:
            v = r["value"]
            cells.append("inf" if v is None else f"{v:.4g}")
            extra = f", 95% CI [{r['ci95'][0]:.4g}, {r['ci95'][1]:.4g}]" if r.get("ci95") and None not in r[
                "ci95"] else ""
            real = f" vs {r['n_real']} real" if "n_real" in r else ""
            masks = f" of {r['n_masks']} masks" if "n_masks" in r else ""
            planes = ", planes " + ", ".join(f"{p} {v:.4g}" for p, v in r["planes"].items()) if "planes" in r else ""
            notes.append(f"- {names.get(m, m.upper())}: N = {r['n']}{masks}{real}{extra}{planes}")
    lines = [f"Evaluation of {results['checkpoint']} on split '{results['split']}' of {results['dataset']}: "
             f"{results['num_samples']} samples of {results['num_masks']} distinct masks, {results['num_steps']} "
             f"{results['sampler']} steps, seed {results['seed']}", "", head, "|" + "---|" * len(shown),
             "| " + " | ".join(cells) + " |", "", *notes,
             f"- CI: 95% cluster-bootstrap interval over the {results['num_masks']} source images; "
             "noise and masks only, not training seeds"]
    return "\n".join(lines)
