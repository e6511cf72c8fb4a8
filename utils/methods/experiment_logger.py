"""The optional extra Lightning logger of a training run (``train_args.logger``), for a person who follows runs in
an experiment tracker; the run directory's TensorBoard and CSV logs are written either way."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from utils.config import ConfigError

MLFLOW_PACKAGE = "mlflow-skinny>=2.8"  # Lightning's MLFlowLogger imports the module mlflow, which skinny provides


def check_logger(train) -> None:
    """Refuse, before anything is written, a logger whose package is not installed (a ConfigError naming it)."""
    if train.logger == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"train_args.logger mlflow needs the package mlflow: pip install '{MLFLOW_PACKAGE}'")


def tracking_uri(train, run_dir: Path) -> str:
    """``train_args.logger_uri``, or the run directory's local MLflow store ``file:///.../<run_dir>/mlruns``."""
    return train.logger_uri or (run_dir / "mlruns").resolve().as_uri()


def extra_loggers(train, run_dir: Path, run_name: str) -> list:
    """The loggers ``train_args.logger`` adds: none, or an MLFlowLogger whose experiment and run are ``run_name``
    (a resumed run starts another MLflow run in the same experiment)."""
    if train.logger == "none":
        return []
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri(train, run_dir)
    if uri.startswith("file:"):  # MLflow 3 refuses its file store (in maintenance) unless this is set
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [MLFlowLogger(experiment_name=run_name, run_name=run_name, tracking_uri=uri)]
