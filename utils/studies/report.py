"""What a study writes: results.md (the seed's table layout), results.csv/json, samples.png and metrics.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from utils.studies.spec import StudySpec, run_name
from utils.studies.tables import summarise_study

SAMPLE_ROWS = 6  # masks shown in samples.png


def metric_order() -> tuple[tuple[str, ...], dict[str, bool]]:
    """The seed's column order, the segmenter's mask Dice, then the distribution and diversity columns, and which
    direction is better (evaluate.py's definitions)."""
    from utils.evaluation.columns import COMPARED, HIGHER_IS_BETTER, METRICS

    return (*METRICS, "mask_dice", *COMPARED), HIGHER_IS_BETTER


def _cell(c: dict | None, signed: bool = False, flag: str = "") -> str:
    if c is None:
        return "skipped"
    fmt = "{:+.4g}" if signed else "{:.4g}"
    text = fmt.format(c["mean"]) + flag
    if c["lo"] is not None:
        text += f" [{c['lo']:.4g}, {c['hi']:.4g}]"
    return text + (" *" if c.get("excludes_zero") else "")


def _flag(metric: str, cell: dict, oracle: dict) -> str:
    """▲ for a paired score surely above the oracle's (only averaging gets there), ▼ for surely less diversity:
    the 95% t-interval over seeds of (row - oracle) excludes 0 (:func:`utils.evaluation.comparison.flag`)."""
    from utils.evaluation.comparison import flag
    from utils.studies.tables import t_interval

    if metric not in oracle or len(cell["per_seed"]) < 2:
        return ""
    d = t_interval([v - oracle[metric] for v in cell["per_seed"]])
    return flag(metric, d["lo"], d["hi"])


def _tables(spec: StudySpec, summary: dict, shown: list[str]) -> list[str]:
    """The rows (with the oracle's, flagged against it) and their differences from the baseline, for ``shown``."""
    from utils.evaluation.columns import column

    rows, oracle, base = summary["rows"], summary["oracle"], spec.baseline_row
    head = ["| Method | " + " | ".join(column(m) for m in shown) + " |", "|---|" + "---|" * len(shown)]
    lines = [*head, *(f"| {r.name} | " + " | ".join(
        _cell(rows[r.name].get(m), flag=_flag(m, rows[r.name][m], oracle) if m in rows[r.name] else "")
        for m in shown) + " |" for r in spec.rows)]
    if oracle:
        lines.append("| *oracle: a perfect sampler* | " + " | ".join(
            f"{oracle[m]:.4g}" if m in oracle else "–" for m in shown) + " |")
    lines += ["", f"Difference from {base}:", "", *head]
    lines += [f"| {r.name} | " + " | ".join(_cell(summary["differences"][r.name].get(m), signed=True)
                                             for m in shown) + " |" for r in spec.rows if r.name != base]
    return lines


def results_markdown(spec: StudySpec, summary: dict, command: str) -> str:
    from utils.evaluation.columns import COMPARED, label

    metrics, _ = metric_order()
    shown = [m for m in metrics if any(m in summary["rows"][r.name] for r in spec.rows)]
    first = summary["runs"][spec.rows[0].name, spec.seeds[0]]
    n, masks = len(first.source_index), len(set(first.source_index.tolist()))
    e = spec.evaluation
    about = [spec.description.strip(), ""] if spec.description.strip() else []
    lines = [f"# Study `{spec.name}`", "", *about, f"Command: `{command}`", "",
             f"{len(spec.seeds)} training seeds {list(spec.seeds)}; each run evaluated on {n} samples of {masks} "
             f"distinct masks of split '{e.split}' ({n // masks} per mask), noise seed {e.noise_seed}, "
             f"{e.num_steps} steps of its sampler. Cells: mean over training seeds [95% t-interval over seeds]. "
             "Differences: row minus baseline within each training seed (per-image metrics paired sample by "
             "sample on the same masks and noise), then mean over seeds [95% t-interval]; * = the interval "
             "excludes 0.", "", "## Paired metrics (each sample against the real image of its mask)", "",
             *_tables(spec, summary, [m for m in shown if m not in COMPARED])]
    beyond = [m for m in shown if m in COMPARED]
    if beyond:
        lines += ["", "## Distribution and diversity (what averaging cannot buy)", "",
                  "FRD: Fréchet Radiomics Distance to the training split (v0: 94 radiomic features, the one that "
                  "ranks blur and averaging behind samples; v1: the package default, 398 features of 2-D images, "
                  "a log); Prec/Rec/Dens/Cov: precision, recall, density, coverage in the v0 radiomic space; all "
                  "on one image per mask. 1-SSIM(K) and pixel std(K): diversity among the samples of one mask.",
                  "",
                  *_tables(spec, summary, beyond)]
    if summary["oracle"]:
        lines += ["", "▲: above a perfect sampler on a paired metric (only an average of plausible images gets "
                  "there); ▼: less diverse than a perfect sampler; each only where the 95% t-interval over seeds "
                  "of (row - oracle) excludes 0. The oracle is a second real image of each mask rendered by the "
                  "phantom with a new appearance (evaluate.py's oracle row). ≈: diversity should match the "
                  "oracle's."]
    detectable = [f"{label(m)} {summary['detectable'][m]:.3g}" for m in shown if summary["detectable"].get(m)]
    if detectable:
        lines += ["", f"Smallest difference from {spec.baseline_row} this design detects with 80% power (two-sided "
                  f"paired t-test over {len(spec.seeds)} seeds at 5%, with the seed-to-seed spread of the "
                  "differences seen here, pooled over rows): " + ", ".join(detectable) + ". A difference below "
                  "it reading 'not significant' is what this design would show even if it were real."]
    skipped = sorted({m for run in summary["runs"].values() for m, v in run.metrics.items() if "skipped" in v})
    if skipped:
        lines += ["", f"Not measured in some run: {', '.join(label(s) for s in skipped)} (the reasons are in each "
                  "run's metrics.json: no feature-extractor weights given, or too few images)."]
    steps = [f"{r.name}: {spec.num_steps(r)}" for r in spec.rows if spec.num_steps(r) != e.num_steps]
    if steps:
        lines += ["", f"Rows evaluated at other step counts: {', '.join(steps)}."]
    trained = [r for r in spec.rows if not r.runs_of]
    lines += ["", "Runs: " + ", ".join(f"[{r.name} seed {s}](runs/{run_name(r, s)})" for s in spec.seeds
                                        for r in trained), ""]
    return "\n".join(lines)


def write_report(spec: StudySpec, command: str) -> Path:
    """Write every output into the study directory; return results.md's path."""
    metrics, _ = metric_order()
    summary = summarise_study(spec, metrics)
    out = spec.study_dir
    (out / "results.md").write_text(results_markdown(spec, summary, command))
    _write_csv(out / "results.csv", summary)
    (out / "results.json").write_text(json.dumps(_as_json(spec, summary, command), indent=2) + "\n")
    _write_configs(spec)
    _samples_png(spec, summary, out / "samples.png")
    _metrics_png(spec, summary, out / "metrics.png")
    return out / "results.md"


def _write_csv(path: Path, summary: dict) -> None:
    """Every per-image value of every run: row, seed, sample, source_index, metrics."""
    runs = list(summary["runs"].values())
    names = sorted({m for r in runs for m in r.per_image})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", "sample", "source_index", *names])
        for r in runs:
            for i, src in enumerate(r.source_index.tolist()):
                w.writerow([r.row, r.seed, i, src, *(f"{r.per_image[m][i]:.6g}" for m in names)])


def _as_json(spec: StudySpec, summary: dict, command: str) -> dict:
    from dataclasses import asdict

    def finite(x):
        return None if x is None or not np.isfinite(x) else x

    runs = [{"row": r.row, "seed": r.seed, "source_index": r.source_index.tolist(),
             "per_image": {m: [finite(x) for x in v.tolist()] for m, v in r.per_image.items()},
             "metrics": r.metrics} for r in summary["runs"].values()]
    return {"study": asdict(spec), "command": command, "rows": summary["rows"],
            "differences": summary["differences"], "oracle": summary["oracle"],
            "detectable_difference": summary["detectable"], "runs": runs}


def _write_configs(spec: StudySpec) -> None:
    """Each row's resolved config (its first seed's; seeds differ only in train_args.seed)."""
    from utils.config import dump_config
    from utils.studies.spec import row_config, slug

    folder = spec.study_dir / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    for row in spec.rows:
        dump_config(row_config(spec, row, spec.seeds[0]), folder / f"{slug(row.name)}.yaml")


def _samples_png(spec: StudySpec, summary: dict, path: Path) -> None:
    """The same masks (rows) as generated by every variant (columns, first seed), beside mask and real image."""
    import torch

    from utils.data.dataset_io import load_dataset, normalise_image
    from utils.images import grid_image, mask_to_unit, save_png
    from utils.studies.runner import eval_dir

    seed = spec.seeds[0]
    first = summary["runs"][spec.rows[0].name, seed]
    k = min(SAMPLE_ROWS, len(first.source_index))
    records = load_dataset(first.evaluation["dataset"])[first.evaluation["split"]]
    picks = first.source_index[:k].tolist()
    real = torch.from_numpy(np.stack([normalise_image(records[i]["image"]) for i in picks]))
    masks = torch.from_numpy(np.stack([np.asarray(records[i]["mask"], dtype=np.uint8) for i in picks]))
    generated = []
    for row in spec.rows:
        with np.load(eval_dir(spec, row, seed) / "samples" / "samples.npz") as z:
            generated.append(torch.from_numpy(z["images"][:k]))
    num_classes = int(max(int(r["mask"].max()) for r in records)) + 1
    columns = [mask_to_unit(masks, num_classes), real, *generated]
    rows = [torch.stack([c[i] for c in columns]) for i in range(k)]
    save_png(grid_image(rows, col_labels=["mask", "real", *(r.name for r in spec.rows)],
                        row_labels=[f"#{i}" for i in picks]), path)


def _metrics_png(spec: StudySpec, summary: dict, path: Path) -> None:
    """One panel per measured metric: each row's mean over seeds with its interval, and the per-seed values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.evaluation.columns import column

    metrics, _ = metric_order()
    shown = [m for m in metrics if any(m in summary["rows"][r.name] for r in spec.rows)]
    cols = min(5, len(shown))
    nrows = -(-len(shown) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    names = [r.name for r in spec.rows]
    for ax, m in zip(axes.flat, shown):
        for x, name in enumerate(names):
            c = summary["rows"][name].get(m)
            if c is None:
                continue
            if c["lo"] is not None:
                ax.errorbar([x], [c["mean"]], yerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]], fmt="o",
                            color="k", capsize=4)
            ax.plot([x] * len(c["per_seed"]), c["per_seed"], ".", color="tab:blue", alpha=0.6)
        if m in summary["oracle"]:
            ax.axhline(summary["oracle"][m], color="tab:green", linestyle="--", label="oracle")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(column(m))
    oracle = "; dashed: a perfect sampler (the phantom's oracle)" if summary["oracle"] else ""
    fig.suptitle(f"{spec.name}: mean over training seeds with 95% t-interval; dots: seeds{oracle}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
