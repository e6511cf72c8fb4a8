"""3-D volumes on the model side: the 3-D prior blur, the network, the contrastive term, the memory check, the
methods that refuse volumes, and a tiny fit + sample through trainer.py and inferer.py with NIfTI out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import time_effect, tiny_overrides

from utils.config import ConfigError
from utils.methods import load_config
from utils.methods.flow_matching.prior import gaussian_blur, gaussian_kernel1d, warm_start_prior

TINY_3D = "configs/tiny_3d.yaml"
N = 16  # tiny_3d's image_size


def outer_kernel(kernel_size: int, sigmas: tuple[float, float, float]) -> torch.Tensor:
    """The 3-D Gaussian kernel (1, 1, k, k, k) as the outer product of the three axes' 1-D kernels."""
    kd, kh, kw = (gaussian_kernel1d(kernel_size, s).double() for s in sigmas)
    return (kd[:, None, None] * kh[None, :, None] * kw[None, None, :])[None, None]


# --- the prior ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_3d_blur_equals_one_conv3d_with_the_outer_product_kernel(padding):
    x = torch.randn(2, 1, 9, 10, 11, generator=torch.Generator().manual_seed(0))
    k = 5
    if padding == "zeros":
        expected = F.conv3d(x.double(), outer_kernel(k, (1.3,) * 3), padding=k // 2)
    else:
        expected = F.conv3d(F.pad(x.double(), (k // 2,) * 6, mode="reflect"), outer_kernel(k, (1.3,) * 3))
    assert torch.allclose(gaussian_blur(x, k, 1.3, padding).double(), expected, atol=1e-6)


def test_anisotropic_spacing_blurs_each_axis_with_sigma_times_finest_over_its_spacing():
    x = torch.randn(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    spacing, sigma, k = (3.0, 1.0, 1.5), 2.4, 7
    per_axis = (sigma * 1.0 / 3.0, sigma, sigma / 1.5)  # min(spacing) = 1
    expected = F.conv3d(F.pad(x.double(), (k // 2,) * 6, mode="reflect"), outer_kernel(k, per_axis))
    assert torch.allclose(gaussian_blur(x, k, sigma, spacing=spacing).double(), expected, atol=1e-6)
    assert not torch.allclose(gaussian_blur(x, k, sigma).double(), expected, atol=1e-3)  # isotropic differs


def test_anisotropic_spacing_narrows_the_blur_along_the_coarse_axis():
    impulse = torch.zeros(1, 1, 31, 31, 31)
    impulse[..., 15, 15, 15] = 1.0
    out = gaussian_blur(impulse, 31, 3.0, "zeros", spacing=(3.0, 1.0, 1.0))[0, 0].double()
    r = torch.arange(31, dtype=torch.float64) - 15

    def variance(axis: int) -> float:
        profile = out.sum(dim=tuple(a for a in range(3) if a != axis))
        return float((profile * r**2).sum() / profile.sum())

    assert variance(0) == pytest.approx(1.0, rel=0.02)  # (3 * 1 / 3)^2
    assert variance(1) == pytest.approx(9.0, rel=0.02) and variance(2) == pytest.approx(9.0, rel=0.02)


def test_alpha_zero_prior_is_randn_bit_for_bit():
    eps = torch.randn(2, 1, N, N, N, generator=torch.Generator().manual_seed(2))
    mask = torch.randint(0, 4, (2, 1, N, N, N), dtype=torch.uint8)
    out = warm_start_prior(mask, eps, 0.0, 5, 1.0, torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert out is eps


def test_3d_prior_blurs_across_slices_unlike_a_stack_of_2d_priors():
    mask = torch.zeros(1, 1, 9, 12, 12, dtype=torch.uint8)
    mask[0, 0, 4, 3:9, 3:9] = 1  # one labelled slice
    values, eps = torch.tensor([0.0, 1.0]), torch.zeros(1, 1, 9, 12, 12)
    prior3d = warm_start_prior(mask, eps, 0.5, 5, 1.5, values)
    stacked = torch.stack([warm_start_prior(mask[:, :, d], eps[:, :, d], 0.5, 5, 1.5, values)
                           for d in range(9)], dim=2)
    assert stacked[0, 0, 3].abs().max() == 0 and stacked[0, 0, 5].abs().max() == 0
    assert prior3d[0, 0, 3].max() > 0.05 and prior3d[0, 0, 5].max() > 0.05  # structure on the neighbours
    assert prior3d[0, 0, 4].max() < stacked[0, 0, 4].max()  # and the labelled slice lost some to them


def test_3d_mask_is_nearest_resized_to_the_noise_grid():
    mask = torch.randint(0, 3, (1, 1, 4, 4, 4), dtype=torch.uint8)
    eps, values = torch.randn(1, 1, 8, 8, 8), torch.tensor([-1.0, 0.2, 1.0])
    up = mask.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert torch.equal(warm_start_prior(mask, eps, 0.3, 3, 1.0, values), warm_start_prior(up, eps, 0.3, 3, 1.0, values))


# --- network, contrastive term, config ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode,mask_input", [("mask", "scalar"), ("mask", "one_hot"), ("mask+class", "one_hot")])
def test_tiny_3d_network_maps_volumes_to_volumes(mode, mask_input):
    from utils.config import ConditioningConfig
    from utils.methods.networks import build_model

    cfg = load_config(TINY_3D)
    torch.manual_seed(0)
    classes = {"classes": torch.tensor([1, -1])} if "class" in mode else {}
    model = build_model(cfg.model_args, 4, ConditioningConfig(mode=mode, mask_input=mask_input, mask_dropout=0.1),
                        num_image_classes=2 if classes else 0)
    x, mask = torch.randn(2, 1, N, N, N), torch.randint(0, 4, (2, 1, N, N, N))
    kept = torch.tensor([[True] * 4, [False] * 4])
    v = model(x, torch.tensor([0.2, 0.7]), mask, labels_kept=kept, **classes)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_one_hot_mask_input_of_a_volume_has_one_channel_per_label_and_drops_labels_not_kept():
    from utils.methods.networks import mask_input

    mask = torch.randint(0, 4, (2, 1, 3, 4, 5))
    cond = mask_input(mask, 4, "one_hot", torch.tensor([[True, True, False, True], [False] * 4]))
    assert cond.shape == (2, 4, 3, 4, 5)
    for c in (0, 1, 3):
        assert torch.equal(cond[0, c], (mask[0, 0] == c).float() + (c == 0) * (mask[0, 0] == 2).float())
    assert cond[0, 2].abs().max() == 0 and cond[1].abs().max() == 0  # label 2 -> background; none kept -> null


def test_tiny_3d_time_embedding_survives_the_group_norm():
    """8 groups on 8 channels normalise each channel alone and erase the time embedding added to it."""
    assert time_effect(TINY_3D) > 1e-3
    assert time_effect(TINY_3D, ["model_args.norm_num_groups=8"]) < 1e-5


def test_contrastive_loss_on_volumes_equals_the_loss_on_their_flattened_images():
    from losses.contrastive_flow import contrastive_velocity_loss

    g = torch.Generator().manual_seed(3)
    v, x_0, x_t, k0, k1 = (torch.randn(4 if i < 3 else 6, 1, 4, 5, 6, generator=g) for i in range(5))
    t, positive = torch.rand(4, generator=g), torch.tensor([0, 1, 2, 3])
    for target in ("velocity", "same_noise", "denoised"):
        vol = contrastive_velocity_loss(target, v, x_0, x_t, t, k0, k1, positive, 0.1).loss
        flat = [a.reshape(a.shape[0], 1, 20, 6) for a in (v, x_0, x_t, k0, k1)]
        img = contrastive_velocity_loss(target, *flat[:3], t, *flat[3:], positive, 0.1).loss
        assert torch.allclose(vol, img, atol=1e-6), target


@pytest.mark.parametrize("config", ["configs/ddpm_quickstart.yaml", "configs/spade_quickstart.yaml",
                                    "configs/meddtfm_tiny.yaml"])
def test_other_methods_refuse_3d_naming_the_key(config):
    with pytest.raises(ConfigError, match=r"model_args\.spatial_dims 3 \(volumes\) is only supported by method "
                                          r"flow_matching"):
        load_config(config, ["model_args.spatial_dims=3"])


def test_spacing_needs_one_entry_per_axis():
    with pytest.raises(ConfigError, match=r"prior_args\.spacing needs one entry per spatial axis \(3\)"):
        load_config(TINY_3D, ["prior_args.spacing=[1.0, 2.0]"])
    assert load_config(TINY_3D, ["prior_args.spacing=[3.0, 1.0, 1.0]"]).prior_args.spacing == (3.0, 1.0, 1.0)


def test_volumes_smaller_than_the_3d_ssim_window_are_refused_naming_the_key():
    from utils.config import read_yaml_mapping
    from utils.methods import config_from_dict

    values = read_yaml_mapping(TINY_3D)
    values["data_args"] = {**values["data_args"], "image_size": 8, "synthetic": None}  # a data file of 8^3 volumes
    with pytest.raises(ConfigError, match=r"data_args\.image_size must be >= 16 for volumes .* got 8"):
        config_from_dict(values)
    values["model_args"] = {**values["model_args"], "spatial_dims": 2}
    assert config_from_dict(values).data_args.image_size == 8  # images of 8 x 8 may be


# --- memory ------------------------------------------------------------------------------------------------------
def tiny_module(overrides=()):
    from utils.methods.flow_matching.module import FlowMatchingModule

    return FlowMatchingModule(load_config(TINY_3D, list(overrides)), [-1.0, -0.3, 0.3, 1.0])


def test_memory_estimate_grows_with_the_volume_and_the_batch():
    """Convolutions save 8x the bytes at 2x the side; attention's (tokens x tokens) weights, as the math path
    saves them (MONAI's middle block always attends), 64x."""
    from utils.methods.memory import estimate_training_memory

    small = estimate_training_memory(tiny_module())
    big = estimate_training_memory(tiny_module(["data_args.image_size=32"]))
    batch = estimate_training_memory(tiny_module(["train_args.batch_size=4"]))
    assert small.parameters == big.parameters == batch.parameters == 65_457
    assert small.state_bytes == 16 * 65_457
    assert 8 < big.activation_bytes / small.activation_bytes < 64
    assert 1.9 < batch.activation_bytes / small.activation_bytes < 2.1


def test_memory_check_refuses_a_too_large_volume_naming_its_size():
    from utils.methods.memory import check_training_memory

    module = tiny_module(["data_args.image_size=64", "train_args.memory_limit_gb=0.05"])
    with pytest.raises(ConfigError, match=r"data_args\.image_size 64 \(64\^3 voxels\) with train_args\.batch_size 2 "
                                          r"needs about [0-9.]+ GiB .*train_args\.memory_limit_gb"):
        check_training_memory(module, "cpu")
    check_training_memory(tiny_module(["train_args.memory_limit_gb=0.05"]), "cpu")  # 16^3 fits


# --- a tiny fit, sampling and NIfTI out ------------------------------------------------------------------------------
def phantom_record(rng: np.random.Generator, patient: str, n: int = N) -> dict:
    """A ball (label 1) with a core (label 2) and a slab (label 3) in a noisy volume; image brighter by label."""
    z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2 - rng.uniform(-2, 2, 3)[:, None, None, None]
    r = np.sqrt(z**2 + y**2 + x**2)
    mask = np.where(r < n / 3, 1, 0) + (r < n / 6)
    mask[: n // 4] = np.where(mask[: n // 4] == 0, 3, mask[: n // 4])
    image = 0.2 + 0.25 * mask + rng.normal(0, 0.03, mask.shape)
    return {"image": np.clip(image, 0, 1)[None].astype(np.float32), "mask": mask[None].astype(np.uint8),
            "metadata": {"patient": patient}}


def test_memory_check_measures_this_ranks_gpu_and_names_the_override(monkeypatch):
    """Under torchrun every rank measures its own GPU (LOCAL_RANK), not cuda:0; a refusal on measured free memory
    names train_args.memory_limit_gb, the way past an estimate that errs high."""
    from utils.methods import memory

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (asked.append(device), (2**20, 2**30))[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    free, source = memory.available_memory("gpu", 0.0)
    assert asked == [3] and free == 2**20 and "cuda:3" in source
    with pytest.raises(ConfigError, match=r"more than the 0\.00 GiB of free memory of Fake GPU .*set "
                                          r"train_args\.memory_limit_gb"):
        memory.check_training_memory(tiny_module(), "gpu")


@pytest.fixture(scope="module")
def tiny_3d_run(tmp_path_factory):
    import trainer
    from utils.data.dataset_io import save_dataset

    tmp = tmp_path_factory.mktemp("tiny3d")
    rng = np.random.default_rng(0)
    data = {split: [phantom_record(rng, f"{split}{i}") for i in range(count)]
            for split, count in (("train", 4), ("valid", 2), ("test", 2))}
    save_dataset(tmp / "data.npz", data)
    args = ["--config_path", TINY_3D]
    for s in tiny_overrides(tmp):
        args += ["--set", s]
    assert trainer.main(args) == 0
    return tmp


def test_tiny_3d_fit_writes_mid_slice_sample_grids_and_logs_its_memory(tiny_3d_run):
    run = tiny_3d_run / "runs" / "tiny_3d"
    assert (run / "last.ckpt").is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["epoch0000.png", "epoch0001.png"]
    log = (run / "train.log").read_text()
    assert "memory: a training step at 16^3 voxels, batch 2, needs about" in log
    assert re.search(r"epoch 1: sample grid .*epoch0001\.png \(SSIM \d\.\d{3}, PSNR \d+\.\d\d dB on 2 validation", log)


def test_logged_sample_ssim_of_volumes_is_evaluate_pys_3d_ssim(tiny_3d_run):
    """val/sample_ssim of a 3-D run is the per-volume 3-D SSIM evaluate.py reports, not the 2-D SSIM of the
    volumes' mid-slices."""
    import csv

    from utils.data.datamodule import EchoDataModule
    from utils.evaluation.volume_metrics import ssim_per_volume
    from utils.generation.generate import generate
    from utils.images import to_unit
    from utils.methods import load_module

    run = tiny_3d_run / "runs" / "tiny_3d"
    module = load_module(run / "last.ckpt")  # saved after the last epoch's sample grid
    cfg = module.cfg
    val = EchoDataModule(cfg.data_args, 2, 0, spatial_dims=3).val_set
    n, s = cfg.train_args.num_sample_images, cfg.sampling_args
    images = generate(module, val.mask[:n], torch.arange(n), cfg.train_args.seed, s.num_steps, s.sampler, n,
                      ["cpu"], progress=False).images
    with open(run / "csv" / "metrics.csv") as f:
        logged = [float(r["val/sample_ssim"]) for r in csv.DictReader(f) if r.get("val/sample_ssim")][-1]
    assert logged == pytest.approx(float(ssim_per_volume(images, to_unit(val.x_1[:n])).mean()), abs=1e-6)


def test_inferer_writes_volumes_from_the_dataset_split(tiny_3d_run):
    import inferer

    out = tiny_3d_run / "from_split"
    assert inferer.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--num_samples", "3",
                         "--output_dir", str(out)]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (3, 1, N, N, N) and z["images"].dtype == np.float32
        assert z["masks"].shape == (3, 1, N, N, N) and z["masks"].dtype == np.uint8
        assert 0 <= z["images"].min() and z["images"].max() <= 1
    assert sorted(p.name for p in (out / "png").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "grid.png").is_file() and manifest["num_samples"] == 3
    assert manifest["batch_size"] == 1  # volumes one at a time by default, as evaluate.py (64 of 96^3: GPU OOM)
    from utils.data.nifti import read_volume

    image, affine = read_volume(out / "nifti" / "00002_image.nii.gz")
    assert image.shape == (N, N, N) and np.array_equal(affine, np.eye(4))  # the records carry no affine


def test_evaluate_on_a_3d_checkpoint_makes_one_volume_per_test_mask_by_default(tiny_3d_run, no_metric_weights):
    import evaluate

    out = tiny_3d_run / "evaluated"
    assert evaluate.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--num_steps", "1",
                          "--skip_missing_metrics", "--n_boot", "10", "--no-comparison", "--output_dir",
                          str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert results["num_samples"] == results["num_masks"] == 2  # the test split's two masks, not 2000 volumes
    m = results["metrics"]
    assert m["ssim"]["n"] == 2 and "mmd" in m and "skipped" in m["fid_3d"] and "skipped" in m["ms_ssim"]


@pytest.mark.slow
def test_evaluate_compares_volumes_with_3d_radiomics_and_says_why_there_is_no_oracle(tiny_3d_run,
                                                                                     no_metric_weights):
    """3 volumes per test mask: FRD on 3-D radiomic features, the voxel std among a mask's volumes, the mean-of-K
    row; these hand-made volumes are no built-in phantom, so no oracle row, and the reason is recorded."""
    import evaluate

    out = tiny_3d_run / "compared"
    assert evaluate.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--num_steps", "1",
                          "--samples_per_mask", "3", "--skip_missing_metrics", "--n_boot", "10",
                          "--no-memorisation", "--output_dir", str(out)]) == 0
    c = json.loads((out / "metrics.json").read_text())["comparison"]
    assert "no data_args.synthetic" in c["oracle"] and list(c["rows"]) == ["samples", "mean_of_k", "real", "constant"]
    samples = c["rows"]["samples"]
    assert samples["frd_v0"]["n"] == 2 and samples["pixel_std"]["k"] == 3 and "pairwise_dissimilarity" not in samples
    assert "k-NN balls" in samples["precision"]["skipped"]  # 2 volumes per row, 4 in the training split
    assert c["rows"]["mean_of_k"]["ssim"]["n"] == 2 and c["rows"]["real"]["frd_v1"]["n"] == 2
    assert c["rows"]["constant"]["ssim"]["n"] == 2 and "HD95 in voxels" in (out / "report.md").read_text()


def test_evaluate_writes_each_volume_with_its_source_records_affine(tiny_3d_run, no_metric_weights):
    """evaluate.py's generated NIfTI files carry the affine of the record whose mask made them, in mm, as the
    inferer's do; not the identity."""
    import nibabel as nib

    import evaluate
    from utils.data.dataset_io import load_dataset, save_dataset
    from utils.data.nifti import read_volume

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.5]
    data = {s: [{**r, "affine": affine} for r in recs] for s, recs in load_dataset(tiny_3d_run / "data.npz").items()}
    save_dataset(tiny_3d_run / "with_affine.npz", data)
    out = tiny_3d_run / "evaluated_affine"
    assert evaluate.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--num_steps", "1",
                          "--data_path", str(tiny_3d_run / "with_affine.npz"), "--skip_missing_metrics",
                          "--n_boot", "10", "--no-memorisation", "--no-comparison", "--output_dir", str(out)]) == 0
    for stem in ("00000_image", "00001_mask"):
        path = out / "samples" / "nifti" / f"{stem}.nii.gz"
        assert np.array_equal(read_volume(path)[1], affine)
        assert nib.load(path).header.get_xyzt_units()[0] == "mm"


def test_inferer_nifti_masks_of_another_grid_give_volumes_on_that_grid_with_its_affine(tiny_3d_run):
    import inferer
    from utils.data.nifti import read_volume, write_volume

    masks = tiny_3d_run / "nifti_masks"
    affine = np.array([[0.0, -1.2, 0.0, 40.0], [2.5, 0.0, 0.0, -7.0], [0.0, 0.0, 0.9, 3.5], [0, 0, 0, 1]])
    source = phantom_record(np.random.default_rng(5), "x", n=24)["mask"][0, :20]  # 20 x 24 x 24
    write_volume(masks / "case_a.nii.gz", source, affine, labels=True)
    write_volume(masks / "case_b.nii.gz", phantom_record(np.random.default_rng(6), "y")["mask"][0],
                 np.diag([2.0, 2.0, 3.0, 1.0]), labels=True)
    out = tiny_3d_run / "from_nifti"
    assert inferer.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--masks", str(masks),
                         "--output_dir", str(out), "--set", "sampling_args.num_steps=1"]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (2, 1, N, N, N) and list(z["indices"]) == ["case_a", "case_b"]
    image, image_affine = read_volume(out / "nifti" / "00000_image.nii.gz")
    mask, mask_affine = read_volume(out / "nifti" / "00000_mask.nii.gz")
    assert image.shape == mask.shape == (20, 24, 24)
    input_affine = read_volume(masks / "case_a.nii.gz")[1]  # as NIfTI stores it (float32)
    assert np.allclose(input_affine, affine, atol=1e-6)
    assert np.array_equal(image_affine, input_affine) and np.array_equal(mask_affine, input_affine)
    assert np.array_equal(mask, source)  # the source mask itself, on its own grid
    image_b, affine_b = read_volume(out / "nifti" / "00001_image.nii.gz")
    assert image_b.shape == (N, N, N) and np.array_equal(affine_b, np.diag([2.0, 2.0, 3.0, 1.0]))


def test_inferer_export_of_volumes_keeps_each_volumes_affine_on_the_model_grid(tiny_3d_run):
    """An exported synthetic set of volumes carries each volume's geometry: the affine of its mask fitted to the
    model's grid (fit_mask), so it can be written back as NIfTI where its source mask lies."""
    import inferer
    from utils.data.dataset_io import load_dataset
    from utils.data.nifti import read_volume, write_volume
    from utils.data.resample import fit_mask

    masks = tiny_3d_run / "export_masks"
    affine = np.array([[0.0, -1.2, 0.0, 40.0], [2.5, 0.0, 0.0, -7.0], [0.0, 0.0, 0.9, 3.5], [0, 0, 0, 1]])
    write_volume(masks / "a.nii.gz", phantom_record(np.random.default_rng(5), "x", n=24)["mask"][0, :20], affine,
                 labels=True)
    out = tiny_3d_run / "exported.npz"
    assert inferer.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--masks", str(masks),
                         "--export", str(out), "--set", "sampling_args.num_steps=1"]) == 0
    source, source_affine = read_volume(masks / "a.nii.gz")
    fitted, fitted_affine = fit_mask(source[None], source_affine, N)
    record = load_dataset(out)["train"][0]
    assert np.array_equal(record["mask"], fitted) and np.allclose(record["affine"], fitted_affine)


def test_inferer_refuses_2d_label_maps_for_a_3d_model(tmp_path):
    from utils.data.masks import MaskError, load_masks

    np.save(tmp_path / "a.npy", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(MaskError, match="the model makes volumes"):
        load_masks(tmp_path, "test", 4, N, spatial_dims=3)


def test_inferer_refuses_nifti_masks_for_a_2d_model_naming_why(tmp_path):
    from utils.data.masks import MaskError, load_masks
    from utils.data.nifti import write_volume

    write_volume(tmp_path / "a.nii.gz", np.zeros((N, N, N), np.uint8), np.eye(4), labels=True)
    with pytest.raises(MaskError, match=r"a.nii.gz\), the model makes 2-D images \(model_args.spatial_dims 2\)"):
        load_masks(tmp_path, "test", 4, N, spatial_dims=2)


def test_mid_slices_are_the_three_orthogonal_planes_through_the_centre():
    from utils.images import mid_slices

    v = torch.arange(4 * 6 * 6, dtype=torch.float32).view(1, 1, 4, 6, 6)
    planes = mid_slices(v)
    assert planes.shape == (1, 3, 6, 6)
    assert torch.equal(planes[0, 0], v[0, 0, 2])
    assert torch.equal(planes[0, 1, 1:5], v[0, 0, :, 3])  # [D, W] centred in 6 x 6
    assert torch.equal(planes[0, 2, 1:5], v[0, 0, :, :, 3]) and planes[0, 2, 0].abs().max() == 0


def test_every_3d_config_loads():
    for path in sorted(Path("configs").glob("*3d.yaml")):
        assert load_config(path).model_args.spatial_dims == 3, path


def test_trainer_refuses_a_volume_over_the_memory_limit_before_writing_anything(tiny_3d_run):
    import trainer

    out = tiny_3d_run / "refused"
    args = ["--config_path", TINY_3D]
    for s in tiny_overrides(tiny_3d_run, **{"output_dir": str(out), "train_args.memory_limit_gb": 0.001}):
        args += ["--set", s]
    with pytest.raises(SystemExit, match=r"error: data_args\.image_size 16 \(16\^3 voxels\) with "
                                         r"train_args\.batch_size 2 needs about"):
        trainer.main(args)
    assert not out.exists()


def test_unfit_image_takes_a_volume_made_for_a_fitted_mask_back_onto_the_mask_grid():
    """A 'generated' volume that is the fitted mask's own labels, taken back, matches the source mask voxel by
    voxel (but for boundary voxels); shifted by one voxel of the cube it would not."""
    from utils.data.resample import fit_mask, unfit_image

    source = phantom_record(np.random.default_rng(7), "z", n=24)["mask"][:, :20]  # [1, 20, 24, 24]
    affine = np.diag([2.0, 1.0, 1.2, 1.0])  # anisotropic: padded to a physical cube first
    fitted, _ = fit_mask(source, affine, N)
    volume = torch.from_numpy(fitted.astype(np.float32))
    back = unfit_image(volume, source.shape[1:], affine)
    assert back.shape == source.shape
    agree = (back.round().numpy() == source).mean()
    shifted = unfit_image(torch.roll(volume, 1, dims=1), source.shape[1:], affine)
    assert agree > 0.9 and agree > (shifted.round().numpy() == source).mean() + 0.02


def test_evaluate_writes_its_volumes_with_their_records_world_grid(tiny_3d_run, no_metric_weights):
    import evaluate
    from utils.data.nifti import read_volume
    from utils.data.nifti_folder import save_nifti_folder
    from utils.data.resample import fit_mask

    rng = np.random.default_rng(3)
    affine = np.array([[0.0, -1.2, 0.0, 40.0], [2.5, 0.0, 0.0, -7.0], [0.0, 0.0, 0.9, 3.5], [0, 0, 0, 1]])
    records = {split: [{**phantom_record(rng, f"{split}{i}", n=20), "affine": affine} for i in range(2)]
               for split in ("train", "test")}
    data = save_nifti_folder(tiny_3d_run / "nifti_data", records)
    out = tiny_3d_run / "eval_nifti"
    assert evaluate.main(["--checkpoint", str(tiny_3d_run / "runs" / "tiny_3d"), "--data_path", str(data),
                          "--num_samples", "2", "--num_steps", "1", "--skip_missing_metrics", "--no-comparison",
                          "--output_dir", str(out)]) == 0
    stored = read_volume(data / "test" / "masks" / "test1.nii.gz")[1]  # as NIfTI keeps it (float32)
    mask, fitted = fit_mask(records["test"][1]["mask"], stored, N)
    volume, written = read_volume(out / "samples" / "nifti" / "00001_mask.nii.gz")
    assert np.allclose(written, fitted, atol=1e-5) and not np.allclose(written, np.eye(4))
    assert np.array_equal(volume, mask[0])


def test_mid_slice_tiles_and_the_2p5d_fid_name_each_plane_alike():
    """The PNG labels and the 2.5-D FID share one plane vocabulary, and the tile called P is the middle slice of
    plane P. The phantom's axes are RAS (d left-right): the slice at a fixed d is sagittal, so no tile may be
    called axial for it (the old labels called the fixed-d slice axial)."""
    from utils.evaluation.volume_metrics import plane_slices
    from utils.generation.outputs import MID_SLICE_LABELS
    from utils.images import PLANES, mid_slices

    v = torch.arange(6 * 6 * 6, dtype=torch.float32).view(1, 1, 6, 6, 6)
    tiles = mid_slices(v)
    for k, plane in enumerate(PLANES):
        assert torch.equal(tiles[0, k], plane_slices(v, plane)[3, 0])
    assert MID_SLICE_LABELS == [f"mask {p}" for p in PLANES] + list(PLANES)
    assert not any("axial" in label for label in MID_SLICE_LABELS)


def test_prior_spacing_must_be_the_spacing_of_the_fitted_volumes(tmp_path, caplog):
    """prior_args.spacing describes the volumes the model trains on. A volume of another size than N^3 is resampled
    to isotropic voxels, so its file's anisotropic spacing is refused there, naming the key; a volume already N^3
    keeps its spacing, which is then accepted (and its absence warned about)."""
    from utils.data.datamodule import EchoDataModule
    from utils.data.dataset_io import save_dataset
    from utils.methods.flow_matching.module import FlowMatchingModule

    def module(path, spacing):
        cfg = load_config(TINY_3D, [f"data_args.path={path}", f"prior_args.spacing={spacing}"])
        return FlowMatchingModule.for_data(cfg, EchoDataModule(cfg.data_args, 2, 0,
                                                                               spatial_dims=3))

    rng = np.random.default_rng(0)
    for name, n, affine in (("cube", N, np.diag([1.0, 1.0, 3.0, 1.0])), ("slab", 12, np.diag([1.0, 1.0, 3.0, 1.0]))):
        data = {split: [{**phantom_record(rng, f"{split}{i}"), "affine": affine} for i in range(2)]
                for split in ("train", "valid", "test")}
        if name == "slab":  # 16 x 16 x 12 voxels of 1 x 1 x 3 mm: a 36 mm cube at 16^3, 2.25 mm
            data = {s: [{**r, "image": r["image"][..., :n], "mask": r["mask"][..., :n]} for r in recs]
                    for s, recs in data.items()}
        save_dataset(tmp_path / f"{name}.npz", data)
    module(tmp_path / "cube.npz", "[1, 1, 3]")  # N^3 volumes keep their 1 x 1 x 3 mm voxels
    with caplog.at_level("WARNING"):
        module(tmp_path / "cube.npz", "[]")
    assert "anisotropic voxels (1 x 1 x 3 mm) but prior_args.spacing is empty" in caplog.text
    with pytest.raises(ConfigError, match=r"prior_args.spacing \[1.0, 1.0, 3.0\] does not match .*slab.npz.* "
                                          r"2.25 x 2.25 x 2.25 mm voxels"):
        module(tmp_path / "slab.npz", "[1, 1, 3]")
    module(tmp_path / "slab.npz", "[]")
