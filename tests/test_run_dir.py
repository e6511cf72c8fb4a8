"""Run directories: what a failed start leaves, what is protected, and who writes under several processes."""

import logging
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_overrides

import trainer
from utils.config import config_to_dict
from utils.methods import load_config


def _args(tmp, **extra):
    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp, **extra):
        args += ["--set", s]
    return args


def _broken_copy(good, path):
    z = dict(np.load(good))
    z["train_masks"] = z["train_masks"] + 9  # labels outside 0..3
    np.savez(path, **z)
    return path


def test_a_start_that_fails_on_bad_data_leaves_nothing_and_the_fixed_command_trains(tmp_path, tiny_data):
    bad = _broken_copy(tiny_data, tmp_path / "bad.npz")
    with pytest.raises(SystemExit, match=r"^error: .*bad.npz"):
        trainer.main(_args(tmp_path, **{"data_args.path": bad}))
    assert not (tmp_path / "runs").exists()  # no run directory: the name is not locked
    good = _args(tmp_path, **{"data_args.path": tiny_data, "train_args.max_epochs": 1})
    assert trainer.main(good) == 0
    assert (tmp_path / "runs" / "tiny" / "last.ckpt").exists()


def test_a_checkpoint_less_start_is_replaced_and_the_log_says_what_changed(tmp_path, tiny_data, caplog):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path, **{"data_args.path": tiny_data}))
    old = config_to_dict(cfg)
    old["train_args"]["lr"] = 0.5  # a start that died before its first checkpoint, with another lr
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    (cfg.run_dir / "train.log").write_text("crashed\n")
    with caplog.at_level(logging.WARNING):
        assert trainer.prepare_run_dir(cfg, config_to_dict(cfg)) is None
    assert "left no checkpoint; replacing its configuration (changed: train_args.lr)" in caplog.text
    assert load_config(cfg.run_dir / "config.yaml").train_args.lr == cfg.train_args.lr


def test_a_run_with_a_checkpoint_keeps_its_protection(tmp_path, tiny_data):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path, **{"data_args.path": tiny_data}))
    trainer.prepare_run_dir(cfg, config_to_dict(cfg))
    (cfg.run_dir / "periodic").mkdir()
    (cfg.run_dir / "periodic" / "epoch000.ckpt").write_bytes(b"x")  # any checkpoint counts
    changed = load_config("configs/tiny.yaml", tiny_overrides(tmp_path, **{"data_args.path": tiny_data,
                                                                            "train_args.lr": 0.5}))
    with pytest.raises(SystemExit, match=r"differs in: train_args.lr"):
        trainer.prepare_run_dir(changed, config_to_dict(changed))
    assert load_config(cfg.run_dir / "config.yaml").train_args.lr == cfg.train_args.lr


def test_only_rank_zero_writes_the_config_and_the_others_wait_for_it(tmp_path, tiny_data):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path, **{"data_args.path": tiny_data}))
    with pytest.raises(SystemExit, match="waited 1 s for rank 0 to save the configuration"):
        trainer.prepare_run_dir(cfg, config_to_dict(cfg), rank=1, timeout=1.0)
    assert not cfg.run_dir.exists()
    writer = threading.Timer(0.5, trainer.prepare_run_dir, (cfg, config_to_dict(cfg)))
    writer.start()
    start = time.monotonic()
    assert trainer.prepare_run_dir(cfg, config_to_dict(cfg), rank=1, timeout=30.0) is None
    assert time.monotonic() - start >= 0.4  # it waited for rank 0
    writer.join()


def test_only_rank_zero_builds_the_synthetic_set(tmp_path):
    from utils.data.datamodule import load_training_data

    cfg = load_config("configs/tiny.yaml", [f"data_args.path={tmp_path / 'synthetic.npz'}"]).data_args
    with pytest.raises(SystemExit, match="waited 1 s for rank 0 to build the synthetic dataset"):
        load_training_data(cfg, rank=1, timeout=1.0)
    assert not (tmp_path / "synthetic.npz").exists()
    assert len(load_training_data(cfg, rank=0)["train"]) == 16
    assert len(load_training_data(cfg, rank=1, timeout=1.0)["train"]) == 16


def test_launch_rank_reads_the_launchers_variables(monkeypatch):
    from utils.distributed import launch_rank

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_rank() == 1
    monkeypatch.setenv("RANK", "3")
    assert launch_rank() == 3


def test_resume_progress_is_read_memory_mapped(tiny_run, monkeypatch):
    full = torch.load(tiny_run / "last.ckpt", weights_only=True)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    assert trainer.checkpoint_progress(tiny_run / "last.ckpt") == (full["epoch"], full["global_step"])
    assert [c.get("mmap") for c in calls] == [True]  # the tensors are not read


def test_missing_patient_ids_are_warned_about_once(tmp_path, tiny_data):
    from utils.data.dataset_io import load_dataset, save_dataset

    data = load_dataset(tiny_data)
    for records in data.values():
        for r in records:
            r["metadata"].pop("patient")
    save_dataset(tmp_path / "nopatients.npz", data)
    assert trainer.main(_args(tmp_path, **{"data_args.path": tmp_path / "nopatients.npz",
                                           "train_args.max_epochs": 2})) == 0
    warnings = [line for line in (tmp_path / "runs" / "tiny" / "train.log").read_text().splitlines()
                if "have no patient id" in line]
    assert len(warnings) == 1 and "16 of 16 training images" in warnings[0]
