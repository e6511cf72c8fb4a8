"""Metric maths, feature-extractor loading and the feature cache, on CPU with tiny random networks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy import ndimage

from utils.evaluation import feature_extractors as fe
from utils.evaluation import metrics


def blob_images(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo-like phantoms: a dark LV cavity in a bright myocardial ring and a dark LA; images and masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.uniform(0.35, 0.5) * size, rng.uniform(0.4, 0.6) * size
        ry, rx = rng.uniform(0.15, 0.2) * size, rng.uniform(0.1, 0.14) * size
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        la = ((yy - cy - 1.4 * ry) / (0.5 * ry)) ** 2 + ((xx - cx) / rx) ** 2
        mask = np.zeros((size, size), np.uint8)
        mask[r <= 1.6] = 2
        mask[r <= 1.0] = 1
        mask[(la <= 1.0) & (mask == 0)] = 3
        intensity = np.choose(mask, [0.3, 0.08, rng.uniform(0.7, 0.9), 0.12]) + 0.1 * xx / size
        images.append(ndimage.gaussian_filter(intensity, 1.0))
        masks.append(mask)
    return (torch.tensor(np.stack(images)[:, None], dtype=torch.float32),
            torch.tensor(np.stack(masks)[:, None]))


def shift(images: torch.Tensor, k: int) -> torch.Tensor:
    """Shift left by k pixels, repeating the last column (no wrap-around)."""
    return torch.cat([images[..., k:], images[..., -1:].expand(*images.shape[:-1], k)], dim=-1)


class TinyExtractor:
    """A random-weight conv net behind the extractor interface (uint8 RGB in, float64 features out)."""

    name = "tiny"

    def __init__(self, dim: int = 16):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, dim, 3, stride=2),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.weights_sha256 = hashlib.sha256(b"tiny").hexdigest()
        self.calls = 0

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> np.ndarray:
        self.calls += 1
        return self.net(fe.to_uint8_rgb(images01).float() / 127.5 - 1).double().numpy()


@pytest.fixture(scope="module")
def blobs():
    return blob_images(24)


@pytest.fixture(scope="module")
def tiny_feats(blobs):
    images, _ = blobs
    extractor = TinyExtractor()
    return extractor(images), extractor(shift(images, 6) * 0.8)


# ---- FID / KID / CMMD ---------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(tiny_feats):
    x, y = tiny_feats
    assert abs(metrics.frechet_distance(x, x)) < 1e-9
    d = metrics.frechet_distance(x, y)
    assert d > 1e-4
    assert metrics.frechet_distance(y, x) == pytest.approx(d, rel=1e-8)


def test_fid_matches_torch_fidelity_and_torchmetrics_on_gaussian_features():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(0.5, 1.0, size=(250, 8)) @ rng.normal(size=(8, 8))
    stats = [{"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)} for f in (a, b)]
    reference = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    ours = metrics.frechet_distance(a, b)
    assert ours == pytest.approx(reference, rel=1e-9)
    tm = _compute_fid(*(torch.from_numpy(s[k]) for s in stats for k in ("mu", "sigma")))
    assert ours == pytest.approx(tm.item(), rel=1e-7)
    # Shifting one set by c adds exactly ||c||^2.
    c = np.arange(8.0)
    assert metrics.frechet_distance(a, a + c) == pytest.approx(c @ c, rel=1e-9)


def test_fid_with_fewer_samples_than_dimensions_is_finite_and_zero_on_itself():
    x = np.random.default_rng(2).normal(size=(10, 64))
    # Zero eigenvalues carry rounding error ~1e-13 that the square root lifts to ~1e-7 each.
    assert abs(metrics.frechet_distance(x, x)) < 1e-7 * np.trace(np.cov(x, rowvar=False))
    assert np.isfinite(metrics.frechet_distance(x, x[::-1] + 1.0))


def test_kid_of_a_set_with_itself_is_near_zero(tiny_feats):
    x, y = tiny_feats
    same, _ = metrics.kernel_inception_distance(x, x, subsets=20)
    different, _ = metrics.kernel_inception_distance(x, y, subsets=20)
    assert different > 0
    assert abs(same) < 0.05 * different


def test_kid_matches_torch_fidelity_with_the_same_seed():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(80, 12)), rng.normal(0.3, 1.2, size=(70, 12))
    ref = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=7, kid_subset_size=30,
                                 rng_seed=5, verbose=False)
    rng = np.random.RandomState(5)
    mean, std = metrics.kernel_inception_distance(a, b, subset_size=30, subsets=7, rng=rng)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)


def test_kid_subset_size_is_capped_at_the_number_of_samples():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(20, 5)), rng.normal(1.0, 1.0, size=(25, 5))
    mean, std = metrics.kernel_inception_distance(a, b, subset_size=1000, subsets=3)
    # With m = N_a = 20, every subset of a is all of a; b is subsampled, so values still vary a little.
    assert np.isfinite(mean) and mean > 0 and np.isfinite(std)


def test_cmmd_is_zero_on_itself_and_matches_the_direct_formula(tiny_feats):
    x, y = tiny_feats
    assert metrics.cmmd(x, x) == 0.0
    assert metrics.cmmd(x, 3.0 * x) == pytest.approx(0.0, abs=1e-9)  # embeddings are L2-normalised

    a = x / np.linalg.norm(x, axis=1, keepdims=True)
    b = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(u, v):
        return np.mean([[np.exp(-np.sum((p - q) ** 2) / 200.0) for q in v] for p in u])

    assert metrics.cmmd(x, y) == pytest.approx(1000 * (k(a, a) + k(b, b) - 2 * k(a, b)), rel=1e-9)
    assert metrics.cmmd(x, y) == pytest.approx(metrics.cmmd(y, x), rel=1e-12)


# ---- SSIM / PSNR / B-Dice / HD95 -----------------------------------------------------------------

def test_ssim_and_psnr_agree_with_scikit_image(blobs):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    real, _ = blobs
    real = real[:5]
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    generated = (real + 0.05 * noise).clamp(0, 1)
    ssim = metrics.ssim_per_image(generated, real)
    psnr = metrics.psnr_per_image(generated, real)
    for i in range(len(real)):
        g, r = generated[i, 0].double().numpy(), real[i, 0].double().numpy()
        reference = structural_similarity(r, g, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)
        assert ssim[i] == pytest.approx(reference, abs=1e-5)
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(r, g, data_range=1.0), abs=1e-5)  # dB


def test_hd95_equals_monai_on_masks(blobs):
    from monai.metrics import compute_hausdorff_distance

    _, masks = blobs
    for i in range(4):
        a, b = masks[i, 0].numpy() == 1, masks[i + 1, 0].numpy() > 0
        ref = compute_hausdorff_distance(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                                         include_background=True, percentile=95)
        assert metrics.hd95(a, b) == pytest.approx(ref.item(), rel=1e-6)


def test_hd95_known_answers_and_an_independent_derivation(blobs):
    a, b = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    a[2, 3], b[5, 7] = True, True
    assert metrics.hd95(a, b) == pytest.approx(5.0)
    assert metrics.hd95(a, np.zeros_like(a)) == pytest.approx(np.hypot(20, 30))
    assert metrics.hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0

    # Boundary pixels, Euclidean distance transform, linear 95th percentile, max of both directions.
    _, masks = blobs
    p, q = masks[0, 0].numpy() > 0, masks[1, 0].numpy() == 2

    def directed(u, v):
        bu, bv = u & ~ndimage.binary_erosion(u), v & ~ndimage.binary_erosion(v)
        return np.quantile(ndimage.distance_transform_edt(~bv)[bu], 0.95)

    assert metrics.hd95(p, q) == pytest.approx(max(directed(p, q), directed(q, p)), rel=1e-6)


def test_edge_map_keeps_the_strongest_edges_inside_the_dilated_region(blobs):
    images, masks = blobs
    edges = metrics.edge_map(images[0, 0].numpy(), masks[0, 0].numpy())
    disk = metrics._disk(metrics.EDGE_REGION_RADIUS)
    region = ndimage.binary_dilation(masks[0, 0].numpy() > 0, structure=disk)
    assert edges.any() and not (edges & ~region).any()
    assert edges.sum() == pytest.approx(metrics.EDGE_TOP_FRACTION * region.sum(), rel=0.05)
    assert not metrics.edge_map(images[0, 0].numpy(), np.zeros((64, 64), np.uint8)).any()
    assert not metrics.edge_map(np.full((64, 64), 0.5), masks[0, 0].numpy()).any()


def test_real_images_against_themselves_and_shifted_copies(blobs):
    real, masks = blobs
    real, masks = real[:6], masks[:6]
    same = metrics.paired_metrics(real, real, masks)
    np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-6)
    np.testing.assert_array_equal(same["b_dice"], 1.0)
    np.testing.assert_array_equal(same["surface_dice"], 1.0)
    np.testing.assert_array_equal(same["hd95"], 0.0)
    assert np.isinf(same["psnr"]).all()

    scores = [metrics.paired_metrics(shift(real, k), real, masks) for k in (1, 2, 4)]
    means = {name: [s[name].mean() for s in scores] for name in same}
    for name in ("ssim", "psnr", "b_dice"):
        assert means[name][0] > means[name][1] > means[name][2], (name, means[name])
    assert means["surface_dice"][:2] == [1.0, 1.0] and means["surface_dice"][2] < 1.0  # shifts 1, 2 within 2 px
    assert 0 < means["hd95"][0] < means["hd95"][1] < means["hd95"][2], means["hd95"]
    assert means["b_dice"][0] < 1.0
    # paired_metrics is the single-metric functions, batched.
    gen = shift(real, 2)
    np.testing.assert_allclose(scores[1]["ssim"], metrics.ssim_per_image(gen, real))
    np.testing.assert_allclose(scores[1]["b_dice"], metrics.boundary_dice_per_image(gen, real, masks))
    np.testing.assert_allclose(scores[1]["hd95"], metrics.hd95_per_image(gen, real, masks))


def test_bootstrap_ci():
    assert metrics.bootstrap_ci([2.0] * 10) == (2.0, 2.0, 2.0)
    values = np.random.default_rng(5).normal(10.0, 2.0, size=400)
    mean, lo, hi = metrics.bootstrap_ci(values, seed=1)
    assert mean == pytest.approx(values.mean())
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert lo == pytest.approx(mean - half_width, abs=0.05)
    assert hi == pytest.approx(mean + half_width, abs=0.05)
    assert metrics.bootstrap_ci(values, seed=1) == (mean, lo, hi)
    assert metrics.bootstrap_ci([np.inf, 30.0])[0] == np.inf
    with pytest.raises(ValueError, match="NaN"):
        metrics.bootstrap_ci([1.0, np.nan])
    assert metrics.summarise(values)["n"] == 400


def test_cluster_bootstrap_of_repeated_values_equals_the_bootstrap_of_the_sources():
    # 200 samples cycling over 20 source images (sample k from source k % 20), every sample of a source
    # scoring the same: the data hold 20 independent values, not 200, and the interval must say so.
    values = np.random.default_rng(7).normal(0.6, 0.1, size=20)
    samples, sources = np.tile(values, 10), np.arange(200) % 20
    clustered = metrics.bootstrap_ci(samples, sources, n_boot=2000, seed=3)
    np.testing.assert_allclose(clustered, metrics.bootstrap_ci(values, n_boot=2000, seed=3), rtol=0, atol=1e-12)
    naive = metrics.bootstrap_ci(samples, n_boot=2000, seed=3)
    width, naive_width = clustered[2] - clustered[1], naive[2] - naive[1]
    assert naive_width < 0.5 * width  # ~ sqrt(20 / 200) = 0.32 of it: the per-sample bootstrap is too narrow
    assert metrics.summarise(samples, sources, n_boot=100) | {"mean": 0, "ci95_lo": 0, "ci95_hi": 0} == {
        "n": 200, "n_clusters": 20, "mean": 0, "ci95_lo": 0, "ci95_hi": 0}


def test_cluster_bootstrap_rejects_nan_and_mismatched_ids():
    with pytest.raises(ValueError, match="1 of 3 values are NaN"):
        metrics.bootstrap_ci([1.0, np.nan, 2.0], [0, 0, 1])
    with pytest.raises(ValueError, match="2 cluster ids for 3 values"):
        metrics.bootstrap_ci([1.0, 2.0, 3.0], [0, 1])


# ---- preprocessing, extractors, weights resolution, cache ---------------------------------------

def test_to_uint8_rgb_rounds_and_saturates():
    x = torch.tensor([-0.2, 0.0, 0.498, 0.5, 1.0, 1.3]).view(1, 1, 1, 6)
    u8 = fe.to_uint8_rgb(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 1, 6)
    assert u8[0, 0, 0].tolist() == [0, 0, 127, 128, 255, 255]
    assert torch.equal(u8[:, 0], u8[:, 2])


def test_inception_extractor_loads_a_state_dict_file_and_runs(random_inception_file, blobs):
    path, model = random_inception_file
    extractor = fe.InceptionExtractor(path, batch_size=2)
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.weights_files == {path.name: extractor.weights_sha256}
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    feats = extractor(blobs[0][:2, :, :32, :32])
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # random weights give features of ~1e-7: compare relative to their size, not to np.allclose's atol of 1e-8
    assert np.abs(feats[0] - feats[1]).max() > 1e-3 * np.abs(feats).max()


def test_inception_extractor_rejects_a_file_of_the_wrong_architecture(tmp_path):
    path = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not_inception.pth"):
        fe.InceptionExtractor(path)


def test_clip_extractor_loads_a_local_directory_and_runs(tiny_clip_dir, blobs):
    extractor = fe.ClipExtractor(fe.resolve_clip_dir(tiny_clip_dir), batch_size=3)
    assert extractor.image_size == 32
    assert set(extractor.weights_files) == {"model.safetensors", "config.json", "preprocessor_config.json"}
    feats = extractor(blobs[0][:4])
    assert feats.shape == (4, 16) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert metrics.cmmd(feats, feats) == 0.0


def test_clip_preprocessing_matches_the_cmmd_reference_pipeline(tiny_clip_dir, blobs):
    """cmmd: PIL centre crop + bicubic resize of the uint8 image, /255, the processor's normalisation."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    extractor = fe.ClipExtractor(tiny_clip_dir)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir, local_files_only=True)
    u8 = fe.to_uint8_rgb(blobs[0][:2, :, 4:44, 2:50])  # 40 x 48: cropped to 40 x 40, resized to 32
    ours = extractor.pixel_values(u8)
    pil = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).crop((4, 0, 44, 40))
                      .resize((32, 32), resample=Image.BICUBIC)) for im in u8]
    ref = processor(images=[p.astype(np.float32) / 255.0 for p in pil], do_resize=False, do_center_crop=False,
                    do_rescale=False, do_normalize=True, return_tensors="pt")["pixel_values"]
    step = 1.0 / 255.0 / min(processor.image_std)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() <= step * 1.01  # at most one grey level apart
    assert (ours - ref).abs().gt(1e-5).float().mean() < 0.05


def test_resolve_inception_weights_order_and_error_message(tmp_path, monkeypatch, random_inception_file):
    monkeypatch.delenv(fe.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    hub_file = tmp_path / "hub" / "checkpoints" / fe.INCEPTION_FILE_NAME
    with pytest.raises(fe.MissingWeightsError) as err:
        fe.resolve_inception_weights(None)
    assert str(hub_file) in str(err.value) and fe.INCEPTION_URL in str(err.value)
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert fe.resolve_inception_weights(None) == hub_file

    env_file = tmp_path / "env.pth"
    monkeypatch.setenv(fe.INCEPTION_ENV, str(env_file))
    with pytest.raises(fe.MissingWeightsError, match="env.pth"):  # a named file that is missing is an error
        fe.resolve_inception_weights(None)
    env_file.write_bytes(b"x")
    assert fe.resolve_inception_weights(None) == env_file
    flag_file = random_inception_file[0]
    assert fe.resolve_inception_weights(flag_file) == flag_file
    with pytest.raises(fe.MissingWeightsError, match="--inception_weights"):
        fe.resolve_inception_weights(tmp_path / "nope.pth")


def test_resolve_clip_dir_errors_name_what_is_missing(tmp_path, monkeypatch, tiny_clip_dir):
    monkeypatch.delenv(fe.CLIP_ENV, raising=False)
    with pytest.raises(fe.MissingWeightsError, match=fe.CLIP_ENV) as err:
        fe.resolve_clip_dir(None)
    assert fe.CLIP_MODEL_ID in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(fe.MissingWeightsError, match="preprocessor_config.json") as err:
        fe.resolve_clip_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    monkeypatch.setenv(fe.CLIP_ENV, str(tiny_clip_dir))
    assert fe.resolve_clip_dir(None) == tiny_clip_dir


def test_feature_cache_computes_once_per_split_extractor_and_data(tmp_path, blobs):
    images = blobs[0][:5]
    extractor = TinyExtractor()
    cache = fe.FeatureCache(tmp_path / "cache")
    first = cache.features("test", extractor, images)
    second = fe.FeatureCache(tmp_path / "cache").features("test", extractor, images)
    assert extractor.calls == 1
    np.testing.assert_array_equal(first, second)
    cache.features("test", extractor, images[:4])
    cache.features("valid", extractor, images)
    assert extractor.calls == 3
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def _square(top: int, left: int, side: int = 20, size: int = 48) -> np.ndarray:
    a = np.zeros((size, size), bool)
    a[top:top + side, left:left + side] = True
    return a


def _surface_dice_by_hand(a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """NSD re-derived with scipy: boundary = map minus its erosion; share of boundary pixels within tolerance."""
    edge_a, edge_b = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    near_a = ndimage.distance_transform_edt(~edge_b)[edge_a] <= tolerance
    near_b = ndimage.distance_transform_edt(~edge_a)[edge_b] <= tolerance
    return (near_a.sum() + near_b.sum()) / (edge_a.sum() + edge_b.sum())


def test_surface_dice_known_answers():
    a = _square(10, 10)
    assert metrics.surface_dice(a, a) == 1.0
    assert metrics.surface_dice(a, _square(10, 12), tolerance=2.0) == 1.0  # a shift within the tolerance
    assert metrics.surface_dice(a, _square(10, 13), tolerance=2.0) < 1.0
    far = metrics.surface_dice(a, _square(22, 24), tolerance=2.0)
    assert far < 0.2
    assert metrics.surface_dice(a, np.zeros_like(a)) == 0.0
    assert metrics.surface_dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = (ndimage.gaussian_filter(rng.random((48, 48)), 3) > 0.5 for _ in range(2))
        for tolerance in (1.0, 2.0, 3.5):
            assert metrics.surface_dice(x, y, tolerance) == pytest.approx(_surface_dice_by_hand(x, y, tolerance),
                                                                         abs=1e-6)


def test_surface_dice_of_shifted_echo_edge_maps_is_monotone_where_b_dice_is_not():
    from utils.data.dataset_io import normalise_image
    from utils.data.synthetic_echo import build_synthetic_dataset

    test = build_synthetic_dataset(64, (1, 1, 2), 0, progress=False)["test"]
    real = torch.from_numpy(np.stack([normalise_image(r["image"]) for r in test]))
    masks = torch.from_numpy(np.stack([r["mask"] for r in test]))
    scores = [metrics.paired_metrics(torch.roll(real, k, dims=-1), real, masks) for k in (0, 1, 3, 6)]
    nsd = [s["surface_dice"].mean() for s in scores]
    b_dice = [s["b_dice"].mean() for s in scores]
    assert nsd[0] == 1.0 and nsd[1] > 0.99 and nsd[1] > nsd[2] > nsd[3], nsd
    assert b_dice[1] > b_dice[2] < b_dice[3], b_dice  # the 6-px myocardium realigns pixel-exact edges
    np.testing.assert_allclose(scores[2]["surface_dice"], metrics.surface_dice_per_image(
        torch.roll(real, 3, dims=-1), real, masks))
