"""Med-DT-FM through the command lines on the tiny config: stage 0 + stage 1 with trainer.py, the checkpoint alone
rebuilding the method (segmenter and feature statistics included), noise-based and reference-guided inference."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, tiny_overrides

import trainer
from utils.data.masks import load_masks
from utils.generation.checkpoints import read_checkpoint
from utils.generation.generate import generate
from utils.methods import load_module
from utils.methods.med_dt_fm.module import MedDTFMModule

pytestmark = pytest.mark.slow
EPOCHS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """trainer.main on configs/meddtfm_tiny.yaml: stage 0, then 4 epochs of 4 micro-batches (16 images, batch 4,
    effective batch 8: 2 generator steps per epoch), EMA on, the adversarial term from epoch 2."""
    tmp = tmp_path_factory.mktemp("meddtfm")
    seen = {}

    class Recording(pl.Trainer):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(**kwargs)

    overrides = tiny_overrides(tmp, **{"data_args.path": tiny_data, "train_args.max_epochs": EPOCHS,
                                       "train_args.effective_batch_size": 8, "train_args.ema_decay": 0.5})
    args = ["--config_path", "configs/meddtfm_tiny.yaml"] + [a for s in overrides for a in ("--set", s)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pl, "Trainer", Recording)
        assert trainer.main(args) == 0
    return tmp / "runs" / "meddtfm_tiny", seen


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_meddtfm_tiny_fit(run):
    run_dir, seen = run
    assert seen["accumulate_grad_batches"] == 1 and seen["gradient_clip_val"] is None
    log = (run_dir / "train.log").read_text()
    assert "stage 0: segmenter validation foreground Dice" in log and "x 2 accumulation = 8" in log
    rows = metrics(run_dir)
    dt = [float(r["train/dt_loss"]) for r in rows if r.get("train/dt_loss")]
    fm = [float(r["train/fm_loss"]) for r in rows if r.get("train/fm_loss")]
    adv = [float(r["train/g_adv"]) for r in rows if r.get("train/g_adv")]
    assert len(dt) == len(fm) == 4 * EPOCHS and all(math.isfinite(x) for x in dt + fm + adv)
    assert np.mean(dt[-4:]) < np.mean(dt[:4])  # the projections learn the standardised targets
    assert adv  # the adversarial term ran (epochs 2 and 3, where t >= 0.5)
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [f"epoch{e:04d}.png" for e in range(EPOCHS)]
    ckpt = read_checkpoint(run_dir / "last.ckpt")
    assert ckpt["global_step"] == 2 * 2 * EPOCHS and int(ckpt["state_dict"]["ema.n_averaged"]) == 2 * EPOCHS


def test_checkpoint_roundtrip(run, tiny_data):
    run_dir, _ = run
    ckpt = read_checkpoint(run_dir / "last.ckpt")  # torch.load(weights_only=True)
    module = load_module(run_dir / "last.ckpt")
    assert isinstance(module, MedDTFMModule) and module.sampling_network() is module.ema.module
    state = module.state_dict()
    for key in ("encoder.final.weight", "encoder.encoder.0.1.running_mean", "feature_mean_4", "feature_std_1",
                "segmenter_val_dice"):
        assert torch.equal(state[key], ckpt["state_dict"][key])
    assert not torch.equal(module.feature_std_1, torch.ones_like(module.feature_std_1))  # measured in stage 0
    masks = load_masks(tiny_data, "test", 4, 32).masks
    m = masks[torch.arange(6) % len(masks)]
    a = generate(module, m, torch.arange(6), 5, 3, "euler", 1, ["cpu"], False)
    b = generate(module, m, torch.arange(6), 5, 3, "euler", 4, ["cpu"], False)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
    assert a.nfe == 3


def test_inferer_reference_guided(run, tiny_data, tmp_path):
    import inferer
    from utils.data.dataset_io import load_dataset
    from utils.files import sha256_file

    run_dir, _ = run
    out = tmp_path / "ref"
    args = ["--checkpoint", str(run_dir), "--which", "last", "--num_samples", "3", "--reference", str(tiny_data)]
    assert inferer.main(args + ["--t0", "0.5", "--output_dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference"]["t0"] == 0.5 and manifest["nfe_per_image"] == 2  # round(0.5 * 3)
    assert manifest["reference"]["sha256"] == {tiny_data.name: sha256_file(tiny_data)}
    assert manifest["reference"]["ids"] == [0, 1, 2] and manifest["reference"]["feature_guidance"] == 0
    guided = tmp_path / "guided"
    assert inferer.main(args + ["--t0", "0.5", "--feature_guidance", "0.25", "--output_dir", str(guided)]) == 0
    assert json.loads((guided / "manifest.json").read_text())["reference"]["feature_guidance"] == 0.25
    assert not np.array_equal(np.load(guided / "samples.npz")["images"], np.load(out / "samples.npz")["images"])
    assert inferer.main(args + ["--t0", "1", "--output_dir", str(tmp_path / "t1")]) == 0
    images = np.load(tmp_path / "t1" / "samples.npz")["images"]
    test_images = np.stack([np.asarray(r["image"], dtype=np.float32) / 255 for r in load_dataset(tiny_data)["test"]])
    np.testing.assert_allclose(images, test_images[:3].reshape(images.shape), atol=1e-6)
    with pytest.raises(SystemExit, match="--t0 needs --reference"):
        inferer.main(["--checkpoint", str(run_dir), "--t0", "0.5"])


def test_reference_closer_than_noise(run, tiny_data):
    """After a short fit (at initialisation v = 0 would make this trivial): starting towards the reference keeps
    the sample closer to it than noise-based sampling, more so the later the start."""
    from utils.data.dataset_io import load_dataset

    run_dir, _ = run
    module = load_module(run_dir / "last.ckpt")
    records = load_dataset(tiny_data)["valid"]
    reference = torch.from_numpy(np.stack([np.asarray(r["image"], dtype=np.float32) / 255 for r in records]))
    reference = reference.reshape(len(records), 1, 32, 32)
    masks = torch.from_numpy(np.stack([np.asarray(r["mask"], dtype=np.uint8) for r in records]))
    masks = masks.reshape(len(records), 1, 32, 32)
    ids = torch.arange(len(records))
    with torch.no_grad():
        v = module.sampling_network()(torch.randn(2, 1, 32, 32), torch.full((2,), 0.5), masks[:2])
    assert v.abs().mean() > 1e-3  # trained: not the zero field of initialisation

    def error(t0: float | None) -> float:
        refs = None if t0 is None else reference * 2 - 1
        out = generate(module, masks, ids, 0, 10, "euler", 8, ["cpu"], False, references=refs, t0=t0 or 0.0)
        return float(((out.images - reference) ** 2).mean())

    noise_based = error(None)
    guided = [error(t0) for t0 in (0.3, 0.5, 0.7, 0.9)]
    assert guided[0] < noise_based and all(b <= a for a, b in zip(guided, guided[1:]))
    assert error(0.0) == noise_based


def test_evaluate_runs_on_a_meddtfm_checkpoint(run, tmp_path, no_metric_weights):
    import evaluate

    run_dir, _ = run
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(run_dir), "--skip_missing_metrics", "--num_samples", "8",
                          "--n_boot", "20", "--no-comparison", "--output_dir", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"]["ssim"]["n"] == 8


def test_ddp_with_two_cpu_processes(tmp_path, tiny_data):
    """Each rank runs stage 0. In epoch 0 the adversarial term is off (D unused), in epoch 1 a rank may have no
    t >= 0.5 sample: DDP (find_unused_parameters off) must still get a gradient for every trained parameter."""
    sets = tiny_overrides(tmp_path, **{"data_args.path": tiny_data, "train_args.devices": 2,
                                       "train_args.max_epochs": 2, "train_args.effective_batch_size": 16})
    cmd = [sys.executable, "trainer.py", "--config_path", "configs/meddtfm_tiny.yaml"]
    cmd += [a for s in sets for a in ("--set", s)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "meddtfm_tiny" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # per epoch 16 images = 4 per process x 2 processes x 2 micro-batches: G and D
