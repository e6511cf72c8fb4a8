"""Train a mask-conditional generator (COMET, MOTFM or a baseline: the config's ``method``) from a YAML config.

Examples:
    python trainer.py --config_path configs/quickstart.yaml
    python trainer.py --config_path configs/comet_camus.yaml --set train_args.max_epochs=100
    python trainer.py --config_path configs/comet_camus.yaml --dry_run     # time and memory, writes nothing

Checkpoints, the resolved config, logs and sample grids go to ``<output_dir>/<run_name>/``. Running the
same command again resumes from ``last.ckpt``; a run directory that holds a different configuration is
never reused silently, and one that another process is training in (its ``.lock``) is refused.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys
from contextlib import ExitStack
from pathlib import Path

from utils.cli import LOG_FORMAT, fit_until_ctrl_c, run_command

log = logging.getLogger("comet.trainer")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python trainer.py --config_path configs/quickstart.yaml --set train_args.max_epochs=5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config_path", default="configs/quickstart.yaml", help="YAML config (default: %(default)s)")
    p.add_argument("--dry_run", action="store_true",
                   help="resolve the config, data and model, time a few training batches and estimate the run's "
                        "time and memory; write nothing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train_args.lr=2e-4 (repeatable)")
    return p


def setup_logging(rank: int) -> logging.handlers.MemoryHandler:
    """Console logging (rank 0: info, others: warnings), and a buffer of the records for the run's log file,
    which :func:`log_to_file` writes once the run directory is ready."""
    buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True, format=LOG_FORMAT,
                        handlers=[logging.StreamHandler(), buffer])
    return buffer


# Lightning's lines that are wrong or noise for this trainer: it checks the run directory itself (prepare_run_dir),
# keeps the earlier CSV log on resume (keep_csv_log), and advertises a cloud logger.
LIGHTNING_NOISE = (r"Checkpoint directory .* exists and is not empty",
                   r"Experiment logs directory .* exists and is not empty",
                   r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def quiet_lightning() -> None:
    """Drop :data:`LIGHTNING_NOISE` warnings and Lightning's advertisement lines ("💡 Tip")."""
    import warnings

    for pattern in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


def log_to_file(buffer: logging.handlers.MemoryHandler, path: Path) -> logging.FileHandler:
    """Write the buffered records to ``path`` and send every later one there too (until the handler is removed)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    buffer.setTarget(handler)
    buffer.flush()
    root = logging.getLogger()
    root.removeHandler(buffer)
    root.addHandler(handler)
    return handler


def resolve_devices(train, cuda_count: int) -> tuple[str, int]:
    """(accelerator, devices per node): every visible GPU by default, else one CPU process."""
    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if cuda_count > 0 else "cpu"
    if accelerator == "gpu":
        if cuda_count == 0:
            raise RuntimeError("train_args.accelerator is 'gpu' but no CUDA device is visible")
        return "gpu", train.devices or cuda_count
    return "cpu", train.devices or 1


def accumulation_steps(effective_batch: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation that keeps ``effective_batch`` for this number of processes (at least 1)."""
    per_step = batch_size * world_size
    return max(1, round(effective_batch / per_step))


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds anything worth protecting: last, best or periodic checkpoints."""
    return run_dir.is_dir() and any(run_dir.rglob("*.ckpt"))


def saved_config(path: Path) -> dict | None:
    """The plain config dict saved at ``path`` (through the dataclasses, so keys added to the code since read as
    what reproduces the saved run: :func:`utils.methods.as_written`), or None when there is none."""
    from utils.config import config_to_dict, read_yaml_mapping
    from utils.methods import as_written, config_from_dict

    return config_to_dict(config_from_dict(as_written(read_yaml_mapping(path)), str(path))) if path.is_file() else None


def prepare_run_dir(cfg, config_dict: dict, rank: int = 0, timeout: float = 600.0) -> Path | None:
    """Create the run directory and save the configuration; return ``last.ckpt`` to resume from, if any.

    Only rank 0 writes; other ranks (torchrun, SLURM) wait until rank 0 has saved this configuration. A
    directory whose run has a checkpoint and another configuration (beyond RESUMABLE_CHANGES) is refused;
    one whose earlier start left no checkpoint is taken over, and the log says what changed.
    """
    from utils.config import dump_config
    from utils.distributed import wait_for
    from utils.files import atomic_path

    path, last = cfg.run_dir / "config.yaml", cfg.run_dir / "last.ckpt"
    if rank != 0:
        wait_for(lambda: saved_config(path) == config_dict, f"save the configuration of run '{cfg.run_name}' in "
                 f"{path}", timeout)
        return last if last.exists() else None
    resume = check_run_dir(cfg, config_dict)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # other ranks never read half a file
        dump_config(cfg, tmp)
    return resume


def check_run_dir(cfg, config_dict: dict) -> Path | None:
    """Refuse a run directory that holds another run (:func:`prepare_run_dir`); the ``last.ckpt`` this run would
    resume from, if any. Reads only."""
    from utils.config import RESUMABLE_CHANGES, config_diff
    from utils.locks import LOCK_NAME

    run_dir = cfg.run_dir
    previous = saved_config(run_dir / "config.yaml")
    if previous is not None:
        changed = [k for k in config_diff(previous, config_dict) if k not in RESUMABLE_CHANGES]
        if changed and has_checkpoint(run_dir):
            raise SystemExit(
                f"error: {run_dir} already holds run '{cfg.run_name}' with a different configuration "
                f"(differs in: {', '.join(changed)}). Nothing was changed. Choose another name with "
                "--set run_name=NAME, or move that directory away yourself."
            )
        if changed:
            log.warning("%s: an earlier start of run '%s' left no checkpoint; replacing its configuration "
                        "(changed: %s)", run_dir, cfg.run_name, ", ".join(changed))
    elif run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise SystemExit(f"error: {run_dir} exists, is not empty and has no config.yaml; not writing into it. "
                         "Choose another name with --set run_name=NAME.")
    last = run_dir / "last.ckpt"
    return last if last.exists() else None


def checkpoint_progress(path: Path) -> tuple[int, int]:
    """(epoch, global step) of a COMET checkpoint, memory-mapped: the tensors are not read."""
    from utils.generation.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path, mmap=True)
    return ckpt["epoch"], ckpt["global_step"]


def keep_csv_log(path: Path, step: int) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv when it starts: keep it under another name (the run
    summary's loss curve reads it back)."""
    import itertools

    from utils.methods.run_summary import kept_csv_name

    if path.is_file():
        kept = next(k for n in itertools.count() if not (k := path.with_name(kept_csv_name(step, n))).exists())
        path.replace(kept)
        log.info("the metrics logged before step %d are in %s; metrics.csv holds those from here on", step, kept)


def log_budget(train, train_images: int) -> None:
    """The training budget as images seen, the unit methods are compared in (the seed's "same budget")."""
    if train.max_steps > 0:
        log.info("budget: %d generator steps x %d images = %s images seen (max_steps; max_epochs %d)",
                 train.max_steps, train.effective_batch_size, f"{train.max_steps * train.effective_batch_size:,}",
                 train.max_epochs)
    else:
        log.info("budget: %d epochs x %d training images = %s images seen", train.max_epochs, train_images,
                 f"{train.max_epochs * train_images:,}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from utils.config import ConfigError, config_to_dict
    from utils.distributed import launch_rank
    from utils.methods import load_config

    rank = launch_rank()
    log_buffer = setup_logging(rank)
    quiet_lightning()

    import pytorch_lightning as pl
    import torch

    from utils.data.datamodule import EchoDataModule
    from utils.data.dataset_io import DatasetError
    from utils.generation.checkpoints import CheckpointError
    from utils.locks import LockError, directory_lock
    from utils.methods import method_class
    from utils.methods.base import MethodSetupError
    from utils.methods.dry_run import data_built_aside
    from utils.methods.experiment_logger import check_logger
    from utils.methods.memory import check_training_memory
    from utils.methods.run_summary import RunSummary, config_changes

    with ExitStack() as held:
        try:  # every input is read, and the model built, before the run directory is written
            cfg = load_config(args.config_path, args.overrides)
            config_dict = config_to_dict(cfg)
            summary = RunSummary(args.config_path, config_changes(args.config_path, args.overrides, config_dict))
            t = cfg.train_args
            check_logger(t)
            if args.dry_run:  # a missing synthetic set is built aside, not where the run would build it
                cfg = held.enter_context(data_built_aside(cfg))
            pl.seed_everything(t.seed, workers=True)
            dm = EchoDataModule(cfg.data_args, t.batch_size, t.seed, rank, cfg.model_args.spatial_dims)
            module = method_class(cfg.method).for_data(cfg, dm)
            if cfg.model_args.spatial_dims == 3:  # a volume too large fails here, not inside the first step
                check_training_memory(module, resolve_devices(t, torch.cuda.device_count())[0])
            if args.dry_run:
                return dry_run(cfg, config_dict, module, dm)
            if rank == 0:  # one launch per run directory; its other ranks follow it
                held.enter_context(directory_lock(cfg.run_dir))
            resume = prepare_run_dir(cfg, config_dict, rank)
            progress = checkpoint_progress(resume) if resume is not None else None
        except (ConfigError, FileNotFoundError, DatasetError, CheckpointError, MethodSetupError, LockError) as e:
            raise SystemExit(f"error: {e}") from None
        file_log = log_to_file(log_buffer, cfg.run_dir / "train.log") if rank == 0 else None
        try:
            return fit(cfg, module, dm, resume, progress, summary)
        finally:  # a later run in this process (a study) must not write into this run's log
            if file_log is not None:
                logging.getLogger().removeHandler(file_log)
                file_log.close()


def dry_run(cfg, config_dict: dict, module, dm) -> int:
    """What the run would do (resume or start, data, model, estimated time and memory), writing nothing."""
    import torch

    from utils.methods.dry_run import report
    from utils.precision import resolve_precision

    t = cfg.train_args
    resume = check_run_dir(cfg, config_dict)
    epoch, step = checkpoint_progress(resume) if resume is not None else (-1, 0)
    state = "a new run" if resume is None else f"would resume from {resume} (epoch {epoch}, step {step})"
    accelerator, devices = resolve_devices(t, torch.cuda.device_count())
    accumulate = accumulation_steps(t.effective_batch_size, t.batch_size, devices * t.num_nodes)
    report(cfg, module, dm, accelerator, resolve_precision(t.precision, accelerator), accumulate, state, epoch + 1)
    return 0


def fit(cfg, module, dm, resume: Path | None, progress: tuple[int, int] | None, summary) -> int:
    """Build the Lightning Trainer for ``cfg`` and train ``module`` on ``dm`` (resuming from ``resume``); the
    ``summary`` callback (:class:`utils.methods.run_summary.RunSummary`) writes the run summary at the end."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from pytorch_lightning.strategies import DDPStrategy

    from utils.methods.experiment_logger import extra_loggers
    from utils.methods.networks import time_blind_levels
    from utils.methods.pace import EpochPace
    from utils.methods.sample_grid import SampleGrid
    from utils.precision import resolve_precision

    t = cfg.train_args
    accelerator, devices = resolve_devices(t, torch.cuda.device_count())
    world = devices * t.num_nodes
    accumulate = accumulation_steps(t.effective_batch_size, t.batch_size, world)
    if t.batch_size * world * accumulate != t.effective_batch_size:
        log.warning("effective batch %d is not reachable with %d per device x %d processes; using %d",
                    t.effective_batch_size, t.batch_size, world, t.batch_size * world * accumulate)
    log.info("run %s in %s: %s x %d (x %d nodes), batch %d per device x %d processes x %d accumulation = %d",
             cfg.run_name, cfg.run_dir, accelerator, devices, t.num_nodes, t.batch_size, world, accumulate,
             t.batch_size * world * accumulate)
    precision = resolve_precision(t.precision, accelerator)
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts
    counts = module.parameter_counts()
    log.info("method %s: %s parameters (%s)", cfg.method, f"{sum(counts.values()):,}",
             " + ".join(f"{name} {n:,}" for name, n in counts.items()))
    log.info("%s", module.describe())
    if cfg.UNET and (blind := time_blind_levels(cfg.model_args)):
        log.warning("UNet level(s) %s never see t: each has as many channels as model_args.norm_num_groups (%d), so "
                    "GroupNorm removes the time embedding there (as in the seed's and MOTFM's network)", blind,
                    cfg.model_args.norm_num_groups)
    log_budget(t, len(dm.train_set))

    callbacks = [
        ModelCheckpoint(dirpath=cfg.run_dir, monitor="val/loss", mode="min", save_top_k=1, save_last=True,
                        filename="best-epoch{epoch:03d}-valloss{val/loss:.6f}", auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=cfg.run_dir / "periodic", every_n_epochs=t.checkpoint_every_n_epochs,
                        save_top_k=-1, filename="epoch{epoch:03d}", auto_insert_metric_name=False),
        LearningRateMonitor(),
        TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 50),
        SampleGrid(),
        EpochPace(),
        summary,
    ]
    loggers = [TensorBoardLogger(cfg.run_dir, name="", version="tensorboard"),
               CSVLogger(cfg.run_dir, name="", version="csv"), *extra_loggers(t, cfg.run_dir, cfg.run_name)]
    strategy = (DDPStrategy(find_unused_parameters=module.ddp_find_unused_parameters,
                            gradient_as_bucket_view=True) if world > 1 else "auto")
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=precision, max_epochs=t.max_epochs, **module.trainer_arguments(accumulate, t.max_steps),
        check_val_every_n_epoch=t.val_every_n_epochs, log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches or None, limit_val_batches=t.limit_val_batches or None,
        default_root_dir=cfg.run_dir, callbacks=callbacks, logger=loggers, num_sanity_val_steps=0,
        benchmark=True,  # cuDNN times its convolution algorithms once per shape; a run's shapes are fixed
    )
    if resume is not None:
        log.info("resuming from %s (epoch %d, step %d)", resume, *progress)
        keep_csv_log(cfg.run_dir / "csv" / "metrics.csv", progress[1])
    fit_until_ctrl_c(trainer, module, datamodule=dm, ckpt_path=resume)
    best = callbacks[0].best_model_path
    score = callbacks[0].best_model_score
    log.info("done: best checkpoint %s (val/loss %s); last %s", best, None if score is None else f"{float(score):.6f}",
             cfg.run_dir / "last.ckpt")
    return 0


def cli() -> None:
    """The console script (pyproject.toml): Ctrl-C ends with one line and status 130."""
    run_command(main)


if __name__ == "__main__":
    cli()
