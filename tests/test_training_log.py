"""What a training run tells its user: one pace line per epoch, and none of Lightning's misleading lines."""

import re

from utils.cli import clock
from utils.methods.pace import pace_line


def test_the_pace_line_has_the_known_numbers():
    line = pace_line(3, 30, 12.0, 15, 240, 27 * 12.0 + 5, {"train/loss": 0.1234567, "val/loss": 0.2})
    assert line == ("epoch 3/30: 12.0 s, 0.80 s/batch, 20.0 img/s, train/loss 0.1235, val/loss 0.2; "
                    "about 5m29s left")
    assert clock(59.6) == "1m00s" and clock(3725) == "1h02m"


def test_a_run_logs_one_pace_line_per_epoch_with_the_time_left(tiny_run):
    lines = [line for line in (tiny_run / "train.log").read_text().splitlines() if "img/s" in line]
    assert [re.search(r"epoch (\d+/\d+):", line).group(1) for line in lines] == ["1/2", "2/2"]
    assert "val/loss" in lines[-1] and lines[-1].endswith("about 0m00s left")
    assert re.search(r"about \d+m\d\ds left$", lines[0])


def test_lightnings_misleading_lines_are_dropped(caplog):
    import logging
    import warnings

    import trainer

    trainer.quiet_lightning()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        trainer.quiet_lightning()  # after simplefilter: the trainer's filters come first again
        warnings.warn("Checkpoint directory /runs/x exists and is not empty.", UserWarning, stacklevel=1)
        warnings.warn("Experiment logs directory /runs/x/csv exists and is not empty. Previous log files in this "
                      "directory will be deleted when the new ones are saved!", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]
    with caplog.at_level("INFO"):
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("💡 Tip: For seamless cloud logging ...")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False, used: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text
