"""A study's tables: each row's metrics over training seeds, and its paired difference from the baseline row.

The unit of replication is the training seed. For every (row, seed) run, a metric's value is its mean over
the samples (per-image metrics: SSIM, PSNR, B-Dice, HD95; non-finite values, e.g. HD95 of an image without
edges, are left out and counted) or its set value (FID, KID, CMMD). A cell is the mean of those values over
seeds with a 95% t-interval over seeds (none with one seed). A difference is computed within each seed (the
same masks and noise in every row, so per-image metrics are paired sample by sample) and then summarised
over seeds the same way. Beside them: the phantom oracle's values (what a perfect sampler scores) and, per
metric, the smallest difference the design could detect at 80% power from the observed seed-to-seed spread.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass

import numpy as np

from utils.studies.runner import eval_dir, jobs
from utils.studies.spec import StudySpec


@dataclass
class RunResult:
    row: str
    seed: int
    source_index: np.ndarray  # (N,) the split index of each sample's mask
    per_image: dict[str, np.ndarray]  # metric -> (N,) values
    metrics: dict[str, dict]  # metrics.json's "metrics" (set values, skipped reasons)
    evaluation: dict  # metrics.json without "metrics"


def load_run(spec: StudySpec, row, seed: int) -> RunResult:
    out = eval_dir(spec, row, seed)
    if not (out / "metrics.json").is_file() or not (out / "per_image.csv").is_file():
        raise SystemExit(f"error: study {spec.name}: row '{row.name}' seed {seed} has no evaluation in {out}; "
                         "run the study (without --report_only) first")
    results = json.loads((out / "metrics.json").read_text())
    with open(out / "per_image.csv", newline="") as f:
        table = list(csv.DictReader(f))
    names = [k for k in table[0] if k not in ("sample", "source_index")] if table else []
    per_image = {m: np.array([float(r[m]) for r in table]) for m in names}
    index = np.array([int(r["source_index"]) for r in table])
    return RunResult(row.name, seed, index, per_image, results.pop("metrics"), results)


def run_value(run: RunResult, metric: str) -> float | None:
    """The run's value of ``metric``: the mean of its finite per-image values, or the set value; None if skipped.
    ``mask_dice`` is the segmenter's Dice of the generated images against their masks, mean over the labels."""
    if metric == "mask_dice":
        labels = run.evaluation.get("mask_fidelity", {}).get("generated", {})
        return float(np.mean([s["dice"]["value"] for s in labels.values()])) if labels else None
    if metric in run.per_image:
        v = run.per_image[metric]
        return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else None
    return run.metrics.get(metric, {}).get("value")


def paired_difference(run: RunResult, base: RunResult, metric: str) -> float | None:
    """Within one seed: mean over samples of (row - baseline) on the same samples, or of set values."""
    if metric in run.per_image:
        if not np.array_equal(run.source_index, base.source_index):
            raise ValueError(f"rows '{run.row}' and '{base.row}' (seed {run.seed}) were evaluated on different masks")
        d = run.per_image[metric] - base.per_image[metric]
        return float(d[np.isfinite(d)].mean()) if np.isfinite(d).any() else None
    a, b = run_value(run, metric), run_value(base, metric)
    return None if a is None or b is None else a - b


def t_interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval over seeds; no interval from one value."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n_seeds": len(v)}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n_seeds": len(v)}


def detectable_difference(sd: float, n_seeds: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The smallest true mean difference that a two-sided paired t-test over ``n_seeds`` seeds detects with
    probability ``power`` at level ``alpha``, when the per-seed differences have standard deviation ``sd``
    (exact, from the non-central t distribution); None with fewer than 2 seeds or no spread."""
    from scipy import optimize, stats

    if n_seeds < 2 or not sd > 0:
        return None
    df = n_seeds - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(delta: float) -> float:
        nc = delta * math.sqrt(n_seeds) / sd
        return stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc) - power  # both tails (cdf(-c) gives NaN)

    high = sd
    while shortfall(high) < 0:  # power grows with the difference: double until it is reached
        high *= 2.0
    return float(optimize.brentq(shortfall, 0.0, high))


def pooled_sd(differences: dict[str, dict], metric: str) -> tuple[float | None, int]:
    """(standard deviation of the per-seed differences from the baseline, pooled over the rows that have the
    metric; seeds per row), or (None, 0) without two seeds."""
    cells = [d[metric]["per_seed"] for d in differences.values() if metric in d and len(d[metric]["per_seed"]) > 1]
    if not cells:
        return None, 0
    ss = sum(float(np.sum((np.asarray(v) - np.mean(v)) ** 2)) for v in cells)
    return math.sqrt(ss / sum(len(v) - 1 for v in cells)), len(cells[0])


def oracle_row(runs: dict, base: str, seeds, metrics) -> dict[str, float]:
    """{metric: value} of evaluate.py's oracle row (a second real image of each mask: a perfect sampler) in
    the baseline row's runs, mean over seeds; {} off phantom data. Every run of a study has the same oracle
    (same masks, same K), so the baseline's stands for all."""
    rows = [runs[base, s].evaluation.get("comparison", {}).get("rows", {}).get("oracle") for s in seeds]
    if not rows or None in rows:
        return {}
    out = {}
    for m in metrics:
        values = [r.get(m, {}).get("value") for r in rows]
        if None not in values:
            out[m] = float(np.mean(values))
    return out


def summarise_study(spec: StudySpec, metrics: tuple[str, ...]) -> dict:
    """{"rows": {row: {metric: cell}}, "differences": {row: {metric: cell + excludes_zero}}, "oracle": {metric:
    value}, "detectable": {metric: smallest difference detectable at 80% power}} over seeds."""
    runs = {(row.name, seed): load_run(spec, row, seed) for row, seed in jobs(spec)}
    base = spec.baseline_row
    rows, diffs = {}, {}
    for row in spec.rows:
        rows[row.name], diffs[row.name] = {}, {}
        for m in metrics:
            values = [run_value(runs[row.name, s], m) for s in spec.seeds]
            if None not in values:
                rows[row.name][m] = {**t_interval(values), "per_seed": values}
            d = [paired_difference(runs[row.name, s], runs[base, s], m) for s in spec.seeds]
            if row.name != base and None not in d:
                cell = t_interval(d)
                cell["excludes_zero"] = cell["lo"] is not None and (cell["lo"] > 0 or cell["hi"] < 0)
                diffs[row.name][m] = {**cell, "per_seed": d}
    detectable = {}
    for m in metrics:
        sd, n = pooled_sd(diffs, m)
        if sd is not None:
            detectable[m] = detectable_difference(sd, n)
    return {"rows": rows, "differences": diffs, "runs": runs, "detectable": detectable,
            "oracle": oracle_row(runs, base, spec.seeds, metrics)}
