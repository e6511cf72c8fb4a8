"""The comparison beyond paired metrics: precision/recall/density/coverage against a brute-force re-derivation and
hand-computed answers, per-mask diversity against scikit-image, the mean-of-K and oracle rows, the phantoms'
oracle (same masks, new images), and the Fréchet Radiomics Distance against frd-score's own CLI."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from utils.data.dataset_io import load_dataset
from utils.data.oracle import OracleUnavailable, oracle_images
from utils.data.synthetic_brain import render_brain
from utils.data.synthetic_echo import render_patient
from utils.evaluation.comparison import (
    FLAG_AVERAGING,
    FLAG_BROKEN,
    FLAG_COLLAPSE,
    Reference,
    below_constant,
    build_sets,
    compare,
    flags,
    oracle_redraws,
    oracle_set,
)
from utils.evaluation.distribution import PRDC_K, prdc
from utils.evaluation.diversity import groups, mean_of_samples, per_mask_diversity
from utils.evaluation.metrics import paired_metrics
from utils.evaluation.radiomics import RadiomicsExtractor, frechet_radiomics_distance, write_images

SIZE, SEED = 32, 0  # the conftest's tiny_data: the echo phantom at 32 px, seed 0, patients (4, 2, 2)
SYNTHETIC = {"size": SIZE, "seed": SEED}


def echo_frames(patients, size: int = SIZE) -> np.ndarray:
    """The phantom's images of ``patients`` (4 frames each) as float64 ``[N, 1, size, size]`` in [0, 1]."""
    return np.stack([image for p in patients for _, _, image, _ in render_patient(size, SEED, p)])[:, None] / 255.0


@pytest.fixture(scope="module")
def records(tiny_data):
    """The tiny phantom dataset's records as evaluation reads them (saved and loaded), every split."""
    data = load_dataset(tiny_data)
    return [r for split in ("train", "valid", "test") for r in data[split]]


# ---- precision / recall / density / coverage ---------------------------------------------------------------

def brute_force_prdc(real, generated, k: int) -> dict[str, float]:
    """The four scores with explicit loops, from Kynkäänniemi et al. 2019 and Naeem et al. 2020: r_k(x) is the
    distance from x to its k-th nearest neighbour among the other points of its own set."""
    real, generated = real.tolist(), generated.tolist()

    def radius(points, i):
        return sorted(math.dist(points[i], q) for j, q in enumerate(points) if j != i)[k - 1]

    real_radii = [radius(real, i) for i in range(len(real))]
    generated_radii = [radius(generated, j) for j in range(len(generated))]
    in_real_ball = [[math.dist(g, r) <= real_radii[i] for i, r in enumerate(real)] for g in generated]
    precision = sum(any(row) for row in in_real_ball) / len(generated)
    recall = sum(any(math.dist(r, g) <= generated_radii[j] for j, g in enumerate(generated)) for r in real) / len(real)
    density = sum(sum(row) for row in in_real_ball) / (k * len(generated))
    coverage = sum(min(math.dist(r, g) for g in generated) <= real_radii[i] for i, r in enumerate(real)) / len(real)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [3, PRDC_K])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prdc_equals_a_brute_force_rederivation_from_the_definitions(seed, k):
    """12 real and 15 generated points in 3-D (shifted and wider, so no score is trivially 1)."""
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(12, 3))
    generated = 1.5 * rng.normal(size=(15, 3)) + 0.8
    expected = brute_force_prdc(real, generated, k)
    assert prdc(real, generated, k=k) == pytest.approx(expected, abs=1e-12)


def test_prdc_brute_force_reference_is_not_trivial():
    """The clouds above give scores strictly between 0 and 1 for some seed, so the comparison has teeth."""
    rng = np.random.default_rng(0)
    scores = brute_force_prdc(rng.normal(size=(12, 3)), 1.5 * rng.normal(size=(15, 3)) + 0.8, PRDC_K)
    assert all(0 < scores[m] < 1 for m in ("precision", "recall", "coverage"))


def test_prdc_known_answer_on_a_1d_cloud():
    """k = 2, real {0, 1, 2, 10, 11, 12}, generated {11, 12, 13, 15}; every distance is an integer, so the
    boundary cases (distance == radius counts as inside) are exact.

    Real radii (2nd nearest other): 0 -> 2, 1 -> 1, 2 -> 2, 10 -> 2, 11 -> 1, 12 -> 2; balls [-2,2] [0,2] [0,4]
    [8,12] [10,12] [10,14]. Generated radii: 11 -> 2 (1,2,4), 12 -> 1 (1,1,3), 13 -> 2 (2,1,2), 15 -> 3 (4,3,2);
    balls [9,13] [11,13] [11,15] [12,18].
    precision: 11, 12, 13 in a real ball, 15 not -> 3/4.
    recall: 10, 11, 12 in a generated ball, 0, 1, 2 not -> 3/6.
    density: 11 in balls of 10, 11, 12 (3); 12 in 10 (|12-10| = 2 <= 2), 11 (1 <= 1), 12 (3); 13 in 12 only (1);
    15 in none -> 7 / (k M) = 7 / 8.
    coverage: nearest generated to 0, 1, 2 is 11 (outside their radii); 10 -> 1 <= 2, 11 and 12 -> 0 -> 3/6.
    """
    real = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    generated = np.array([[11.0], [12.0], [13.0], [15.0]])
    assert prdc(real, generated, k=2) == {"precision": 0.75, "recall": 0.5, "density": 0.875, "coverage": 0.5}


def test_prdc_of_a_set_against_itself():
    """precision = recall = coverage = 1; density = (k + 1) / k, not 1: each real ball holds its own centre and
    its k nearest neighbours, all of which are generated points here (no ties among random points)."""
    x = np.random.default_rng(0).normal(size=(20, 4))
    for k in (3, PRDC_K):
        assert prdc(x, x, k=k) == pytest.approx({"precision": 1.0, "recall": 1.0, "density": (k + 1) / k,
                                                 "coverage": 1.0}, abs=1e-12)


def test_prdc_punishes_copies_of_a_few_real_points():
    """Real 0..19 on a line, generated three copies each of 5 and 6 (k = 5).

    Real radii (5th nearest other): 3 inside, 4 at 1 and 18, 5 at 0 and 19, so 5 and 6 lie in real balls:
    precision 1. Generated radii: 5's distances to the others are 0, 0, 1, 1, 1 -> 1 (6's alike), balls [4, 6]
    and [5, 7]: recall = |{4, 5, 6, 7}| / 20 = 0.2. Density: 5 lies in the balls of 0..8 (9), 6 in those of
    3..9 (7) -> 3 (9 + 7) / (5 * 6) = 1.6, above 1: copies crowd the real balls."""
    real = np.arange(20.0)[:, None]
    generated = np.array([5.0, 5.0, 5.0, 6.0, 6.0, 6.0])[:, None]
    scores = prdc(real, generated)
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(0.2, abs=1e-12)
    assert scores["density"] == pytest.approx(1.6, abs=1e-12)


@pytest.mark.parametrize("n_real, n_generated, k", [(5, 10, 5), (10, 5, 5), (3, 4, 3), (6, 6, 5)])
def test_prdc_refuses_sets_of_at_most_k_points(n_real, n_generated, k):
    """The k-th neighbour of a set of <= k points does not exist: a ValueError, not an index error or a guess."""
    rng = np.random.default_rng(0)
    real, generated = rng.normal(size=(n_real, 2)), rng.normal(size=(n_generated, 2))
    if min(n_real, n_generated) > k:
        prdc(real, generated, k=k)  # one more point is enough
    else:
        with pytest.raises(ValueError, match="more than"):
            prdc(real, generated, k=k)


# ---- per-mask diversity ---------------------------------------------------------------------------------------

def test_groups_cut_every_mask_to_the_same_k_and_drop_single_samples():
    """Masks 0 (3 samples), 1 (2), 2 (4), 3 (1): K = 2 by default, mask 3 dropped; with k = 3 mask 1 goes too."""
    indices = [0, 1, 0, 2, 2, 1, 0, 2, 3, 2]
    grouped = groups(indices)
    assert {i: p.tolist() for i, p in grouped.items()} == {0: [0, 2], 1: [1, 5], 2: [3, 4]}
    assert {i: p.tolist() for i, p in groups(indices, k=3).items()} == {0: [0, 2, 6], 2: [3, 4, 7]}
    assert groups([0, 1, 2]) == {}


def test_mean_of_k_identical_samples_is_the_sample_exactly():
    """x + mean(x - x) is x bit for bit, where a plain (x + x + x) / 3 would round; distinct samples average."""
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    images = x[[0, 1, 0, 1, 0, 1]]
    means, indices = mean_of_samples(images, groups([7, 9, 7, 9, 7, 9]))
    assert torch.equal(means, x)
    assert indices.tolist() == [7, 9]
    other = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    means, _ = mean_of_samples(other, groups([4, 4, 4]))
    torch.testing.assert_close(means[0], other.mean(dim=0), rtol=0, atol=1e-6)


def test_identical_samples_have_zero_diversity():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = per_mask_diversity(x[[0, 0, 0, 1, 1, 1, 2, 2, 2]], groups([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert out["pixel_std"].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(out["pairwise_dissimilarity"], 0.0, atol=1e-6)


def test_pixel_std_of_two_constant_images_is_half_their_difference():
    """Population std of {a, b} is |a - b| / 2 at every pixel, whatever the image size."""
    pairs = [(0.2, 0.7), (0.5, 0.5), (1.0, 0.0)]
    images = torch.tensor([v for pair in pairs for v in pair], dtype=torch.float32)[:, None, None, None]
    images = images.expand(-1, 1, 16, 16).contiguous()
    out = per_mask_diversity(images, groups([0, 0, 1, 1, 2, 2]))
    a, b = images[0::2, 0, 0, 0].double().numpy(), images[1::2, 0, 0, 0].double().numpy()
    np.testing.assert_allclose(out["pixel_std"], np.abs(a - b) / 2, rtol=1e-12, atol=0)


def skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """scikit-image's SSIM of two ``[1, H, W]`` images with ssim_per_image's settings (Gaussian window sigma 1.5,
    truncate 3.5 -> 11 px, population covariance, data range 1), in float64."""
    from skimage.metrics import structural_similarity

    return structural_similarity(x[0].double().numpy(), y[0].double().numpy(), data_range=1.0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def test_pairwise_dissimilarity_is_one_minus_scikit_image_ssim():
    """Two masks with K = 3 phantom frames each (a frame and two redraws of it): the mean over the 3 pairs of
    1 - SSIM, SSIM by scikit-image."""
    frames = [[render_patient(SIZE, SEED, p, redraw=r)[0][2] for r in (None, 0, 1)] for p in (0, 1)]
    images = torch.tensor(np.stack([f for group in frames for f in group])[:, None] / 255.0, dtype=torch.float32)
    grouped = groups([0, 0, 0, 1, 1, 1])
    expected = [np.mean([1 - skimage_ssim(images[a], images[b]) for a, b in itertools.combinations(p, 2)])
                for p in grouped.values()]
    np.testing.assert_allclose(per_mask_diversity(images, grouped)["pairwise_dissimilarity"], expected, atol=1e-5)


def test_pairwise_dissimilarity_of_flat_bright_images_is_within_ssims_float32_bound():
    """Constant images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2 (the variances are 0), which
    scikit-image gives to 1e-15. ssim_per_image runs torchmetrics in float32 (float64 is 25-40x slower on a CPU):
    on flat images near 1 its windowed variances cancel, and it documents an error of up to 2e-3 there (1.7e-3
    seen at 0.95 vs 0.9) against 1e-5 on echo-like images (the test above)."""
    pairs = [(0.2, 0.7), (0.9, 0.8), (0.95, 0.9)]
    images = torch.tensor([v for pair in pairs for v in pair], dtype=torch.float32)[:, None, None, None]
    images = images.expand(-1, 1, 16, 16).contiguous()
    a, b = images[0::2, 0, 0, 0].double().numpy(), images[1::2, 0, 0, 0].double().numpy()
    closed_form = 1 - (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    np.testing.assert_allclose([1 - skimage_ssim(images[i], images[i + 1]) for i in (0, 2, 4)], closed_form,
                               atol=1e-12)  # the reference itself
    out = per_mask_diversity(images, groups([0, 0, 1, 1, 2, 2]))
    np.testing.assert_allclose(out["pairwise_dissimilarity"], closed_form, atol=2e-3)


# ---- the comparison rows --------------------------------------------------------------------------------------

def test_mean_of_k_identical_samples_scores_exactly_like_the_samples(records):
    """K = 3 identical samples per mask (interleaved): the mean-of-K row is the samples, so every paired metric
    (value and interval) is the samples row's; the samples row has zero diversity, the mean row (K = 1) none."""
    real = torch.tensor(np.stack([r["image"] for r in records[:3]]) / 255.0, dtype=torch.float32)
    masks = torch.tensor(np.stack([r["mask"] for r in records[:3]]))
    sample = (0.8 * real.flip(-1) + 0.1).clamp(0, 1)  # one imperfect sample per mask
    indices = np.array([0, 1, 2] * 3)
    sets = build_sets(sample[indices], indices, None, real, None, groups(indices), 0.5)
    assert torch.equal(sets["mean_of_k"].images, sample)
    rows = compare(sets, real, masks, Reference({}, None), {}, paired_metrics, n_boot=50)
    assert list(rows) == ["samples", "mean_of_k", "real", "constant"]
    for metric in ("ssim", "psnr", "b_dice", "surface_dice", "hd95"):
        samples, mean = rows["samples"][metric], rows["mean_of_k"][metric]
        assert (samples["n"], mean["n"], samples["n_masks"], mean["n_masks"]) == (9, 3, 3, 3)
        assert mean["value"] == pytest.approx(samples["value"], rel=1e-12)
        assert mean["ci95"] == pytest.approx(samples["ci95"], rel=1e-12)
    assert rows["samples"]["pixel_std"]["value"] == 0.0 and rows["samples"]["pixel_std"]["k"] == 3
    assert "pixel_std" not in rows["mean_of_k"]


def _rows(records, samples, indices, constant: float):
    """The comparison rows of ``samples`` against the first records, without distribution metrics."""
    real = torch.tensor(np.stack([r["image"] for r in records[:len(set(indices))]]) / 255.0, dtype=torch.float32)
    masks = torch.tensor(np.stack([r["mask"] for r in records[:len(real)]]))
    sets = build_sets(samples, np.asarray(indices), None, real, None, groups(indices), constant)
    return compare(sets, real, masks, Reference({}, None), {}, paired_metrics, n_boot=50), sets, real


def test_the_constant_row_is_a_flat_image_per_mask_scored_like_the_samples(records):
    """Samples of masks 0, 1, 2 (mask 0 twice): the constant row holds one flat image per mask; its SSIM is
    scikit-image's, its PSNR 10 log10(1 / mean((c - real)^2)), and it gets no distribution metric (copies of one
    flat image have no distribution)."""
    indices = [0, 1, 2, 0]
    rows, sets, real = _rows(records, torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),
                             indices, 0.25)
    flat = torch.full_like(real, 0.25)
    assert torch.equal(sets["constant"].images, flat) and sets["constant"].indices.tolist() == [0, 1, 2]
    ssim = np.mean([skimage_ssim(flat[i], real[i]) for i in range(3)])
    psnr = np.mean([10 * math.log10(1 / ((0.25 - real[i].double()) ** 2).mean().item()) for i in range(3)])
    assert rows["constant"]["ssim"]["value"] == pytest.approx(ssim, abs=1e-5)
    assert rows["constant"]["psnr"]["value"] == pytest.approx(psnr, rel=1e-5)
    assert rows["constant"]["b_dice"]["value"] == 0.0  # a flat image has no edges
    assert not {"frd_v0", "precision"} & set(rows["constant"]) and "precision" in rows["samples"]


def test_samples_below_a_constant_image_are_flagged_and_the_real_images_are_not(records):
    """Noise and a mid-grey image score below a flat image at the data's mean intensity on SSIM and PSNR: the
    report says the model may be untrained or broken; the real images themselves (SSIM 1, PSNR infinite) are not."""
    real = torch.tensor(np.stack([r["image"] for r in records[:4]]) / 255.0, dtype=torch.float32)
    mean = float(torch.tensor(np.stack([r["image"] for r in records]) / 255.0).mean())
    noise = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for samples in (noise, torch.full_like(real, 0.5)):
        rows = _rows(records, samples, [0, 1, 2, 3], mean)[0]
        warnings = below_constant(rows)
        assert [w.split(" ")[:2] for w in warnings] == [[FLAG_BROKEN, "SSIM"], [FLAG_BROKEN, "PSNR"]]
        ssim, floor = rows["samples"]["ssim"]["value"], rows["constant"]["ssim"]["value"]
        assert warnings[0] == (f"{FLAG_BROKEN} SSIM {ssim:.3g} is below what a constant image scores ({floor:.3g}): "
                               "the model may be untrained or broken (no oracle row checks that a perfect sampler "
                               "scores above it on these data)")  # these rows have no oracle
    assert below_constant(_rows(records, real, [0, 1, 2, 3], mean)[0]) == []


def test_oracle_redraws_count_earlier_samples_of_the_same_mask():
    assert oracle_redraws([3, 1, 3, 3, 1]).tolist() == [0, 0, 1, 2, 1]
    assert oracle_redraws([]).tolist() == []


def test_a_flag_needs_an_interval_of_the_difference_from_the_oracle_that_excludes_zero():
    """(model - oracle) surely better on a paired metric (SSIM higher, HD95 lower) -> averaging; surely less
    diverse -> collapse; an interval containing 0, a worse paired score, more diversity or a distribution
    metric -> nothing."""
    from utils.evaluation.comparison import flag

    assert flag("ssim", 0.01, 0.05) == FLAG_AVERAGING and flag("ssim", -0.01, 0.05) == ""
    assert flag("hd95", -2.0, -0.5) == FLAG_AVERAGING and flag("hd95", 0.5, 2.0) == ""
    assert flag("pixel_std", -0.02, -0.01) == FLAG_COLLAPSE and flag("pixel_std", -0.01, 0.01) == ""
    assert flag("pairwise_dissimilarity", 0.1, 0.2) == "" and flag("frd_v0", -9.0, -1.0) == ""


def test_flags_come_from_the_per_mask_differences_with_the_oracle():
    """A row 0.1 SSIM above the oracle on every mask is flagged; one that straddles it (+-0.1 on alternate
    masks) is not, although its mean is above; no oracle row, no flags."""
    from utils.evaluation.comparison import _against_oracle

    oracle = {"ssim": {m: 0.5 for m in range(8)}}
    above = {"ssim": {"value": 0.6}}
    _against_oracle(above, {"ssim": {m: 0.6 for m in range(8)}}, oracle, n_boot=200)
    straddle = {"ssim": {"value": 0.51}}
    _against_oracle(straddle, {"ssim": {m: 0.6 if m % 2 else 0.42 for m in range(8)}}, oracle, n_boot=200)
    assert above["ssim"]["vs_oracle"]["difference"] == pytest.approx(0.1)
    rows = {"samples": straddle, "mean_of_k": above, "oracle": {"ssim": {"value": 0.5}}}
    assert flags(rows) == {"samples": {}, "mean_of_k": {"ssim": FLAG_AVERAGING}}
    assert flags({"samples": {"ssim": {"value": 0.6}}}) == {"samples": {}}


# ---- the phantoms' oracle ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("patient", [0, 5])
def test_echo_redraws_keep_the_masks_bit_for_bit_and_change_the_images(patient):
    plain = render_patient(SIZE, SEED, patient)
    redraws = [render_patient(SIZE, SEED, patient, redraw=k) for k in (0, 1)]
    for frame, first, second in zip(plain, *redraws):
        assert frame[:2] == first[:2] == second[:2]  # view, phase
        assert np.array_equal(first[3], frame[3]) and np.array_equal(second[3], frame[3])
        assert not np.array_equal(first[2], frame[2])
        assert not np.array_equal(second[2], first[2])


def test_echo_plain_render_is_what_the_dataset_holds(records):
    """After redraws (no hidden state), redraw=None still renders the saved dataset's records bit for bit."""
    render_patient(SIZE, SEED, 2, redraw=3)
    for record in records:
        patient = int(record["metadata"]["patient"][5:]) - 1
        frame = {(v, p): (i, m) for v, p, i, m in render_patient(SIZE, SEED, patient)}
        image, mask = frame[record["metadata"]["view"], record["metadata"]["phase"]]
        assert np.array_equal(record["image"][0], image) and np.array_equal(record["mask"][0], mask)


def test_oracle_images_are_the_redrawn_frames_of_each_record(records):
    """The oracle of a record is the redraw-k render of its patient's frame: the record's mask, a new image."""
    chosen = [records[0], records[5], records[13]]
    by_k = {k: oracle_images(chosen, SYNTHETIC, k) for k in (0, 1)}
    for n, record in enumerate(chosen):
        meta = record["metadata"]
        patient = int(meta["patient"][5:]) - 1
        for k, out in by_k.items():
            frame = {(v, p): (i, m) for v, p, i, m in render_patient(SIZE, SEED, patient, redraw=k)}
            image, mask = frame[meta["view"], meta["phase"]]
            assert out.dtype == np.uint8 and out.shape == (3, 1, SIZE, SIZE)
            assert np.array_equal(out[n, 0], image)
            assert np.array_equal(mask, record["mask"][0])
        assert not np.array_equal(by_k[0][n], record["image"])
        assert not np.array_equal(by_k[0][n], by_k[1][n])


def test_oracle_set_gives_the_kth_sample_of_a_mask_the_kth_redraw(records):
    indices = np.array([4, 4, 9, 4])
    out = oracle_set(records, SYNTHETIC, indices)
    assert out.dtype == torch.float32 and out.shape == (4, 1, SIZE, SIZE)
    expected = [oracle_images([records[i]], SYNTHETIC, k)[0] / 255.0 for i, k in zip(indices, (0, 1, 0, 2))]
    torch.testing.assert_close(out, torch.tensor(np.stack(expected), dtype=torch.float32), rtol=0, atol=0)


def test_oracle_refuses_records_that_are_not_the_phantoms(records):
    altered = {**records[0], "mask": records[0]["mask"].copy()}
    altered["mask"][0, SIZE // 2, SIZE // 2] ^= 1
    with pytest.raises(OracleUnavailable, match="mask differs"):
        oracle_images([records[1], altered], SYNTHETIC, 0)
    with pytest.raises(OracleUnavailable, match="mask differs"):
        oracle_images(records[:1], {"size": SIZE, "seed": SEED + 1}, 0)  # another seed: another heart
    for metadata in ({}, {**records[0]["metadata"], "patient": "patient0001"}):
        with pytest.raises(OracleUnavailable, match="no phantom patient id"):
            oracle_images([{**records[0], "metadata": metadata}], SYNTHETIC, 0)
    with pytest.raises(OracleUnavailable, match="not a built-in phantom"):
        oracle_images(records[:1], None, 0)
    with pytest.raises(OracleUnavailable):
        oracle_set(records, None, np.array([0, 0]))


def test_brain_redraw_keeps_the_mask_bit_for_bit_and_changes_the_image():
    image, mask, hemisphere = render_brain(16, 0, 0)
    for k in (0, 1):
        redrawn, redrawn_mask, redrawn_hemisphere = render_brain(16, 0, 0, redraw=k)
        assert np.array_equal(redrawn_mask, mask) and redrawn_hemisphere == hemisphere
        assert not np.array_equal(redrawn, image)
    assert set(np.unique(mask)) == {0, 1, 2, 3}  # every label present, so the equality says something


# ---- Fréchet Radiomics Distance ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v0_reference():
    """The v0 extractor and the raw v0 features of 12 phantom frames (patients 0-2)."""
    extractor = RadiomicsExtractor("v0")
    return extractor, extractor(echo_frames(range(3)))


def test_frd_of_a_set_against_itself(v0_reference):
    """v0: 0 up to scipy's sqrtm on a rank-deficient covariance (12 images, ~100 features; the package's CLI
    gives -1.6e-4 for 10 such frames against themselves, beside ~400 for two different sets); v1's pipeline (a
    log) on the same features: -inf. (The slow CLI test checks v1 features.)"""
    _, features = v0_reference
    assert abs(frechet_radiomics_distance(features, features, "v0")) < 1e-3
    assert frechet_radiomics_distance(features, features, "v1") == -np.inf


def test_frd_v0_grows_with_blur(v0_reference):
    """Another 12 frames (patients 3-5) blurred with sigma 0, 0.5, 1.5, 3 px leave the reference further each time."""
    extractor, reference = v0_reference
    other = echo_frames(range(3, 6))
    distances = [frechet_radiomics_distance(reference, extractor(gaussian_filter(other, (0, 0, s, s))), "v0")
                 for s in (0.0, 0.5, 1.5, 3.0)]
    assert all(a < b for a, b in itertools.pairwise(distances)), distances


def run_frd_cli(first, second, version: str) -> float:
    """``python -m frd_score FIRST SECOND --frd_version VERSION`` (one worker), its printed value."""
    out = subprocess.run([sys.executable, "-m", "frd_score", str(first), str(second), "--frd_version", version,
                          "-w", "1"], capture_output=True, text=True, check=True).stdout
    return float(re.search(rf"FRD \({version}\): (\S+)", out).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v0", "v1"])
def test_frd_equals_the_frd_score_cli(version, tmp_path):
    """10 and 12 phantom frames written as PNG folders: the package's CLI and frechet_radiomics_distance on
    RadiomicsExtractor's features agree; a set against itself: v0 as the CLI's value, v1 -inf."""
    a, b = echo_frames(range(3))[:10], echo_frames(range(3, 6))
    write_images(a, tmp_path / "a")
    write_images(b, tmp_path / "b")
    extractor = RadiomicsExtractor(version)
    features_a, features_b = extractor(a), extractor(b)
    expected = run_frd_cli(tmp_path / "a", tmp_path / "b", version)
    assert np.isfinite(expected) and expected != 0
    assert frechet_radiomics_distance(features_a, features_b, version) == pytest.approx(expected, rel=1e-6)
    if version == "v0":
        itself = run_frd_cli(tmp_path / "a", tmp_path / "a", version)
        assert frechet_radiomics_distance(features_a, features_a, version) == pytest.approx(itself, abs=1e-7)
    else:
        assert frechet_radiomics_distance(features_a, features_a, version) == -np.inf


def test_every_distribution_row_scores_one_image_per_mask_of_the_same_masks():
    """K = 2 samples for masks 0 and 2, one for mask 1: the distribution sets of samples, oracle, mean of K and
    real all hold masks 0 and 2 once (N = 2 each): the first sample, the first oracle image, the mean, the real
    image; the paired rows keep every sample."""
    images = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1).expand(5, 1, 4, 4) / 10
    indices = np.array([0, 1, 2, 0, 2])
    real = torch.full((3, 1, 4, 4), 0.9) * torch.arange(1, 4).reshape(3, 1, 1, 1)
    sets = build_sets(images, indices, None, real, images + 0.05, groups(indices), 0.5)
    assert torch.equal(sets["samples"].distribution, images[[0, 2]])
    assert torch.equal(sets["oracle"].distribution, (images + 0.05)[[0, 2]])
    means = torch.stack([(images[0] + images[3]) / 2, (images[2] + images[4]) / 2])
    assert torch.allclose(sets["mean_of_k"].images, means)
    assert torch.equal(sets["real"].images, real[[0, 2]]) and sets["real"].indices.tolist() == [0, 2]
    assert len(sets["samples"].images) == len(sets["oracle"].images) == 5
