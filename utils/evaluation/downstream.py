"""Downstream utility: does a segmenter trained with synthetic images work on real patients?

Trains the segmenter of :mod:`utils.evaluation.segmenter` (its fixed recipe; ``--train_steps`` optimiser steps
for every training set, so more data is not also more compute) on each training set, once per seed, and
scores it on the real test split (per-label Dice, HD95, surface Dice; means over the test images):

- ``real``: the real training split;
- ``synthetic``: the synthetic dataset only (every record of every split of ``--generated``, e.g. an
  ``inferer.py --export`` of images generated for the training masks, or for N x as many);
- ``real+synthetic``: both;
- ``real{P}``: the real images of ``--fraction`` of the training patients (drawn per seed; by image when
  records carry no ``patient``);
- ``real{P}+synthetic``: those, plus the synthetic images whose ``source_patient`` is not among them
  (synthetic images for the masks of the remaining patients; all of them when no ``source_patient``).

The seed sets the network's initial weights, the batch order and the patient draw; the same seed is used
in every condition, so differences are paired by seed. Over seeds: the mean and a 95% t-interval
(``t_{0.975, S-1} * sd / sqrt(S)``, sd with S - 1), and for each condition its paired difference from
``real`` (mean and t-interval of the per-seed differences). Writes ``downstream.csv`` (one row per
condition, seed and label), ``downstream.json`` and ``downstream.md``.

Example:
    python -m utils.evaluation.downstream --data_path data/synthetic_echo_64.npz --generated synth.npz \\
        --seeds 0 1 2 --output_dir outputs/downstream
    python -m utils.evaluation.downstream --data_path data/synthetic_echo_64.npz --generated synth.npz \\
        --output_dir outputs/downstream --dry_run        # the trainings it would run and their time; writes nothing
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils.cli import add_renamed, configure_logging, docstring_parser
from utils.evaluation.segmenter import (
    SCORES,
    Recipe,
    label_names,
    label_scores,
    segment,
    split_tensors,
    train_segmenter,
)

if TYPE_CHECKING:  # torch loads with the segmenter's functions, so that `--help` answers before it does
    import torch

log = logging.getLogger(__name__)


def conditions(real_train: list[dict], synthetic: list[dict], fraction: float, seed: int) -> dict[str, list[dict]]:
    """The training sets of one seed (see the module docstring), by condition name."""
    kept = _patient_subset(real_train, fraction, seed)
    kept_patients = {str(r["metadata"].get("patient")) for r in kept}
    rest = [r for r in synthetic if str(r["metadata"].get("source_patient")) not in kept_patients]
    low = f"real{round(100 * fraction)}"
    return {"real": real_train, "synthetic": synthetic, "real+synthetic": real_train + synthetic,
            low: kept, f"{low}+synthetic": kept + rest}


def _patient_subset(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """The records of ``ceil(fraction * P)`` patients drawn with ``default_rng(seed)`` (images when no ids)."""
    ids = [str(r["metadata"].get("patient", i)) for i, r in enumerate(records)]
    patients = sorted(set(ids))
    k = max(1, math.ceil(fraction * len(patients)))
    chosen = set(np.random.default_rng(seed).choice(patients, size=k, replace=False).tolist())
    return [r for r, p in zip(records, ids) if p in chosen]


def score_condition(train: list[dict], test_images: torch.Tensor, test_masks: torch.Tensor, num_classes: int,
                    recipe: Recipe) -> dict[str, np.ndarray]:
    """Train on ``train`` and return the mean over test images of each score, ``{score: [num_classes - 1]}``."""
    images, masks = split_tensors(train)
    net = train_segmenter(images, masks, num_classes, recipe, progress=False)
    scores = label_scores(segment(net, test_images), test_masks, num_classes)
    return {k: v.mean(0) for k, v in scores.items()}


def t_interval(values) -> dict:
    """Mean and 95% t-interval over seeds (``None`` bounds for a single seed)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "ci95": [None, None], "n_seeds": len(v)}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n_seeds": len(v)}


def summarise(per_seed: dict[str, list[dict]], num_classes: int) -> dict:
    """``{condition: {label: {score: {"value": t_interval, "vs_real": t_interval of paired differences}}}}``."""
    out = {}
    for cond, runs in per_seed.items():
        out[cond] = {}
        for k, name in enumerate(label_names(num_classes)):
            out[cond][name] = {}
            for score in SCORES:
                values = [r[score][k] for r in runs]
                diffs = [a - b[score][k] for a, b in zip(values, per_seed["real"])]
                out[cond][name][score] = {"value": t_interval(values), "vs_real": t_interval(diffs)}
    return out


def check_one_size(sets: dict[str, dict[str, list[dict]]]) -> None:
    """Every image of ``sets`` ({file: {split: records}}, the splits the command uses) has one size, or a
    DatasetError names the first record of another size and the record it differs from."""
    from utils.data.layout import DatasetError

    first = None
    for path, data in sets.items():
        for split, records in data.items():
            for i, record in enumerate(records):
                shape = tuple(np.shape(record["image"]))
                where = f"{path}: {split}[{i}] is {'x'.join(map(str, shape))}"
                if first is None:
                    first = shape, where
                elif shape != first[0]:
                    raise DatasetError(f"{where} but {first[1]}; every image of --data_path and --generated needs one "
                                       "size (export the synthetic set at the real images' size)")


def run(real: dict, synthetic: list[dict], seeds: list[int], fraction: float, num_classes: int,
        steps: int) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Per condition, per seed, the mean test scores; and each condition's training-set size (first seed)."""
    from tqdm import tqdm

    test_images, test_masks = split_tensors(real["test"])
    per_seed: dict[str, list[dict]] = {}
    sizes: dict[str, int] = {}
    jobs = [(seed, name, train) for seed in seeds
            for name, train in conditions(real["train"], synthetic, fraction, seed).items()]
    for seed, name, train in tqdm(jobs, desc="downstream runs", unit="run", dynamic_ncols=True):
        sizes.setdefault(name, len(train))
        scores = score_condition(train, test_images, test_masks, num_classes, Recipe(steps=steps, seed=seed))
        per_seed.setdefault(name, []).append(scores)
    return per_seed, sizes


def seconds_per_step(images01: torch.Tensor, masks: torch.Tensor, num_classes: int, short: int = 2,
                     long: int = 6) -> float:
    """One optimiser step of the segmenter's recipe on these images, from two timed trainings after an untimed
    one (imports and first allocations): ``long`` minus ``short`` steps, so the start-up of each cancels."""
    import time

    seconds = []
    train_segmenter(images01, masks, num_classes, Recipe(steps=1), progress=False)
    for steps in (short, long):
        start = time.perf_counter()
        train_segmenter(images01, masks, num_classes, Recipe(steps=steps), progress=False)
        seconds.append(time.perf_counter() - start)
    return max(seconds[1] - seconds[0], 0.0) / (long - short)


def plan(real: dict, synthetic: list[dict], seeds: list[int], fraction: float, num_classes: int,
         steps: int) -> str:
    """What a run would do (``--dry_run``): each condition's training-set size per seed, the trainings and their
    estimated time from :func:`seconds_per_step` (testing not included); writes nothing."""
    from utils.cli import clock

    sizes = {seed: {name: len(train) for name, train in conditions(real["train"], synthetic, fraction, seed).items()}
             for seed in seeds}
    trainings = sum(map(len, sizes.values()))
    per_step = seconds_per_step(*split_tensors(real["train"]), num_classes)
    lines = ["dry run: nothing was written"]
    lines += [f"  seed {seed}: " + ", ".join(f"{name} {n} images" for name, n in by_name.items())
              for seed, by_name in sizes.items()]
    lines.append(f"  {trainings} segmenter trainings of {steps} steps at {per_step:.3f} s per step: about "
                 f"{clock(trainings * steps * per_step)} (scoring the {len(real['test'])} test images not included)")
    return "\n".join(lines)


def write(out_dir: Path, per_seed: dict, summary: dict, sizes: dict, seeds: list[int], info: dict) -> str:
    """downstream.csv/.json/.md in ``out_dir``; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(next(iter(summary.values())))
    with open(out_dir / "downstream.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "seed", "label", *SCORES])
        for cond, runs in per_seed.items():
            for seed, r in zip(seeds, runs):
                for k, name in enumerate(names):
                    w.writerow([cond, seed, name, *(f"{r[s][k]:.6g}" for s in SCORES)])
    (out_dir / "downstream.json").write_text(json.dumps({**info, "seeds": seeds, "train_sizes": sizes,
                                                         "summary": summary}, indent=2) + "\n")
    md = markdown(summary, sizes, seeds, info)
    (out_dir / "downstream.md").write_text(md + "\n")
    return md


def _cell(t: dict, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if t["ci95"][0] is None:
        return fmt.format(t["mean"])
    return f"{fmt.format(t['mean'])} [{fmt.format(t['ci95'][0])}, {fmt.format(t['ci95'][1])}]"


def markdown(summary: dict, sizes: dict, seeds: list[int], info: dict) -> str:
    """Two tables: Dice and HD95 per label and condition; paired Dice differences from ``real``."""
    names = list(next(iter(summary.values())))
    head = "| condition | N train | " + " | ".join(f"Dice {n}" for n in names) + " | " + " | ".join(
        f"HD95 {n}" for n in names) + " |"
    rule = "|---|---|" + "---|" * 2 * len(names)
    rows = [f"| {c} | {sizes[c]} | " + " | ".join(_cell(s[n]["dice"]["value"]) for n in names) + " | "
            + " | ".join(_cell(s[n]["hd95"]["value"]) for n in names) + " |" for c, s in summary.items()]
    diff_head = "| condition | " + " | ".join(f"ΔDice {n}" for n in names) + " |"
    diffs = [f"| {c} | " + " | ".join(_cell(s[n]["dice"]["vs_real"], signed=True) for n in names) + " |"
             for c, s in summary.items() if c != "real"]
    return "\n".join([
        f"Segmenter trained per condition ({info['steps']} steps each), tested on the {info['n_test']} real test "
        f"images of {info['real']}; synthetic: {info['synthetic']}. Means over seeds {seeds} with 95% "
        "t-intervals over seeds; HD95 in pixels.", "", head, rule, *rows, "",
        "Paired differences from `real` (same seed), Dice:", "", diff_head, "|---|" + "---|" * len(names), *diffs])


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__, prog="python -m utils.evaluation.downstream")
    add_renamed(p, "--data_path", "--real", required=True, help="the real dataset (train and test splits)")
    add_renamed(p, "--generated", "--synthetic", required=True, help="a synthetic dataset file (inferer.py --export)")
    add_renamed(p, "--output_dir", "--output", required=True, help="directory for downstream.csv/.json/.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--fraction", type=float, default=0.25, help="share of real patients in the low-data rows")
    add_renamed(p, "--train_steps", "--steps", type=int, default=Recipe.steps,
                help="optimiser steps per run (default: %(default)s)")
    p.add_argument("--num_classes", type=int, default=4, help="labels incl. background (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output")
    p.add_argument("--dry_run", action="store_true",
                   help="check the inputs, list the trainings with an estimate of their time, write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if not 0 < args.fraction < 1 or args.train_steps < 1:
        raise SystemExit(f"error: need 0 < --fraction < 1 and --train_steps >= 1, got {args.fraction}, "
                         f"{args.train_steps}")
    if (Path(args.output_dir) / "downstream.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {Path(args.output_dir) / 'downstream.json'} exists; pass --overwrite")
    from utils.data.dataset_io import load_dataset, validate_dataset
    from utils.data.layout import DatasetError

    try:
        real = load_dataset(args.data_path)
        validate_dataset(real, args.data_path, args.num_classes, splits=("train", "test"))
        synthetic_data = load_dataset(args.generated)
        validate_dataset(synthetic_data, args.generated, args.num_classes, splits=tuple(synthetic_data))
        check_one_size({args.data_path: {s: real[s] for s in ("train", "test")}, args.generated: synthetic_data})
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    synthetic = [r for records in synthetic_data.values() for r in records]
    if not synthetic:
        raise SystemExit(f"error: {args.generated} holds no records")
    if args.dry_run:
        print(plan(real, synthetic, args.seeds, args.fraction, args.num_classes, args.train_steps))
        return 0
    per_seed, sizes = run(real, synthetic, args.seeds, args.fraction, args.num_classes, args.train_steps)
    info = {"real": str(args.data_path), "synthetic": str(args.generated), "steps": args.train_steps,
            "fraction": args.fraction, "n_test": len(real["test"])}
    print(write(Path(args.output_dir), per_seed, summarise(per_seed, args.num_classes), sizes, args.seeds, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
