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


# Best checkpoints as Lightning names them (with a -v1 duplicate); the lowest val/loss is neither first nor last.
BEST_NAMES = ("best-epoch001-valloss0.500000.ckpt", "best-epoch002-valloss0.100000.ckpt",
              "best-epoch003-valloss0.300000.ckpt", "best-epoch003-valloss0.300000-v1.ckpt")
LOWEST_VAL_LOSS = "best-epoch002-valloss0.100000.ckpt"


def time_effect(config_path: str, overrides: list[str] = ()) -> float:
    """max |v(t = 0.1) - v(t = 0.9)| of the config's flow-matching network at its image size, its zero-initialised
    layers (the zero convolutions and the UNet's output layer) woken up; near 0 when the network cannot see t."""
    import torch

    from utils.methods import load_config
    from utils.methods.networks import build_model

    cfg = load_config(config_path, list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model_args, cfg.data_args.num_classes)
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    shape = (1, 1) + (cfg.data_args.image_size,) * cfg.model_args.spatial_dims
    x, mask = torch.randn(shape), torch.randint(0, cfg.data_args.num_classes, shape)
    with torch.no_grad():
        return float((model(x, torch.tensor([0.1]), mask) - model(x, torch.tensor([0.9]), mask)).abs().max())


def run_with_several_best(tiny_run: Path, tmp: Path) -> Path:
    """A run directory under ``tmp`` holding the tiny run's last.ckpt under each of BEST_NAMES and as itself."""
    import shutil

    run = tmp / "run"
    run.mkdir()
    for name in ("last.ckpt", *BEST_NAMES):
        shutil.copy(tiny_run / "last.ckpt", run / name)
    return run


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from utils.data.synthetic_echo import ensure_synthetic_dataset

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


@pytest.fixture(scope="session")
def random_inception_file(tmp_path_factory):
    """The real torch-fidelity Inception-v3 architecture with random weights, saved as a state dict."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    from utils.evaluation.feature_extractors import INCEPTION_FILE_NAME

    # build without downloading or loading any weights; the random weights do not depend on the tests run before
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        torch.manual_seed(0)
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE_NAME
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """The real CLIPVisionModelWithProjection class with a tiny random config, saved with its processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    directory = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    return directory


@pytest.fixture
def no_metric_weights(tmp_path, monkeypatch):
    """evaluate.py as on a machine with no feature-extractor weights: caches under tmp_path, weight paths unset."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("COMET_CACHE_DIR", str(tmp_path / "cache"))
    for k in ("COMET_INCEPTION_WEIGHTS", "COMET_CLIP_DIR", "COMET_R3D_WEIGHTS"):
        monkeypatch.delenv(k, raising=False)
