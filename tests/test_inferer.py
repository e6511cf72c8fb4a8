import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import LOWEST_VAL_LOSS, run_with_several_best
from PIL import Image

import inferer
from utils.config import config_diff
from utils.data.masks import load_masks
from utils.generation import generate as generation
from utils.generation.checkpoints import CheckpointError, find_checkpoint
from utils.generation.generate import generate, same_device
from utils.images import to_unit
from utils.methods import load_module
from utils.seeding import noise_for_indices


@pytest.fixture(scope="module")
def module(tiny_run):
    return load_module(find_checkpoint(tiny_run))


@pytest.fixture(scope="module")
def masks(tiny_data):
    return load_masks(tiny_data, "test", 4, 32).masks


def test_find_checkpoint_picks_the_lowest_val_loss_and_last(tiny_run, tmp_path):
    run = run_with_several_best(tiny_run, tmp_path)
    assert find_checkpoint(run) == run / LOWEST_VAL_LOSS
    assert find_checkpoint(run, "last") == run / "last.ckpt"
    with pytest.raises(CheckpointError, match="nope: checkpoint does not exist"):
        find_checkpoint(run / "nope")


def test_one_step_moves_the_prior_by_the_velocity(module, masks):
    ids = torch.arange(len(masks))
    out = generate(module, masks, ids, seed=3, num_steps=1, sampler="euler", batch_size=4, devices=["cpu"],
                   progress=False)
    x_0 = module.prior(masks, noise_for_indices(ids, (1, 32, 32), 3))
    with torch.no_grad():
        v = module.model(x_0, torch.zeros(len(masks)), masks)
    assert v.abs().mean() > 1e-3
    torch.testing.assert_close(out.images, to_unit(x_0 + v), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.images, to_unit(x_0), atol=1e-3)


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("midpoint", 2)])
def test_nfe_is_steps_times_the_method_cost(module, masks, method, per_step):
    out = generate(module, masks[:2], torch.arange(2), 0, 3, method, 2, ["cpu"], progress=False)
    assert out.nfe == 3 * per_step


def test_same_seed_is_bitwise_equal_for_batch_sizes_1_and_8(module, masks):
    m = masks[torch.arange(10) % len(masks)]
    a = generate(module, m, torch.arange(10), 5, 2, "euler", 1, ["cpu"], False, batch_invariant=True)
    b = generate(module, m, torch.arange(10), 5, 2, "euler", 8, ["cpu"], False, batch_invariant=True)
    assert torch.equal(a.images, b.images)
    c = generate(module, m, torch.arange(10), 5, 2, "euler", 8, ["cpu"], False)
    torch.testing.assert_close(c.images, a.images, atol=1e-5, rtol=0)  # batched kernels: float rounding only
    d = generate(module, m, torch.arange(10), 6, 2, "euler", 8, ["cpu"], False)
    assert not torch.allclose(d.images, a.images)


class ZeroField(torch.nn.Module):
    def forward(self, x_t, t, mask):
        return torch.zeros_like(x_t)


def test_with_alpha_the_initial_state_is_the_prior_of_that_mask_and_seed(module, masks):
    assert module.cfg.prior_args.alpha > 0
    real = module.model
    module.model = ZeroField()
    try:
        out = generate(module, masks, torch.arange(len(masks)), 9, 4, "euler", 3, ["cpu"], False)
    finally:
        module.model = real
    eps = noise_for_indices(torch.arange(len(masks)), (1, 32, 32), 9)
    torch.testing.assert_close(out.images, to_unit(module.prior(masks, eps)))
    assert not torch.allclose(out.images, to_unit(eps), atol=1e-3)  # the warm start is really there


def _run(tiny_run, tmp_path, *extra):
    return inferer.main(["--checkpoint", str(tiny_run), "--num_steps", "2", *extra])


def test_cli_writes_every_output(tiny_run, tmp_path):
    out = tmp_path / "out"
    assert _run(tiny_run, tmp_path, "--num_samples", "5", "--output_dir", str(out), "--png", "--format", "pkl") == 0
    z = np.load(out / "samples.npz", allow_pickle=False)
    assert z["images"].shape == (5, 1, 32, 32) and z["images"].dtype == np.float32
    assert 0.0 <= z["images"].min() and z["images"].max() <= 1.0
    assert z["masks"].shape == (5, 1, 32, 32) and z["indices"].tolist() == [0, 1, 2, 3, 4 % 8]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["nfe_per_image"] == 2 and manifest["num_inference_steps"] == 2
    assert (manifest["method"], manifest["sampler"]) == ("flow_matching", "euler")
    assert len(manifest["checkpoint_sha256"]) == 64
    assert manifest["config"]["run_name"] == "tiny"
    assert len(list((out / "png").glob("*.png"))) == 5 and (out / "grid.png").exists()
    from utils.data.dataset_io import load_pickle_safely

    assert len(load_pickle_safely(out / "samples.pkl")["test"]) == 5


def test_masks_cycle_when_more_samples_than_masks(tiny_run, tmp_path):
    out = tmp_path / "out"
    assert _run(tiny_run, tmp_path, "--num_samples", "11", "--output_dir", str(out)) == 0
    z = np.load(out / "samples.npz")
    assert z["indices"].tolist() == [i % 8 for i in range(11)]
    assert not np.array_equal(z["images"][0], z["images"][8])  # same mask, different noise


def test_refuses_a_non_empty_output_dir(tiny_run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        _run(tiny_run, tmp_path, "--num_samples", "1", "--output_dir", str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _png(path, array, mode="L"):
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def test_a_folder_of_png_masks(tiny_run, tmp_path, masks):
    folder = tmp_path / "masks"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"case{i}.png", masks[i, 0].numpy())
    np.save(folder / "case9.npy", masks[3, 0].numpy())
    out = tmp_path / "out"
    assert _run(tiny_run, tmp_path, "--masks", str(folder), "--output_dir", str(out)) == 0
    z = np.load(out / "samples.npz")
    assert z["indices"].tolist() == ["case0.png", "case1.png", "case2.png", "case9.npy"]
    assert np.array_equal(z["masks"][:, 0], masks[:4, 0].numpy())


@pytest.mark.parametrize("bad, message", [
    ("label", r"bad.png: label\(s\) \[9\] outside the model's classes 0..3"),
    ("size", r"bad.png: mask is \(16, 16\).*--resize"),
    ("unreadable", r"bad.png: cannot read label map"),
])
def test_bad_masks_are_named(tiny_run, tmp_path, masks, bad, message):
    folder = tmp_path / "masks"
    folder.mkdir()
    _png(folder / "good.png", masks[0, 0].numpy())
    if bad == "label":
        m = masks[0, 0].numpy().copy()
        m[0, 0] = 9
        _png(folder / "bad.png", m)
    elif bad == "size":
        _png(folder / "bad.png", np.zeros((16, 16)))
    else:
        (folder / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=message):
        _run(tiny_run, tmp_path, "--masks", str(folder), "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_resize_accepts_other_sizes(tiny_run, tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    m = np.zeros((64, 64))
    m[10:40, 20:30] = 1
    _png(folder / "big.png", m)
    out = tmp_path / "out"
    assert _run(tiny_run, tmp_path, "--masks", str(folder), "--resize", "--output_dir", str(out)) == 0
    assert np.load(out / "samples.npz")["masks"].shape == (1, 1, 32, 32)


def test_splitting_over_several_devices_gives_the_same_images(module, masks, monkeypatch):
    # A second device gets its own copy of the model; "cuda:7" stands for it and the copy stays on the
    # CPU, so the two workers really use two distinct model objects, as on two GPUs.
    copies = []

    def copy_on_cpu(m, device):
        copies.append(device)
        return copy.deepcopy(m).eval()

    solves = []  # the model object of every solve (one per image with batch_invariant)
    adapter = type(module).sampling_adapter

    def recording_adapter(self):
        solves.append(id(self))
        return adapter(self)

    monkeypatch.setattr(generation, "_copy_to", copy_on_cpu)
    monkeypatch.setattr(type(module), "sampling_adapter", recording_adapter)
    m = masks[torch.arange(10) % len(masks)]
    one = generate(module, m, torch.arange(10), 2, 2, "euler", 3, ["cpu"], False, batch_invariant=True)
    solves.clear()
    two = generate(module, m, torch.arange(10), 2, 2, "euler", 3, ["cpu", "cuda:7"], False, batch_invariant=True)
    assert copies == ["cuda:7"] and len(set(solves)) == 2
    # chunks of 3 alternate between the devices: the module solves chunks 0 and 2, the copy 1 and 3
    assert solves.count(id(module)) == 6 and len(solves) == 10
    assert torch.equal(one.images, two.images) and two.nfe == 2


def test_same_device_reads_the_spellings_of_one_device(monkeypatch):
    assert same_device("cpu", "cpu") and same_device("cpu", "cpu:0") and same_device(torch.device("cpu"), "cpu:0")
    assert not same_device("cuda:0", "cuda:1") and same_device(torch.device("cuda:1"), "cuda:1")
    assert not same_device("cpu", "cuda") and not same_device("cuda:0", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert same_device("cuda", "cuda:0")  # no CUDA: "cuda" means index 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same_device("cuda", "cuda:1") and not same_device("cuda", "cuda:0")  # "cuda" is the current device


def test_a_module_already_on_the_device_is_not_copied(module, masks, monkeypatch):
    def refuse(m, device):
        raise AssertionError(f"copied the model to {device}, where it already is")

    monkeypatch.setattr(generation, "_copy_to", refuse)
    out = generate(module, masks[:2], torch.arange(2), 0, 1, "euler", 2, ["cpu:0"], False)
    assert out.images.shape == (2, 1, 32, 32)


def test_set_changes_only_the_key_it_names(tiny_run, tiny_data, tmp_path):
    copy = tmp_path / "copy.npz"
    shutil.copy(tiny_data, copy)
    out = tmp_path / "out"
    assert _run(tiny_run, tmp_path, "--num_samples", "1", "--output_dir", str(out),
                "--set", f"data_args.path={copy}") == 0
    trained = load_module(find_checkpoint(tiny_run)).hparams["config"]
    written = json.loads((out / "manifest.json").read_text())["config"]
    assert config_diff(trained, written) == ["data_args.path", "sampling_args.num_steps"]  # and _run's 2 steps
    assert written["data_args"]["path"] == str(copy) and written["data_args"]["image_size"] == 32


def test_set_num_steps_keeps_the_checkpoints_method(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["config"]["sampling_args"]["sampler"] = "midpoint"  # not the default
    torch.save(ckpt, tmp_path / "midpoint.ckpt")
    out = tmp_path / "out"
    assert inferer.main(["--checkpoint", str(tmp_path / "midpoint.ckpt"), "--num_samples", "1",
                         "--output_dir", str(out), "--set", "sampling_args.num_steps=2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["sampling_args"] == {"num_steps": 2, "sampler": "midpoint", "precision": "32-true",
                                                   "guidance_scale": 1.0, "compile": "none"}
    assert manifest["sampler"] == "midpoint" and manifest["nfe_per_image"] == 4


@pytest.mark.parametrize("override", ["model_args.channels=[8,16]", "prior_args.alpha=0.1"])
def test_set_of_a_key_the_network_depends_on_is_refused(tiny_run, tmp_path, override):
    key = override.partition("=")[0]
    with pytest.raises(SystemExit, match=rf"^error: --set {key} cannot change at inference: .*allowed: data_args.path"):
        _run(tiny_run, tmp_path, "--output_dir", str(tmp_path / "out"), "--set", override)
    assert not (tmp_path / "out").exists()


def test_samples_of_the_previous_manifest_layout_read_in_todays_names(tmp_path):
    """Manifests written before the sampler's rename called the sampler ``method`` and the method
    ``generation_method``; read_samples gives today's ``sampler`` and ``method``, and leaves new ones alone."""
    from utils.generation.outputs import read_samples

    np.savez(tmp_path / "samples.npz", images=np.full((2, 1, 8, 8), 0.5, np.float32),
             masks=np.zeros((2, 1, 8, 8), np.uint8), indices=np.arange(2))
    (tmp_path / "manifest.json").write_text(json.dumps({"method": "ddim", "generation_method": "ddpm"}))
    manifest = read_samples(tmp_path / "samples.npz")[3]
    assert (manifest["method"], manifest["sampler"]) == ("ddpm", "ddim") and "generation_method" not in manifest
    (tmp_path / "manifest.json").write_text(json.dumps({"method": "spade", "sampler": "generator"}))
    assert read_samples(tmp_path / "samples.npz")[3] == {"method": "spade", "sampler": "generator"}
