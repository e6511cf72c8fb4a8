"""Shared fixtures: the real tiny config, shrunk paths, and one tiny trained run for the whole session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # configs/ paths are relative to the repository


def tiny_overrides(tmp: Path, **extra) -> list[str]:
    """--set values that put the tiny config's data and run directory under ``tmp``."""
    values = {"data_args.path": str(tmp / "data.npz"), "output_dir": str(tmp / "runs"), **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from utils.synthetic_echo import ensure_synthetic_dataset

    path = tmp_path_factory.mktemp("data") / "data.npz"
    ensure_synthetic_dataset(path, 32, (4, 2, 2), 0)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A tiny COMET run (2 epochs, contrastive on from the start); returns its run directory."""
    import trainer

    tmp = tmp_path_factory.mktemp("tinyrun")
    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp, **{"data_args.path": tiny_data}):
        args += ["--set", s]
    assert trainer.main(args) == 0
    return tmp / "runs" / "tiny"
