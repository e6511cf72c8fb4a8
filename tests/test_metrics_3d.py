"""3-D evaluation: per-volume SSIM/MS-SSIM/boundary metrics, MMD, 3D-FID (R3D-18) and 2.5-D FID, and evaluate.py
on volumes; on CPU with tiny volumes and random-weight networks saved to tmp files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import evaluate
from utils.evaluation import feature_extractors as fe
from utils.evaluation import metrics
from utils.evaluation import volume_metrics as vm
from utils.files import sha256_file

SHAPE = (20, 24, 22)  # D, H, W: unequal sides catch swapped axes; >= 20 for MS-SSIM


def phantoms(n: int, shape=SHAPE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random volumes ``[n,1,D,H,W]`` in [0, 1], each with a bright box whose mask is label 1."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        volume = ndimage.gaussian_filter(rng.uniform(0, 1, shape), 2.0) * 0.5
        mask = np.zeros(shape, np.uint8)
        lo = [int(rng.integers(3, s // 3)) for s in shape]
        mask[tuple(slice(a, a + s // 2) for a, s in zip(lo, shape))] = 1
        images.append(np.clip(volume + 0.4 * mask, 0, 1))
        masks.append(mask)
    return (torch.tensor(np.stack(images)[:, None], dtype=torch.float32), torch.tensor(np.stack(masks)[:, None]))


@pytest.fixture(scope="module")
def volumes():
    return phantoms(4)


@pytest.fixture(scope="module")
def random_r3d_file(tmp_path_factory):
    """torchvision's R3D-18 architecture with random weights, saved as a state dict under its real file name."""
    from torchvision.models.video import r3d_18

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = r3d_18()
    path = tmp_path_factory.mktemp("r3d") / fe.R3D_FILE_NAME
    torch.save(model.state_dict(), path)
    return path


# ---- per-volume metrics ------------------------------------------------------------------------------------


def test_identical_volumes_score_perfectly(volumes):
    images, masks = volumes
    per = vm.paired_volume_metrics(images, images.clone(), masks)
    assert set(per) == {"ssim", "ms_ssim", "psnr", "b_dice", "surface_dice", "hd95"}
    np.testing.assert_allclose(per["ssim"], 1.0, atol=1e-6)
    np.testing.assert_allclose(per["ms_ssim"], 1.0, atol=1e-6)
    assert np.isinf(per["psnr"]).all()
    np.testing.assert_array_equal(per["b_dice"], 1.0)
    np.testing.assert_array_equal(per["surface_dice"], 1.0)
    np.testing.assert_array_equal(per["hd95"], 0.0)


def test_ssim_and_ms_ssim_are_monais_and_ssim_matches_scikit_image(volumes):
    from monai.metrics import SSIMMetric, compute_ms_ssim
    from skimage.metrics import structural_similarity

    real, _ = volumes
    generated = (real + 0.1 * torch.rand(real.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ssim = vm.ssim_per_volume(generated, real)
    assert ssim.shape == (4,) and (ssim < 0.99).all()
    direct = SSIMMetric(spatial_dims=3, data_range=1.0, reduction="none")(generated, real)  # MONAI's defaults
    np.testing.assert_allclose(ssim, direct.flatten().numpy(), rtol=1e-6)
    independent = [structural_similarity(g[0].double().numpy(), r[0].double().numpy(), data_range=1.0,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                   for g, r in zip(generated, real)]
    np.testing.assert_allclose(ssim, independent, atol=1e-4)
    ms = vm.ms_ssim_per_volume(generated, real)
    direct = compute_ms_ssim(generated, real, 3, kernel_size=5, weights=(0.1, 0.3, 0.6))  # MOTFM's setting
    np.testing.assert_allclose(ms, direct.flatten().numpy(), rtol=1e-6)
    assert (ms < 0.999).all() and not np.allclose(ms, ssim)


def test_ms_ssim_on_too_small_volumes_is_not_computable_with_the_reason():
    small = torch.rand(2, 1, 19, 32, 32)
    assert vm.ms_ssim_problem(small.shape) == (
        "MS-SSIM (3 scales, window 5) needs volumes of at least 20 voxels per side, got 19x32x32")
    with pytest.raises(ValueError, match="at least 20 voxels per side"):
        vm.ms_ssim_per_volume(small, small)
    assert "ms_ssim" not in vm.paired_volume_metrics(small, small, torch.ones_like(small, dtype=torch.uint8))
    assert vm.ms_ssim_problem((2, 1, 20, 20, 20)) is None


def test_images_are_refused_by_the_volume_metrics():
    images = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"volumes \[N,1,D,H,W\]"):
        vm.ssim_per_volume(images, images)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_two_cubes_offset_by_k_voxels_is_k(k):
    a = np.zeros((24, 24, 24), bool)
    a[6:14, 6:14, 6:14] = True
    b = np.roll(a, k, axis=1)
    assert metrics.hd95(a, b) == pytest.approx(k)
    assert metrics.hd95(a, a) == 0.0 and metrics.dice(a, a) == 1.0
    assert metrics.surface_dice(a, b, tolerance=k) == 1.0 and metrics.surface_dice(a, b, tolerance=k - 0.5) < 1.0
    assert metrics.hd95(a, np.zeros_like(a)) == pytest.approx(np.sqrt(3 * 24**2))  # one empty: the diagonal


def test_edge_maps_are_3d_and_follow_a_shift():
    """Intensity that changes only from slice to slice has 3-D edges (no 2-D slice has any), and shifting the
    volume by k voxels shifts its edge map: HD95 k, B-Dice below 1."""
    layered = np.zeros((24, 24, 24))
    layered[12:] = 1.0  # constant within each depth slice
    region = np.ones((24, 24, 24), np.uint8)
    edges = metrics.edge_map(layered, region)
    assert edges.any() and not any(metrics.edge_map(s, region[0]).any() for s in layered)
    assert set(np.flatnonzero(edges.any(axis=(1, 2)))) <= set(range(9, 15))  # around the step at depth 12
    image = torch.zeros(1, 1, 32, 32, 32)
    image[..., 10:20, 10:20, 10:20] = 1.0
    shifted = torch.roll(image, 2, dims=3)
    mask = torch.zeros_like(image, dtype=torch.uint8)
    mask[..., 8:24, 8:24, 8:24] = 1
    same = metrics.boundary_metrics(image, image, mask)
    assert same == {"b_dice": [1.0], "surface_dice": [1.0], "hd95": [0.0]}
    moved = metrics.boundary_metrics(shifted, image, mask)
    assert moved["hd95"][0] == pytest.approx(2.0) and moved["b_dice"][0] < 1.0


# ---- MMD ---------------------------------------------------------------------------------------------------


def trace_cov(x: np.ndarray) -> float:
    """Trace of the (N - 1) covariance of the rows of ``x`` [N, V]: the summed per-voxel variances."""
    return float(x.var(axis=0, ddof=1).sum())



def test_mmd_is_monais_unbiased_linear_kernel_estimate(volumes):
    from monai.metrics import MMDMetric

    real, _ = volumes
    copies = real[:1].expand(4, -1, -1, -1, -1)
    assert vm.mmd(copies, copies.clone()) == pytest.approx(0.0, abs=1e-9)  # identical volumes: 0
    generated = (real * 0.8 + 0.1).flip(2)
    r, g = real.flatten(1).double().numpy(), generated.flatten(1).double().numpy()
    closed_form = (np.sum((r.mean(0) - g.mean(0)) ** 2) - trace_cov(r) / len(r) - trace_cov(g) / len(g))
    assert vm.mmd(real, generated) == pytest.approx(closed_form, rel=1e-9)
    assert vm.mmd(real, generated) == pytest.approx(float(MMDMetric()(real, generated)), rel=1e-4)
    assert vm.mmd(real, real) == pytest.approx(-2 * trace_cov(r) / len(r), rel=1e-9)  # below 0
    with pytest.raises(ValueError, match="at least 2 volumes"):
        vm.mmd(real[:1], generated[:1])


# ---- 3D-FID (R3D-18) ---------------------------------------------------------------------------------------


def test_r3d_weights_are_found_by_flag_env_and_hub_cache(random_r3d_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fe.R3D_ENV, raising=False)
    with pytest.raises(fe.MissingWeightsError) as err:
        fe.resolve_r3d_weights(None)
    for part in (str(fe.r3d_hub_path()), fe.R3D_URL, "--r3d_weights", fe.R3D_ENV, "--skip_missing_metrics"):
        assert part in str(err.value)
    assert fe.resolve_r3d_weights(random_r3d_file) == random_r3d_file
    monkeypatch.setenv(fe.R3D_ENV, str(random_r3d_file))
    assert fe.resolve_r3d_weights(None) == random_r3d_file
    monkeypatch.setenv(fe.R3D_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(fe.MissingWeightsError, match="env.pth"):  # a named file that is missing is an error
        fe.resolve_r3d_weights(None)
    monkeypatch.delenv(fe.R3D_ENV)
    fe.r3d_hub_path().parent.mkdir(parents=True)
    fe.r3d_hub_path().write_bytes(random_r3d_file.read_bytes())
    assert fe.resolve_r3d_weights(None) == fe.r3d_hub_path()


def test_r3d_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(random_r3d_file, volumes):
    real, _ = volumes
    extractor = fe.R3DExtractor(random_r3d_file, batch_size=3)
    assert extractor.weights_files == {fe.R3D_FILE_NAME: sha256_file(random_r3d_file)}
    feats = extractor(real)
    assert feats.shape == (4, 512) and feats.dtype == np.float64
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-5 * np.trace(np.cov(feats.T)))
    brighter = metrics.frechet_distance(feats, extractor((real + 0.3).clamp(0, 1)))
    brightest = metrics.frechet_distance(feats, extractor((real + 0.6).clamp(0, 1)))
    assert 0 < brighter < brightest
    # Kinetics normalisation of the repeated grey channel, then the network without its classifier
    u8 = fe.to_uint8_rgb(real[:2])
    x = (u8.float() / 255 - torch.tensor(fe.KINETICS_MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(
        fe.KINETICS_STD).view(1, 3, 1, 1, 1)
    np.testing.assert_allclose(feats[:2], extractor.model(x).double().numpy(), rtol=1e-5, atol=1e-6)


def test_r3d_refuses_another_state_dict(tmp_path):
    path = tmp_path / "not_r3d.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not_r3d.pth"):
        fe.R3DExtractor(path)


# ---- 2.5-D FID ---------------------------------------------------------------------------------------------


class PoolExtractor:
    """A cheap position-sensitive 2-D extractor: each slice average-pooled to 4x4 (16 features)."""

    name = "pool4"
    weights_sha256 = hashlib.sha256(b"pool4").hexdigest()
    weights_files = {"none": weights_sha256}

    def __init__(self):
        self.sizes = []

    def __call__(self, images01: torch.Tensor) -> np.ndarray:
        assert images01.ndim == 4 and images01.shape[1] == 1
        self.sizes.append(tuple(images01.shape))
        return torch.nn.functional.adaptive_avg_pool2d(images01.double(), 4).flatten(1).numpy()


def test_plane_slices_are_every_slice_of_each_plane(volumes):
    real, _ = volumes
    d, h, w = SHAPE
    hw, dw, dh = (vm.plane_slices(real, p) for p in ("HW", "DW", "DH"))
    assert hw.shape == (4 * d, 1, h, w) and dw.shape == (4 * h, 1, d, w) and dh.shape == (4 * w, 1, d, h)
    assert torch.equal(hw[d + 5, 0], real[1, 0, 5]) and torch.equal(dw[h + 5, 0], real[1, 0, :, 5])
    assert torch.equal(dh[w + 5, 0], real[1, 0, :, :, 5])


@pytest.mark.parametrize("axis,unchanged", [(2, "HW"), (3, "DW"), (4, "DH")])
def test_fid_2p5d_sees_each_plane(volumes, tmp_path, axis, unchanged):
    """Reversing the volumes along one axis keeps the slices of the plane across it (same set: FID 0) and mirrors
    the slices of the two other planes (FID > 0)."""
    real, _ = volumes
    extractor = PoolExtractor()
    found = {}
    evaluate._feature_metrics({"inception_planes": extractor}, fe.FeatureCache(tmp_path), "test", real,
                              real.flip(axis), found)
    r = found["fid_2p5d"]
    assert set(r["planes"]) == {"HW", "DW", "DH"} and r["n"] == r["n_real"] == 4
    for plane, value in r["planes"].items():
        assert (value == pytest.approx(0.0, abs=1e-9)) if plane == unchanged else value > 1e-4
    assert r["value"] == pytest.approx(np.mean(list(r["planes"].values())))
    d, h, w = SHAPE
    assert sorted(extractor.sizes) == sorted(2 * [(4 * d, 1, h, w), (4 * h, 1, d, w), (4 * w, 1, d, h)])
    assert len(list(tmp_path.glob("test-*__pool4__*.npy"))) == 3  # the real slices cached per plane


# ---- evaluate.py on volumes --------------------------------------------------------------------------------


def write_volume_data(tmp_path):
    """A dataset .npz of uint8 volumes (train and test splits) and a samples.npz that is the test split itself."""
    train, train_masks = phantoms(3, seed=1)
    test, test_masks = phantoms(3, seed=2)
    u8 = {k: np.rint(v.numpy() * 255).astype(np.uint8) for k, v in (("train", train), ("test", test))}
    data = tmp_path / "volumes.npz"
    np.savez(data, train_images=u8["train"], train_masks=train_masks.numpy(), test_images=u8["test"],
             test_masks=test_masks.numpy())
    samples = tmp_path / "samples" / "samples.npz"
    samples.parent.mkdir()
    np.savez(samples, images=u8["test"].astype(np.float32) / 255, masks=test_masks.numpy(), indices=np.arange(3))
    return data, samples


def test_evaluate_real_volumes_against_themselves(tmp_path, no_metric_weights, random_r3d_file, monkeypatch):
    data, samples = write_volume_data(tmp_path)
    args = ["--samples", str(samples), "--data_path", str(data), "--n_boot", "20", "--skip_missing_metrics",
            "--no-comparison"]
    assert evaluate.main([*args, "--r3d_weights", str(random_r3d_file), "--output_dir", str(tmp_path / "a")]) == 0
    out = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m = out["metrics"]
    assert list(m) == list(evaluate.METRICS_3D)
    assert m["fid_3d"]["value"] == pytest.approx(0.0, abs=1e-3) and m["fid_3d"]["n_real"] == 3
    assert "Inception-v3 weights" in m["fid_2p5d"]["skipped"]
    for name, perfect in (("ssim", 1.0), ("ms_ssim", 1.0), ("b_dice", 1.0), ("surface_dice", 1.0), ("hd95", 0.0)):
        assert m[name]["value"] == pytest.approx(perfect, abs=1e-6) and m[name]["n"] == 3, name
        assert m[name]["ci95"] == [pytest.approx(perfect, abs=1e-6)] * 2
    assert m["psnr"]["value"] is None  # inf: identical volumes
    real = np.load(data)["test_images"].reshape(3, -1) / 255
    assert m["mmd"]["value"] == pytest.approx(-2 * trace_cov(real) / 3, rel=1e-6)  # unbiased: below 0
    assert set(out["skipped_2d_only"]) == {"kid", "cmmd"}
    assert out["weights_sha256"] == {"r3d-18-kinetics400": {fe.R3D_FILE_NAME: sha256_file(random_r3d_file)}}
    assert out["memorisation"]["n"] == 3
    header = (tmp_path / "a" / "per_image.csv").read_text().splitlines()[0]
    assert header == "sample,source_index,ssim,ms_ssim,psnr,b_dice,surface_dice,hd95"
    report = (tmp_path / "a" / "report.md").read_text()
    assert "3D-FID↓" in report and "MS-SSIM↑" in report and "Skipped on volumes: kid" in report
    for png in ("best_worst.png", "memorisation_pairs.png"):
        assert (tmp_path / "a" / png).is_file()
    # the weights from the environment variable give the same 3D-FID
    monkeypatch.setenv(fe.R3D_ENV, str(random_r3d_file))
    assert evaluate.main([*args, "--output_dir", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]["fid_3d"]
    assert again["value"] == m["fid_3d"]["value"]


def test_evaluate_fits_the_real_volumes_to_the_models_grid_as_training_does(tmp_path, no_metric_weights):
    """Samples of a 3-D model at image_size^3 are paired with the dataset's volumes fitted to that grid; without
    the config that says so, the masks do not match and the samples are refused."""
    from utils.data.dataset_io import load_dataset
    from utils.data.resample import fit_records

    data, _ = write_volume_data(tmp_path)  # 20 x 24 x 22 volumes
    fitted, changed = fit_records(load_dataset(data)["test"], 16)
    assert changed == 3
    samples = tmp_path / "fit" / "samples.npz"
    samples.parent.mkdir()
    np.savez(samples, images=np.stack([r["image"] for r in fitted]).astype(np.float32) / 255,
             masks=np.stack([r["mask"] for r in fitted]), indices=np.arange(3))
    args = ["--samples", str(samples), "--data_path", str(data), "--skip_missing_metrics", "--n_boot", "10",
            "--no-memorisation", "--no-comparison"]
    with pytest.raises(SystemExit, match="not those of"):
        evaluate.main([*args, "--output_dir", str(tmp_path / "refused")])
    config = {"data_args": {"image_size": 16}, "model_args": {"spatial_dims": 3}}
    (samples.parent / "manifest.json").write_text(json.dumps({"config": config}))
    assert evaluate.main([*args, "--output_dir", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]
    assert m["ssim"]["value"] == pytest.approx(1.0) and "16x16x16" in m["ms_ssim"]["skipped"]


def test_evaluate_volumes_without_r3d_weights_fails_naming_the_file(tmp_path, no_metric_weights):
    data, samples = write_volume_data(tmp_path)
    with pytest.raises(SystemExit, match=r"r3d_18-b3b3357e.pth.*--skip_missing_metrics"):
        evaluate.main(["--samples", str(samples), "--data_path", str(data), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_volumes_against_an_image_dataset(tmp_path, no_metric_weights, tiny_data):
    _, samples = write_volume_data(tmp_path)
    with pytest.raises(SystemExit, match=r"the samples are volumes \[1, 20, 24, 22\]"):
        evaluate.main(["--samples", str(samples), "--data_path", str(tiny_data), "--skip_missing_metrics",
                       "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_fid_2p5d_with_the_inception_architecture(random_inception_file, tmp_path):
    """The real torch-fidelity Inception (random weights) through evaluate's 2.5-D path: 0 against itself."""
    real, _ = phantoms(2, shape=(12, 14, 13))
    extractor = fe.InceptionExtractor(random_inception_file[0], batch_size=32)
    found = {}
    evaluate._feature_metrics({"inception_planes": extractor}, fe.FeatureCache(tmp_path), "test", real, real, found)
    assert found["fid_2p5d"]["value"] == pytest.approx(0.0, abs=1e-3)
