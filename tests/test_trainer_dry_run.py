"""trainer.py --dry_run: the plan and an estimate of a run, and not one file written."""

import logging

import pytest
from conftest import tiny_overrides

from utils.methods.dry_run import run_batches, seconds_per_batch


def test_the_time_per_batch_is_the_median_gap_after_the_first_batch():
    assert seconds_per_batch([5.0, 6.0, 7.5, 8.5]) == 1.0  # gaps 1, 1.5, 1: the first batch's 5 s is warm-up
    with pytest.raises(ValueError, match="at least two batches"):
        seconds_per_batch([1.0])


def test_the_batches_of_a_run_are_its_epochs_or_its_step_cap():
    class Train:
        max_epochs, max_steps = 30, -1

    assert run_batches(Train, 15, 1) == 450
    Train.max_steps = 100
    assert run_batches(Train, 15, 2) == 200  # 100 optimizer steps of 2 accumulated micro-batches
    Train.max_steps = 1000
    assert run_batches(Train, 15, 2) == 450


def _files(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def said():
    records, handler = [], logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("comet.trainer")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _argv(tmp_path, **extra):
    args = ["--config_path", "configs/tiny.yaml", "--dry_run"]
    for s in tiny_overrides(tmp_path, **extra):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_dry_run_of_a_new_run_builds_its_missing_data_aside_and_writes_nothing(tmp_path, said):
    import trainer

    assert trainer.main(_argv(tmp_path)) == 0  # data.npz under tmp_path is missing: the synthetic set
    assert list(tmp_path.iterdir()) == []
    assert any("data.npz is missing; the run would build it" in m for m in said)
    assert any(m.endswith("runs/tiny: a new run") for m in said)
    assert any("images; 4 batches of 4 per epoch x 2 epochs = 8 batches, 8 left" in m for m in said)
    assert any(m.startswith("timed on one cpu device:") and "the 8 batches left about" in m for m in said)


@pytest.mark.slow
def test_a_dry_run_of_a_trained_run_says_it_would_resume_and_touches_nothing(tiny_run, tiny_data, said):
    import trainer

    before = _files(tiny_run.parent.parent)
    extra = {"data_args.path": tiny_data, "train_args.max_epochs": 5}
    assert trainer.main(_argv(tiny_run.parent.parent, **extra)) == 0
    assert _files(tiny_run.parent.parent) == before
    assert any(f"would resume from {tiny_run / 'last.ckpt'} (epoch 1, step 8)" in m for m in said)
    assert any("x 5 epochs = 20 batches, 12 left" in m for m in said)


def test_a_dry_run_refuses_what_the_run_would_refuse(tiny_run, tiny_data):
    import trainer

    extra = {"data_args.path": tiny_data, "model_args.channels": "[16, 16]"}
    with pytest.raises(SystemExit, match="already holds run 'tiny' with a different configuration"):
        trainer.main(_argv(tiny_run.parent.parent, **extra))


@pytest.mark.slow
def test_a_dry_run_times_several_batches_when_an_epoch_has_one(tmp_path, tiny_data, said):
    import trainer

    extra = {"data_args.path": tiny_data, "train_args.batch_size": 16, "train_args.effective_batch_size": 16,
             "contrastive_args.num_keys": 16}
    assert trainer.main(_argv(tmp_path, **extra)) == 0  # 16 training images: one batch an epoch
    assert any("1 batches of 16 per epoch x 2 epochs = 2 batches, 2 left" in m for m in said)
    assert any(m.startswith("timed on one cpu device:") for m in said)
