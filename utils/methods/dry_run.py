"""``trainer.py --dry_run``: what a training run would do and roughly what it costs, writing nothing.

The config, data and model are resolved exactly as for the run; a few training batches are then timed in a
throw-away Lightning Trainer (no logger, checkpoint or callback of the run, in a temporary directory) on one
device, and the time per batch is extrapolated to the run's budget. Validation, sample grids and checkpoints are
not in the estimate, and are said not to be."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch

from utils.cli import clock
from utils.generation.plan import peak_memory

log = logging.getLogger("comet.trainer")


class _BatchClock(pl.Callback):
    """The ``perf_counter`` at the end of every training batch."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


@contextmanager
def data_built_aside(cfg) -> Iterator:
    """``cfg``; or, when its synthetic set is missing, ``cfg`` with the set built in a temporary directory that
    is removed afterwards: a dry run writes nothing where the run would."""
    path = Path(cfg.data_args.path)
    if path.exists() or cfg.data_args.synthetic is None:
        yield cfg
        return
    log.info("dry run: %s is missing; the run would build it (built in a temporary directory for now)", path)
    with tempfile.TemporaryDirectory(prefix="comet-dry-run-") as tmp:
        data = dataclasses.replace(cfg.data_args, path=str(Path(tmp) / path.name))
        yield dataclasses.replace(cfg, data_args=data)


def seconds_per_batch(ends: list[float]) -> float:
    """The median gap between consecutive batch ends, the first batch (warm-up, allocation) left out."""
    gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
    if not gaps:
        raise ValueError("timing a training batch needs at least two batches")
    return gaps[len(gaps) // 2]


def run_batches(train, batches_per_epoch: int, accumulate: int) -> int:
    """The micro-batches a run trains: every epoch's, or ``max_steps`` optimizer steps' when that ends it first."""
    total = train.max_epochs * batches_per_epoch
    return min(total, train.max_steps * accumulate) if train.max_steps > 0 else total


def time_training(module, dm, accelerator: str, precision: str, batches: int = 4) -> tuple[float, str]:
    """Train ``batches`` batches of ``dm`` on one device of ``accelerator``: seconds per batch and peak memory."""
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    watch = _BatchClock()
    with tempfile.TemporaryDirectory(prefix="comet-dry-run-") as tmp:
        trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=-1,  # as needed
                             **module.trainer_arguments(1, batches), limit_val_batches=0, num_sanity_val_steps=0,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[watch], default_root_dir=tmp)
        trainer.fit(module, datamodule=dm)
    peak, kind = peak_memory("cuda" if accelerator == "gpu" else "cpu")
    return seconds_per_batch(watch.ends), f"{peak / 2**30:.2f} GiB, {kind}"


def report(cfg, module, dm, accelerator: str, precision: str, accumulate: int, run_state: str,
           epochs_done: int) -> None:
    """Log the plan of ``cfg``'s run (``epochs_done`` of it by an earlier start) and the estimate from
    :func:`time_training` (``module`` is trained a few batches: the caller discards it)."""
    t = cfg.train_args
    per_epoch = len(dm.train_dataloader())  # as the run's loader batches (it drops a last short batch)
    per_epoch = min(per_epoch, t.limit_train_batches) if t.limit_train_batches else per_epoch
    total = run_batches(t, per_epoch, accumulate)
    left = max(total - epochs_done * per_epoch, 0)
    counts = module.parameter_counts()
    log.info("dry run: nothing is written. Run directory %s: %s", cfg.run_dir, run_state)
    log.info("data %s: %d train, %d valid images; %d batches of %d per epoch x %d epochs%s = %d batches, %d left",
             cfg.data_args.path, len(dm.train_set), len(dm.val_set), per_epoch, t.batch_size, t.max_epochs,
             f", capped at max_steps {t.max_steps}" if t.max_steps > 0 else "", total, left)
    log.info("method %s: %s parameters; %s", cfg.method, f"{sum(counts.values()):,}", module.describe())
    seconds, memory = time_training(module, dm, accelerator, precision)
    log.info("timed on one %s device: %.3f s per batch; the %d batches left about %s (validation, sample grids "
             "and checkpoints not included; more devices divide it at best)", accelerator, seconds, left,
             clock(seconds * left))
    log.info("memory: %s", memory)
