"""What a finished training run leaves for a person to open first: ``loss_curve.png`` (every logged loss against
the step, the CSV logs of earlier starts included) and ``summary.md`` (the run, what it changed from its config
file, its budget, best checkpoint, final metrics and where its files are). Written by :class:`RunSummary` when
the fit ends, on global rank 0; the helpers are pure functions of the run directory."""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl

from utils.cli import clock
from utils.config import ConfigError, config_diff, config_to_dict
from utils.files import write_text_atomic
from utils.generation.checkpoints import CheckpointError, best_score, find_checkpoint

log = logging.getLogger(__name__)

CSV_NAME, KEPT_PREFIX = "metrics.csv", "metrics_to_step"


def kept_csv_name(step: int, start: int = 0) -> str:
    """The name the trainer keeps ``metrics.csv`` under when a run resumes at ``step`` (Lightning's CSV logger would
    delete it) for the ``start``-th time from that step (a start killed before its next checkpoint resumes from the
    same one); the zero padding sorts the kept files in the order they were written."""
    return f"{KEPT_PREFIX}{step:07d}.csv" if start == 0 else f"{KEPT_PREFIX}{step:07d}_{start:03d}.csv"


def metrics_files(csv_dir: Path) -> list[Path]:
    """The CSV logs of every start of a run, oldest first: the kept ones, then ``metrics.csv``."""
    return sorted(csv_dir.glob(f"{KEPT_PREFIX}*.csv")) + [csv_dir / CSV_NAME]


def read_metrics(paths: list[Path]) -> list[dict[str, float]]:
    """The logged values of CSV logs written one after the other (:func:`metrics_files`), as one list of rows.

    Lightning's CSV logger writes sparse rows (a value per column logged at that call, the rest empty): each row
    keeps only its values, with ``step``. A log's rows at or after the first step of a later log were logged after
    the checkpoint the later start resumed from (a killed run redoes them), so the later log's rows replace them.
    """
    logs = [_read_csv(p) for p in paths if p.is_file()]
    rows, cutoff = [], float("inf")
    for part in reversed(logs):
        rows = [r for r in part if r["step"] < cutoff] + rows
        cutoff = min([cutoff] + [r["step"] for r in part])
    return rows


def _read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def is_loss(name: str) -> bool:
    return name.startswith(("train/", "val/")) and name.endswith("loss")


def loss_series(rows: list[dict[str, float]]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) of every logged loss (``train/...loss``, ``val/...loss``), in name order."""
    names = sorted({k for r in rows for k in r if is_loss(k)})
    return {n: ([int(r["step"]) for r in rows if n in r], [r[n] for r in rows if n in r]) for n in names}


def last_values(rows: list[dict[str, float]]) -> dict[str, tuple[float, int]]:
    """metric -> (its last logged value, the step it was logged at); ``epoch`` and ``step`` are not metrics."""
    last = {}
    for r in rows:
        last.update({k: (v, int(r["step"])) for k, v in r.items() if k not in ("epoch", "step")})
    return dict(sorted(last.items()))


def plot_losses(series: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    """One line per loss against the step; validation losses (one value per epoch) drawn with markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (steps, values) in series.items():
        ax.plot(steps, values, "o-" if name.startswith("val/") else "-", label=name, markersize=3, linewidth=1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_changes(config_path: str, overrides: list[str], resolved: dict) -> list[str]:
    """Markdown lines, one per key whose value in ``resolved`` (the run's config dict) differs from the config file
    it was started from; a file that is a valid config only with its ``--set`` values gets those listed instead."""
    from utils.methods import load_config

    try:
        base = config_to_dict(load_config(config_path))
    except ConfigError:
        return [f"- `--set {item}`" for item in overrides]
    return [f"- `{key}`: {_show(base, key)} → {_show(resolved, key)}" for key in config_diff(base, resolved)]


def _show(values: dict, dotted: str) -> str:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return f"`{json.dumps(values)}`"


@dataclass(frozen=True)
class Budget:
    """What the run trained for: ``epochs`` and generator ``steps`` done in all, each on a ``batch`` of images
    (the effective batch), the wall time of this start and the generator step it started at (0: not resumed)."""

    epochs: int
    steps: int
    batch: int
    seconds: float
    started_at_step: int

    @property
    def images(self) -> int:
        return self.steps * self.batch


def summary_markdown(run_dir: Path, cfg, config_path: str, changes: list[str], budget: Budget,
                     rows: list[dict[str, float]]) -> str:
    """The text of ``summary.md`` for the run in ``run_dir`` (config ``cfg``, started from ``config_path``)."""
    t = cfg.train_args
    resumed = f" (this start, resumed at step {budget.started_at_step})" if budget.started_at_step else ""
    lines = [f"# Run {cfg.run_name}", "", f"Method `{cfg.method}`, from `{config_path}`.", "",
             f"## Configuration changed from `{config_path}`", "",
             *(changes or ["none: the run is the file's configuration"]), "",
             "## Budget", "",
             f"- {budget.epochs} epochs (max_epochs {t.max_epochs}), {budget.steps} generator steps "
             f"(max_steps {t.max_steps})",
             f"- {budget.images:,} images seen ({budget.steps} steps x effective batch {budget.batch})",
             f"- wall time {clock(budget.seconds)}{resumed}", "",
             "## Best checkpoint", "", _best_line(run_dir), "",
             "## Final logged metrics", "", "| metric | value | step |", "|---|---|---|",
             *(f"| `{k}` | {v:.6g} | {step} |" for k, (v, step) in last_values(rows).items()), "",
             "## Files", "", *_file_lines(run_dir), ""]
    return "\n".join(lines)


def _best_line(run_dir: Path) -> str:
    try:
        best = find_checkpoint(run_dir, "best")
    except CheckpointError:
        return "none (no validation ran)"
    epoch, loss = best_score(best.name)
    return f"`{best.name}`: epoch {epoch}, val/loss {loss:.6f}"


def _file_lines(run_dir: Path) -> list[str]:
    """Relative paths a person looks for; a series (periodic checkpoints, sample grids) as its first and last."""
    def series(pattern: str) -> str:
        found = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob(pattern))
        return "none" if not found else f"`{found[0]}`" + (f" … `{found[-1]}` ({len(found)})" if found[1:] else "")

    checkpoints = sorted(p.name for p in run_dir.glob("*.ckpt"))
    logs = [str(p.relative_to(run_dir)) for p in metrics_files(run_dir / "csv") if p.is_file()]
    logs += [name for name in ("train.log", "tensorboard/", "mlruns/") if (run_dir / name).exists()]
    return [f"- checkpoints: {', '.join(f'`{n}`' for n in checkpoints)}; periodic: {series('periodic/*.ckpt')}",
            f"- sample grids: {series('samples/*.png')}",
            "- loss curves: `loss_curve.png`; configuration: `config.yaml`",
            f"- logs: {', '.join(f'`{n}`' for n in logs)}"]


def write_run_summary(run_dir: Path, cfg, config_path: str, changes: list[str], budget: Budget) -> None:
    """Write ``loss_curve.png`` and ``summary.md`` into ``run_dir`` from its CSV logs and checkpoints."""
    rows = read_metrics(metrics_files(run_dir / "csv"))
    plot_losses(loss_series(rows), run_dir / "loss_curve.png", f"{cfg.run_name} ({cfg.method})")
    write_text_atomic(run_dir / "summary.md", summary_markdown(run_dir, cfg, config_path, changes, budget, rows))
    log.info("run summary in %s and %s", run_dir / "summary.md", run_dir / "loss_curve.png")


class RunSummary(pl.Callback):
    """Writes the run summary when the fit ends; ``changes`` is :func:`config_changes` of the run's config."""

    def __init__(self, config_path: str, changes: list[str]):
        self.config_path, self.changes = config_path, changes
        self.start = None  # a run restored already finished never starts training (Lightning skips the loop)

    def on_train_start(self, trainer, module) -> None:
        self.start = (time.perf_counter(), module.generator_steps())

    def on_fit_end(self, trainer, module) -> None:
        for logger in trainer.loggers:  # Lightning flushes its CSV log only after this hook
            logger.save()
        if not trainer.is_global_zero:
            return
        began, first_step = self.start or (time.perf_counter(), module.generator_steps())
        batch = module.cfg.train_args.batch_size * trainer.world_size * module.accumulate_grad_batches
        budget = Budget(trainer.current_epoch, module.generator_steps(), batch, time.perf_counter() - began,
                        first_step)
        write_run_summary(Path(trainer.default_root_dir), module.cfg, self.config_path, self.changes, budget)
