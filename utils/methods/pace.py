"""The training run's pace: one log line per epoch (seconds per batch, images per second, losses and the time
left), so a run whose progress bar is redirected or silent still shows that it moves and when it ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytorch_lightning as pl

from utils.cli import clock

log = logging.getLogger("comet.trainer")

SHOWN = ("train/loss", "train/g_loss", "train/d_loss", "val/loss")
_LISTENERS: list[Callable[[float], None]] = []


@contextmanager
def run_estimates(listener: Callable[[float], None]) -> Iterator[None]:
    """Inside it, every epoch of every run trained in this process calls ``listener(seconds)`` with the run's
    whole estimated duration (time so far plus time left): a study forecasts itself from its first epochs."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def pace_line(epoch: int, epochs: int, seconds: float, batches: int, images: int, left: float,
              metrics: dict[str, float]) -> str:
    """The line of 1-based ``epoch`` of ``epochs``: it took ``seconds`` (training and validation) for ``batches``
    micro-batches of ``images`` images in all; ``left`` seconds remain."""
    shown = "".join(f", {k} {v:.4g}" for k, v in metrics.items())
    return (f"epoch {epoch}/{epochs}: {seconds:.1f} s, {seconds / max(batches, 1):.2f} s/batch, "
            f"{images / max(seconds, 1e-9):.1f} img/s{shown}; about {clock(left)} left")


class EpochPace(pl.Callback):
    """Logs :func:`pace_line` after each epoch's validation, on global rank 0. The time left is the time per epoch
    (per optimizer step when ``max_steps`` ends the run) of this process so far, times what remains."""

    def on_train_start(self, trainer, module) -> None:
        self.start = (time.perf_counter(), trainer.current_epoch, trainer.global_step)

    def on_train_epoch_start(self, trainer, module) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        began, first_epoch, first_step = self.start
        epoch = trainer.current_epoch + 1
        if trainer.max_steps > 0:
            steps = max(trainer.global_step - first_step, 1)
            left = (now - began) / steps * max(trainer.max_steps - trainer.global_step, 0)
        else:
            left = (now - began) / max(epoch - first_epoch, 1) * max(trainer.max_epochs - epoch, 0)
        batches = int(trainer.num_training_batches)
        images = batches * module.cfg.train_args.batch_size * trainer.world_size
        metrics = {k: float(v) for k in SHOWN if (v := trainer.callback_metrics.get(k)) is not None}
        log.info("%s", pace_line(epoch, trainer.max_epochs, now - self.epoch_start, batches, images, left, metrics))
        for listener in _LISTENERS:
            listener(now - began + left)
