"""train_args.logger: an MLflow run beside the run directory's logs, and clear errors for what cannot work."""

import sys

import pytest
from conftest import tiny_overrides

import trainer
from utils.config import ConfigError
from utils.methods import load_config
from utils.methods.experiment_logger import check_logger, tracking_uri


def test_an_unknown_logger_or_a_uri_without_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train_args.logger must be one of \['none', 'mlflow'\], got 'wandb'"):
        load_config("configs/tiny.yaml", ["train_args.logger=wandb"])
    with pytest.raises(ConfigError, match="train_args.logger_uri needs train_args.logger mlflow"):
        load_config("configs/tiny.yaml", ["train_args.logger_uri=file:/tmp/x"])


def test_mlflow_missing_is_refused_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'mlflow-skinny>=2.8'"):
        check_logger(load_config("configs/tiny.yaml", ["train_args.logger=mlflow"]).train_args)


def test_the_default_store_is_in_the_run_directory(tmp_path):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path, **{"train_args.logger": "mlflow"}))
    assert tracking_uri(cfg.train_args, cfg.run_dir) == (tmp_path / "runs" / "tiny" / "mlruns").resolve().as_uri()
    cfg = load_config("configs/tiny.yaml", ["train_args.logger=mlflow", "train_args.logger_uri=sqlite:///x.db"])
    assert tracking_uri(cfg.train_args, cfg.run_dir) == "sqlite:///x.db"


def test_a_tiny_run_logs_val_loss_to_its_mlflow_store(tmp_path, tiny_data):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    args = ["--config_path", "configs/tiny.yaml"]
    for item in tiny_overrides(tmp_path, **{"data_args.path": tiny_data, "train_args.logger": "mlflow"}):
        args += ["--set", item]
    assert trainer.main(args) == 0
    run_dir = tmp_path / "runs" / "tiny"
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [3, 7] and all(m.value > 0 for m in history)
    assert "`mlruns/`" in (run_dir / "summary.md").read_text()
