"""One process per run or study directory, tried with real second processes."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from utils.locks import LOCK_NAME, LockError, directory_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time\nfrom utils.locks import directory_lock\nwith directory_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


@contextmanager
def held_by_another_process(directory: Path):
    """A second Python process holding ``directory``'s lock until the block ends (then killed, as a crash)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    with held_by_another_process(tmp_path / "run") as child:
        with pytest.raises(LockError, match=rf"run is in use by process {child.pid} .*lock file .*run/{LOCK_NAME}"):
            with directory_lock(tmp_path / "run"):
                pass
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == child.pid  # killed: lock left behind
    with caplog.at_level("WARNING", logger="utils.locks"):
        with directory_lock(tmp_path / "run") as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {child.pid}, which is no longer running" in caplog.text
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released when the block ends


def test_a_lock_being_written_counts_as_held(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(LockError, match="in use by process \\?"):
        with directory_lock(tmp_path):
            pass


def test_a_second_trainer_on_a_run_directory_is_refused_before_writing(tmp_path, tiny_data):
    import trainer

    run_dir = tmp_path / "tiny"
    argv = ["--config_path", "configs/tiny.yaml", "--set", f"data_args.path={tiny_data}",
            "--set", f"output_dir={tmp_path}", "--set", "run_name=tiny"]
    with held_by_another_process(run_dir) as child:
        with pytest.raises(SystemExit, match=rf"error: .*tiny is in use by process {child.pid}"):
            trainer.main(argv)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_second_study_on_a_study_directory_is_refused(tmp_path, tiny_data):
    import study

    spec = {"name": "s", "output_dir": str(tmp_path), "config": "configs/tiny.yaml", "seeds": [0],
            "rows": [{"name": "a", "set": [f"data_args.path={tiny_data}"]}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with held_by_another_process(tmp_path / "s") as child:
        with pytest.raises(SystemExit, match=rf"error: .*s is in use by process {child.pid}"):
            study.main([str(tmp_path / "s.yaml")])
