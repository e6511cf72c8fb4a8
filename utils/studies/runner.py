"""Running a study: every (row, seed) trained, then evaluated with the study's protocol; resumable.

Training goes through ``trainer.main`` (which resumes a killed run from its ``last.ckpt`` and refuses a run
directory holding another configuration), evaluation through ``evaluate.main``. A stage that finished is
recorded in ``<study>/done/`` and skipped on the next run, after checking that its config did not change.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from utils.cli import clock
from utils.config import config_to_dict
from utils.files import write_text_atomic
from utils.studies.spec import RowSpec, StudySpec, row_config, row_overrides, run_name

log = logging.getLogger("comet.study")


def eval_dir(spec: StudySpec, row: RowSpec, seed: int) -> Path:
    return spec.study_dir / "eval" / run_name(row, seed)


def jobs(spec: StudySpec) -> list[tuple[RowSpec, int]]:
    """Seed by seed, every row: a study stopped early still holds complete comparisons for its first seeds."""
    return [(row, seed) for seed in spec.seeds for row in spec.rows]


def _marker(spec: StudySpec, row: RowSpec, seed: int, stage: str) -> Path:
    return spec.study_dir / "done" / f"{run_name(row, seed)}.{stage}.json"


def _finished(spec: StudySpec, row: RowSpec, seed: int, stage: str, record: dict) -> bool:
    """Whether ``stage`` finished with this very ``record`` (config or protocol); a changed one is refused. A
    config key added to the framework since the marker was written counts as the value that reproduces the run
    (``WRITTEN_BEFORE``, else its default)."""
    from utils.config import RESUMABLE_CHANGES, config_diff, config_to_dict
    from utils.methods import as_written, config_from_dict, upgrade

    path = _marker(spec, row, seed, stage)
    if not path.is_file():
        return False
    done = upgrade(json.loads(path.read_text()), announce=False)  # a marker written before the sampler's rename
    if stage == "train":
        done = config_to_dict(config_from_dict(as_written(done), str(path)))
    changed = [k for k in config_diff(done, record) if k not in RESUMABLE_CHANGES]
    if changed:
        raise SystemExit(f"error: study {spec.name}: row '{row.name}' seed {seed} was {stage}ed with a different "
                         f"setting (differs in: {', '.join(changed)}). Nothing was changed. Rename the study or "
                         f"the row, or remove {spec.study_dir} yourself.")
    return True


def _mark(spec: StudySpec, row: RowSpec, seed: int, stage: str, record: dict) -> None:
    path = _marker(spec, row, seed, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def train_argv(spec: StudySpec, row: RowSpec, seed: int) -> list[str]:
    """trainer.py's command line for this row and seed."""
    args = ["--config_path", spec.trained_row(row).config or spec.config]
    for item in row_overrides(spec, row, seed):
        args += ["--set", item]
    return args


def evaluate_argv(spec: StudySpec, row: RowSpec, seed: int) -> list[str]:
    """evaluate.py's command line for this row and seed: the study's protocol on the run's best checkpoint."""
    e, out = spec.evaluation, eval_dir(spec, row, seed)
    return ["--checkpoint", str(row_config(spec, row, seed).run_dir), "--which", "best",
            "--num_samples", str(e.num_samples), "--samples_per_mask", str(e.samples_per_mask),
            "--num_steps", str(spec.num_steps(row)),
            "--seed", str(e.noise_seed), "--split", e.split, "--n_boot", str(e.n_boot),
            "--skip_missing_metrics", "--output_dir", str(out), "--overwrite",  # ours: a killed try
            *(["--segmenter", e.segmenter] if e.segmenter else [])]


def study_stages(spec: StudySpec) -> list[tuple[RowSpec, int, str, dict]]:
    """Every (row, seed, stage) in the order a study runs them, with the record its done marker holds (the row's
    config for a training, the evaluation protocol for an evaluation). An evaluation split that the data lack is
    refused here, before any work."""
    todo = jobs(spec)
    configs = {(row.name, seed): row_config(spec, row, seed) for row, seed in todo}
    check_evaluation_split(spec, list(configs.values()))
    protocol = {row.name: {**asdict(spec.evaluation), "num_steps": spec.num_steps(row)} for row in spec.rows}
    return [(row, seed, stage, config_to_dict(configs[row.name, seed]) if stage == "train" else protocol[row.name])
            for row, seed in todo for stage in ("train", "evaluate") if stage == "evaluate" or not row.runs_of]


def plan_study(spec: StudySpec) -> list[str]:
    """What running ``spec`` would do, one line per stage with the command a stage to run would be (a row whose
    config changed is refused as a run would refuse it); reads only."""
    stages = study_stages(spec)
    lines, pending = [], []
    for k, (row, seed, stage, record) in enumerate(stages, 1):
        where = f"[{k}/{len(stages)}] row '{row.name}' seed {seed}: {stage}"
        if _finished(spec, row, seed, stage, record):
            lines.append(f"{where}: done earlier, would be skipped")
            continue
        pending.append(stage)
        command = ["trainer.py", *train_argv(spec, row, seed)] if stage == "train" else \
            ["evaluate.py", *evaluate_argv(spec, row, seed)]
        lines.append(f"{where}: would run  python {shlex.join(command)}")
    return [*lines, f"{pending.count('train')} training(s) and {pending.count('evaluate')} evaluation(s) to run, "
                    f"into {spec.study_dir}; `trainer.py --dry_run` with a row's arguments times its training"]


def run_study(spec: StudySpec, train: Callable[[list[str]], object], evaluate: Callable[[list[str]], object]) -> None:
    """Train and evaluate every (row, seed) not done yet, logging one line per stage with the time left.

    ``train`` and ``evaluate`` are the command lines' entry points (trainer.main, evaluate.main), given by the
    caller: a study runs exactly what a user would type."""
    from utils.methods.pace import run_estimates

    stages = study_stages(spec)
    pending = [stage for row, seed, stage, record in stages  # refuse a changed row before any work
               if not _finished(spec, row, seed, stage, record)]
    start, spent = time.perf_counter(), {"train": [], "evaluate": []}
    forecast = Forecast(pending.count("train"), pending.count("evaluate"))
    for k, (row, seed, stage, record) in enumerate(stages, 1):
        where = f"[{k}/{len(stages)}] row '{row.name}' seed {seed}: {stage}"
        if _finished(spec, row, seed, stage, record):
            log.info("%s: done earlier, skipped", where)
            continue
        log.info("%s ...", where)
        t0 = time.perf_counter()
        try:
            with run_estimates(forecast):
                if stage == "train":
                    train(train_argv(spec, row, seed))
                else:
                    evaluate(evaluate_argv(spec, row, seed))
        except KeyboardInterrupt:
            log.warning("%s: interrupted; the %d stages finished before it are kept. Run the same command to go "
                        "on (a training resumes from its last.ckpt).", where, k - 1)
            raise
        _mark(spec, row, seed, stage, record)
        spent[stage].append(time.perf_counter() - t0)
        log.info("%s: done in %s (study %s so far; about %s left)", where, clock(spent[stage][-1]),
                 clock(time.perf_counter() - start), clock(_time_left(stages[k:], spent)))


class Forecast:
    """Logs once, from the first epoch of the study's first training, what the stages left will take: every
    training at that run's pace, the evaluations (not timed yet) named apart. Called by the trainer's pace."""

    def __init__(self, trainings: int, evaluations: int):
        self.trainings, self.evaluations, self.said = trainings, evaluations, False

    def __call__(self, run_seconds: float) -> None:
        if self.said:
            return
        self.said = True
        log.info("study forecast: this training takes about %s; %d training(s) at that pace about %s, plus %d "
                 "evaluation(s) not timed yet", clock(run_seconds), self.trainings,
                 clock(run_seconds * self.trainings), self.evaluations)


def check_evaluation_split(spec: StudySpec, configs: list) -> None:
    """Refuse, before any training, an ``evaluation.split`` that the data of a row does not have (a synthetic
    set not built yet has its three splits; a dataset that is missing the trainer refuses itself)."""
    from utils.data.dataset_io import load_dataset
    from utils.data.synthetic_echo import SPLITS

    split = spec.evaluation.split
    for path, synthetic in sorted({(c.data_args.path, c.data_args.synthetic is not None) for c in configs}):
        if Path(path).exists():
            have = sorted(name for name, records in load_dataset(path).items() if records)
        elif synthetic:
            have = list(SPLITS)
        else:
            continue
        if split not in have:
            raise SystemExit(f"error: study {spec.name}: evaluation.split '{split}' is not a split of {path} "
                             f"(has: {', '.join(have)}); nothing was trained")


def _time_left(remaining: list, spent: dict[str, list[float]]) -> float:
    """The remaining stages at this run's mean time per stage kind (unknown kinds count as trainings)."""
    mean = {s: sum(v) / len(v) for s, v in spent.items() if v}
    fallback = mean.get("train", max(mean.values(), default=0.0))
    return sum(mean.get(stage, fallback) for _, _, stage, _ in remaining)
