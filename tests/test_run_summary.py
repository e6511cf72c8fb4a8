"""The run summary a finished training leaves: loss_curve.png and summary.md, whole across a resume."""

import re

import numpy as np
import pytest
from conftest import tiny_overrides
from PIL import Image

import trainer
from utils.methods.run_summary import kept_csv_name, loss_series, metrics_files, read_metrics

# Two starts of a run as Lightning's CSV logger writes them (sparse rows). The first was killed after step 4 but
# resumed from its checkpoint at step 3, so its steps 3 and 4 were done again by the second start.
FIRST = """epoch,lr-Adam,step,train/g_loss,train/d_loss,val/loss,val/sample_ssim
,0.1,0,,,,
0,,0,4.0,1.0,,
0,,1,3.0,0.9,,
0,,2,2.5,0.8,,
0,,2,,,2.0,0.5
1,,3,9.0,9.0,,
1,,4,9.0,9.0,,
"""
SECOND = """epoch,lr-Adam,step,train/g_loss,train/d_loss,val/loss
,0.1,3,,,
1,,3,2.0,0.7,
1,,4,1.5,0.6,
1,,4,,,1.0
"""


def test_sparse_csv_logs_of_two_starts_give_each_loss_once_per_step(tmp_path):
    (tmp_path / kept_csv_name(3)).write_text(FIRST)
    (tmp_path / "metrics.csv").write_text(SECOND)
    files = metrics_files(tmp_path)
    assert [p.name for p in files] == ["metrics_to_step0000003.csv", "metrics.csv"]
    series = loss_series(read_metrics(files))
    assert series == {"train/d_loss": ([0, 1, 2, 3, 4], [1.0, 0.9, 0.8, 0.7, 0.6]),
                      "train/g_loss": ([0, 1, 2, 3, 4], [4.0, 3.0, 2.5, 2.0, 1.5]),
                      "val/loss": ([2, 4], [2.0, 1.0])}  # val/sample_ssim is not a loss
    assert loss_series(read_metrics(metrics_files(tmp_path / "none"))) == {}


def test_a_tiny_run_leaves_a_summary_and_a_loss_curve(tiny_run):
    text = (tiny_run / "summary.md").read_text()
    best = re.search(r"`(best-epoch\d+-valloss[0-9.]+\.ckpt)`: epoch (\d+)", text)
    assert best and (tiny_run / best.group(1)).is_file() and best.group(2) == "1"
    assert "- `data_args.path`: `\"data/synthetic_echo_32.npz\"` → " in text  # the --set that differs
    assert "train_args.lr" not in text  # what the file says is not a change
    assert "2 epochs (max_epochs 2), 8 generator steps" in text and "32 images seen" in text
    assert "| `val/loss` |" in text and "`samples/epoch0000.png` … `samples/epoch0001.png` (2)" in text
    image = np.asarray(Image.open(tiny_run / "loss_curve.png").convert("L"))
    assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 10  # drawn on, not a blank page


@pytest.mark.slow
def test_a_resumed_run_summarises_both_starts(tmp_path, tiny_data):
    def train(epochs):
        args = ["--config_path", "configs/tiny.yaml"]
        for item in tiny_overrides(tmp_path, **{"data_args.path": tiny_data, "train_args.max_epochs": epochs}):
            args += ["--set", item]
        assert trainer.main(args) == 0

    train(1)
    train(2)  # resumes at step 4
    run = tmp_path / "runs" / "tiny"
    series = loss_series(read_metrics(metrics_files(run / "csv")))
    assert series["train/loss"][0] == list(range(8)) and series["val/loss"][0] == [3, 7]
    text = (run / "summary.md").read_text()
    assert "this start, resumed at step 4" in text and "`csv/metrics_to_step0000004.csv`, `csv/metrics.csv`" in text
    assert "train_args.max_epochs" not in text  # this start's --set max_epochs=2 is what the file says
    train(2)  # the same command on the finished run: Lightning skips training, the summary is still written
    assert loss_series(read_metrics(metrics_files(run / "csv")))["train/loss"][0] == list(range(8))


def test_a_second_start_from_the_same_checkpoint_keeps_the_first_ones_log(tmp_path):
    """A start killed before its next checkpoint resumes from the same step: both earlier logs are kept, in order."""
    import trainer

    log = tmp_path / "csv" / "metrics.csv"
    log.parent.mkdir()
    for rows in ("step,train/loss\n0,1.0\n4,0.9\n", "step,train/loss\n4,0.8\n", "step,train/loss\n4,0.7\n"):
        log.write_text(rows)
        trainer.keep_csv_log(log, 4)
    log.write_text("step,train/loss\n4,0.6\n5,0.5\n")
    files = metrics_files(tmp_path / "csv")
    assert [f.name for f in files] == ["metrics_to_step0000004.csv", "metrics_to_step0000004_001.csv",
                                       "metrics_to_step0000004_002.csv", "metrics.csv"]
    assert loss_series(read_metrics(files))["train/loss"] == ([0, 4, 5], [1.0, 0.6, 0.5])
