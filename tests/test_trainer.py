import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_overrides

import trainer
from utils.methods import load_config


def _metrics(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_run_leaves_everything_a_person_needs(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"last.ckpt", "config.yaml", "train.log", "tensorboard", "csv", "samples"} <= names
    assert any(n.startswith("best-epoch") for n in names)
    assert sorted(p.name for p in (tiny_run / "samples").glob("*.png")) == ["epoch0000.png", "epoch0001.png"]
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(tiny_run / "config.yaml").run_name == "tiny"
    assert "never see t" not in (tiny_run / "train.log").read_text()
    rows = _metrics(tiny_run)
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/fm_loss", "train/nce_loss", "train/nce_weight", "train/nce_pos_cos", "train/nce_neg_cos",
            "val/loss", "val/sample_ssim", "val/sample_psnr"} <= logged


def test_checkpoint_loads_with_weights_only_and_holds_the_config(tiny_run):
    ckpt = torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["run_name"] == "tiny"
    assert len(ckpt["hyper_parameters"]["label_values"]) == 4


def test_a_different_config_is_not_written_into_an_existing_run(tiny_run, tiny_data):
    tmp = tiny_run.parent.parent
    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp, **{"data_args.path": tiny_data, "train_args.lr": 0.5}):
        args += ["--set", s]
    before = sorted(p.name for p in tiny_run.iterdir())
    with pytest.raises(SystemExit, match=r"different configuration \(differs in: train_args.lr\)"):
        trainer.main(args)
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_missing_dataset_says_how_to_make_it(tmp_path):
    args = ["--config_path", "configs/comet_camus.yaml", "--set", f"data_args.path={tmp_path}/none.pkl",
            "--set", f"output_dir={tmp_path}/runs"]
    expected = r"(?s)^error: .*none.pkl does not exist.*utils.data.synthetic_echo.*utils.data.camus"
    with pytest.raises(SystemExit, match=expected):
        trainer.main(args)
    assert not (tmp_path / "runs").exists()


def test_the_trainer_lets_cudnn_time_its_kernels(tmp_path, tiny_data, monkeypatch):
    import pytorch_lightning as pl

    class Built(Exception):
        pass

    def trainer_arguments(**kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_arguments)
    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp_path, **{"data_args.path": tiny_data}):
        args += ["--set", s]
    with pytest.raises(Built) as built:
        trainer.main(args)
    assert built.value.args[0]["benchmark"] is True  # fixed shapes: cudnn.benchmark pays once per shape


def test_bad_config_exits_with_the_key():
    with pytest.raises(SystemExit, match="train_args.lr must be > 0"):
        trainer.main(["--config_path", "configs/tiny.yaml", "--set", "train_args.lr=-1"])


def test_effective_batch_is_kept_across_device_counts():
    assert trainer.accumulation_steps(16, 4, 2) == 2
    assert trainer.accumulation_steps(16, 4, 1) == 4
    assert trainer.accumulation_steps(16, 4, 4) == 1
    assert trainer.accumulation_steps(16, 4, 8) == 1


def _cmd(tmp, *extra):
    cmd = [sys.executable, str(ROOT / "trainer.py"), "--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp, **dict(e.split("=", 1) for e in extra)):
        cmd += ["--set", s]
    return cmd


@pytest.mark.slow
def test_seed_config_builds_the_seed_network_and_trains_a_step_on_cpu(tmp_path, tiny_data):
    cmd = [sys.executable, str(ROOT / "trainer.py"), "--config_path", "configs/comet_camus.yaml"]
    for s in [f"data_args.path={tiny_data}", f"output_dir={tmp_path}", "data_args.image_size=32",
              "train_args.max_steps=1", "train_args.max_epochs=1", "train_args.accelerator=cpu",
              "train_args.limit_val_batches=1", "data_args.num_workers=0", "train_args.effective_batch_size=4"]:
        cmd += ["--set", s]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "method flow_matching: 91,554,849 parameters (UNet 64,962,305 + ControlNet 26,592,544)" in out.stderr
    assert "UNet level(s) [0] never see t" in out.stderr  # 32 channels in 32 groups, as the seed's network
    assert (tmp_path / "comet_camus" / "last.ckpt").exists()


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_from_last_checkpoint(tmp_path, tiny_data):
    extra = [f"data_args.path={tiny_data}", "train_args.max_epochs=40"]
    proc = subprocess.Popen(_cmd(tmp_path, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "runs" / "tiny" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and torch.load(last, weights_only=True)["epoch"] >= 1):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)
    assert killed_at["epoch"] >= 1
    out = subprocess.run(_cmd(tmp_path, *extra[:1], "train_args.max_epochs=" + str(killed_at["epoch"] + 2)),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {last} (epoch {killed_at['epoch']}, step {killed_at['global_step']})" in out.stderr
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] > killed_at["global_step"]
    assert resumed["epoch"] == killed_at["epoch"] + 1


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_gathers_the_other_ranks_negatives(tmp_path, tiny_data):
    extra = [f"data_args.path={tiny_data}", "train_args.devices=2", "train_args.max_epochs=1",
             "train_args.effective_batch_size=8"]
    out = subprocess.run(_cmd(tmp_path, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in _metrics(tmp_path / "runs" / "tiny") if r.get("train/nce_keys")]
    assert rows
    # 4 local samples per rank: 8 keys means the other rank's 4 were gathered
    assert all(float(r["train/nce_keys"]) == 8.0 for r in rows)


def test_ema_weights_are_kept_and_used_for_sampling(tmp_path, tiny_data):
    from utils.methods import load_module

    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp_path, **{"data_args.path": tiny_data, "train_args.ema_decay": 0.5,
                                         "train_args.max_epochs": 1}):
        args += ["--set", s]
    assert trainer.main(args) == 0
    ckpt = torch.load(tmp_path / "runs" / "tiny" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    assert int(state["ema.n_averaged"]) == ckpt["global_step"] == 4  # one update per optimizer step
    key = "unet.conv_in.conv.weight"
    assert not torch.equal(state[f"ema.module.{key}"], state[f"model.{key}"])
    module = load_module(tmp_path / "runs" / "tiny" / "last.ckpt")
    assert module.sampling_adapter().model is module.ema.module
    # val/loss, which picks the best checkpoint, was computed with the EMA weights that make the images
    logged = [float(r["val/loss"]) for r in _metrics(tmp_path / "runs" / "tiny") if r.get("val/loss")][-1]
    assert logged == pytest.approx(_val_loss(module, module.ema.module), rel=1e-5)
    assert logged != pytest.approx(_val_loss(module, module.model), rel=1e-3)


def _val_loss(module, network):
    """The validation loss of ``network`` over the whole validation split, computed here independently of
    validation_step: the fixed noise and times per index, the prior, the path, MSE per batch of 4."""
    from utils.data.datamodule import EchoDataModule
    from utils.seeding import fixed_times, noise_for_indices

    val = EchoDataModule(module.cfg.data_args, 4, 0).val_set
    losses = []
    with torch.no_grad():
        for start in range(0, len(val), 4):
            index = torch.arange(start, min(start + 4, len(val)))
            x_1, mask = val.x_1[index], val.mask[index]
            t = fixed_times(index)
            x_0 = module.prior(mask, noise_for_indices(index, (1, 32, 32), module.cfg.train_args.seed))
            x_t = t.view(-1, 1, 1, 1) * x_1 + (1 - t.view(-1, 1, 1, 1)) * x_0
            losses.append(torch.mean((network(x_t, t, mask) - (x_1 - x_0)) ** 2))
    return float(torch.stack(losses).mean())


def test_logged_sample_ssim_is_evaluate_pys_ssim(tiny_run):
    from utils.data.datamodule import EchoDataModule
    from utils.evaluation.metrics import ssim_per_image
    from utils.generation.generate import generate
    from utils.images import to_unit
    from utils.methods import load_module

    module = load_module(tiny_run / "last.ckpt")  # saved after the last epoch's sample grid
    cfg = module.cfg
    val = EchoDataModule(cfg.data_args, 4, 0).val_set
    n, s = cfg.train_args.num_sample_images, cfg.sampling_args
    images = generate(module, val.mask[:n], torch.arange(n), cfg.train_args.seed, s.num_steps, s.sampler, n,
                      ["cpu"], progress=False).images
    logged = [float(r["val/sample_ssim"]) for r in _metrics(tiny_run) if r.get("val/sample_ssim")][-1]
    assert logged == pytest.approx(float(ssim_per_image(images, to_unit(val.x_1[:n])).mean()), abs=1e-6)


def test_a_run_saved_before_a_key_existed_still_resumes(tmp_path):
    import yaml

    from utils.config import config_to_dict

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    old = config_to_dict(cfg)
    del old["sampling_args"]["precision"]  # a key added to the code later, with its default
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert trainer.prepare_run_dir(cfg, config_to_dict(cfg)) is None
