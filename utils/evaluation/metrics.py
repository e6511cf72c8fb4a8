"""Metric definitions (pure functions: features or image tensors in, numbers out; no I/O).

Inputs: generated and real images ``float [N,1,H,W]`` in [0, 1], paired by index (generated image i
was conditioned on the mask of real image i), and masks ``uint8 [N,1,H,W]`` with labels 0..3
(0 = background). Nothing is rescaled per image. PSNR and the edge-map metrics also take volumes
``[N,1,D,H,W]`` (same definitions with a third axis: voxels for pixels, a ball for the disk); the
volume-only metrics (SSIM/MS-SSIM of volumes, MMD, 2.5-D FID) are in :mod:`utils.evaluation.volume_metrics`.
Set-level metrics take features computed by an extractor from :mod:`utils.evaluation.feature_extractors`, so
tests can inject small random-weight networks.

Set-level:

- FID: ``||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})`` in float64, with
  ``np.cov`` (N - 1) covariances; the trace term is computed as ``sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2}))``,
  the same eigenvalues as torch-fidelity's ``eig(S_a S_b)`` but from symmetric matrices.
- KID: torch-fidelity's estimator: ``subsets`` times draw ``m = min(subset_size, N_a, N_b)`` rows of
  each set without replacement, unbiased MMD^2 with the kernel ``k(x, y) = (x.y / D + 1)^3``; report
  mean and std over subsets. The default ``np.random.RandomState(2020)`` reproduces torch-fidelity.
- CMMD: embeddings L2-normalised, Gaussian RBF ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``,
  sigma 10, biased (V-statistic) MMD^2 over the full sets, times 1000 (as google-research ``cmmd``).

Per image (each generated image against its paired real image):

- SSIM: torchmetrics' SSIM map (Gaussian window 11, sigma 1.5, data_range 1, float32) averaged over
  the valid region (a 5-pixel border left out), which equals scikit-image's ``structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)`` to within 1e-5.
- PSNR: ``10 log10(1 / MSE)`` per image (data_range 1); ``inf`` for identical images.
- Edge map E(x, mask), the same for both images of a pair (constants: ``EDGE_SMOOTH_SIGMA`` = 2.0 px,
  ``EDGE_REGION_RADIUS`` = 5 px, ``EDGE_TOP_FRACTION`` = 0.10; pixel (voxel) units at the evaluated size):
  1. ``g = gaussian_filter(x, EDGE_SMOOTH_SIGMA)`` (``mode="nearest"``);
  2. ``m = sqrt(sum over axes a of sobel_a(g)^2)`` (scipy.ndimage.sobel, ``mode="nearest"``; in 3-D each
     derivative is smoothed [1, 2, 1] along both other axes);
  3. region ``R`` = (mask > 0) dilated by a disk (3-D: ball) of radius ``EDGE_REGION_RADIUS`` px;
  4. ``E = R & (m >= t) & (m > 0)`` with ``t`` the ``1 - EDGE_TOP_FRACTION`` quantile of ``m`` over
     ``R`` (numpy's linear quantile): the strongest ``EDGE_TOP_FRACTION`` of the region's pixels.
     ``E`` is empty when ``R`` is empty or the image is constant on ``R``.
- B-Dice: ``2 |E_gen & E_real| / (|E_gen| + |E_real|)``; 1 when both maps are empty.
- Surface Dice (normalised surface Dice, NSD, at ``SURFACE_DICE_TOLERANCE`` = 2 px unless given):
  MONAI ``compute_surface_dice`` (what ``SurfaceDiceMetric`` computes) between ``E_gen`` and ``E_real``:
  the boundary pixels of each map, the fraction of both boundaries' pixels lying within the tolerance
  (Euclidean, pixels) of the other boundary. 1 when both maps are empty, 0 when exactly one is. Unlike
  B-Dice it is monotone in misalignment: on edge maps of the synthetic test set shifted by 0/1/3/6 px
  B-Dice is 1.00/0.58/0.10/0.26 and NSD@2px 1.00/1.00/0.67/0.41.
- HD95: MONAI ``compute_hausdorff_distance(percentile=95)`` between ``E_gen`` and ``E_real``: the
  boundary pixels of each map (the map minus its binary erosion with the 4-connected cross; 3-D: the
  6-connected one), Euclidean distance (pixels, voxel units in 3-D) from each boundary pixel of one map
  to the nearest of the other, 95th percentile (``torch.quantile``, linear) in each direction, the larger
  of the two. Both maps empty: 0. Exactly one empty: the image diagonal ``sqrt(H^2 + W^2)`` (3-D:
  ``sqrt(D^2 + H^2 + W^2)``; the largest distance possible), so that means stay finite.

Summaries: :func:`bootstrap_ci` gives the mean and a 95% percentile-bootstrap interval that resamples
clusters (the source images whose masks conditioned the samples) rather than samples;
:func:`summarise` adds N and the number of clusters.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

logger = logging.getLogger(__name__)

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed
EDGE_SMOOTH_SIGMA = 2.0
EDGE_REGION_RADIUS = 5
EDGE_TOP_FRACTION = 0.10
HD_PERCENTILE = 95.0
SURFACE_DICE_TOLERANCE = 2.0  # pixels
SSIM_SIGMA = 1.5
SSIM_BORDER = 5  # (window 11 - 1) / 2, window = 2 * int(3.5 * sigma + 0.5) + 1


def _features_f64(feats, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"{name}: expected features [N, D] with N >= 2, got shape {feats.shape}")
    return feats


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues -> 0)."""
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a, feats_b) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (float64; see module docstring)."""
    a, b = _features_f64(feats_a, "feats_a"), _features_f64(feats_b, "feats_b")
    _check_pair(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 (torch-fidelity / MMD-GAN ``mmd2``)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_diag = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(off_diag / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_a,
    feats_b,
    subset_size: int = KID_SUBSET_SIZE,
    subsets: int = KID_SUBSETS,
    rng: np.random.RandomState | None = None,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between ``[N_a, D]`` and ``[N_b, D]``; subset size capped at N.

    ``rng`` draws the subsets (``rng.choice(N, m, replace=False)``, first set then second, as
    torch-fidelity); ``None`` means ``np.random.RandomState(KID_SEED)``.
    """
    a, b = _features_f64(feats_a, "feats_a"), _features_f64(feats_b, "feats_b")
    _check_pair(a, b)
    m = min(subset_size, len(a), len(b))
    rng = np.random.RandomState(KID_SEED) if rng is None else rng
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values[i] = _poly_mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


def cmmd(emb_a, emb_b, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD: ``scale * (mean K_aa + mean K_bb - 2 mean K_ab)`` on L2-normalised embeddings (V-statistic)."""
    a, b = _features_f64(emb_a, "emb_a"), _features_f64(emb_b, "emb_b")
    _check_pair(a, b)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(x: np.ndarray, y: np.ndarray) -> float:
        sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        return float(np.exp(-gamma * sq).mean())

    return scale * (mean_kernel(a, a) + mean_kernel(b, b) - 2.0 * mean_kernel(a, b))


def check_images(generated: torch.Tensor, real: torch.Tensor, ndim: tuple[int, ...] = (4, 5)) -> None:
    """ValueError unless ``generated`` and ``real`` are one-channel tensors of one shape with ``ndim`` axes."""
    if generated.shape != real.shape or generated.ndim not in ndim or generated.shape[1] != 1:
        expected = " or ".join({4: "images [N,1,H,W]", 5: "volumes [N,1,D,H,W]"}[n] for n in ndim)
        raise ValueError(f"expected paired {expected} of equal shape, got {tuple(generated.shape)} "
                         f"and {tuple(real.shape)}")


def ssim_per_image(generated: torch.Tensor, real: torch.Tensor) -> np.ndarray:
    """SSIM of each pair ``[N,1,H,W]`` in [0, 1] -> ``float64 [N]``.

    torchmetrics' SSIM map (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data_range 1), averaged
    over the valid region only: the ``SSIM_BORDER``-pixel border, where the window would reach into
    padding, is left out (as scikit-image and Wang et al.; torchmetrics itself averages the padded map).
    Computed in float32 (float64 convolutions are 25-40x slower on a CPU): within 1e-5 of scikit-image's float64
    on echo-like images, but up to 2e-3 off on flat images near 1, where the windowed variances cancel.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_images(generated, real, ndim=(4,))
    b = SSIM_BORDER
    if min(real.shape[-2:]) <= 2 * b:
        raise ValueError(f"SSIM needs images over {2 * b} pixels per side, got {tuple(real.shape[-2:])}")
    _, ssim_map = structural_similarity_index_measure(
        generated.float(), real.float(), sigma=SSIM_SIGMA, data_range=1.0, reduction="none",
        return_full_image=True,
    )
    return ssim_map[..., b:-b, b:-b].double().mean(dim=(1, 2, 3)).cpu().numpy()


def psnr_per_image(generated: torch.Tensor, real: torch.Tensor) -> np.ndarray:
    """PSNR in dB of each pair ``[N,1,H,W]`` or ``[N,1,D,H,W]`` in [0, 1] -> ``float64 [N]`` (not pooled
    over the batch)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    check_images(generated, real)
    values = peak_signal_noise_ratio(generated.double(), real.double(), data_range=1.0, reduction="none",
                                     dim=tuple(range(1, real.ndim)))
    return values.cpu().numpy()


def _disk(radius: int, ndim: int = 2) -> np.ndarray:
    """The integer offsets within Euclidean distance ``radius``: a disk (ndim 2) or a ball (ndim 3)."""
    grid = np.mgrid[(slice(-radius, radius + 1),) * ndim]
    return (grid**2).sum(0) <= radius**2


def edge_map(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Binary edge map ``bool [H, W]`` (``[D, H, W]``) of one image ``[H, W]`` (volume ``[D, H, W]``) in
    [0, 1] within its dilated mask region."""
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), EDGE_SMOOTH_SIGMA, mode="nearest")
    magnitude = np.hypot.reduce([ndimage.sobel(smooth, axis=a, mode="nearest") for a in range(smooth.ndim)])
    region = ndimage.binary_dilation(np.asarray(mask) > 0, structure=_disk(EDGE_REGION_RADIUS, smooth.ndim))
    if not region.any():
        return np.zeros_like(region)
    threshold = np.quantile(magnitude[region], 1.0 - EDGE_TOP_FRACTION)
    return region & (magnitude >= threshold) & (magnitude > 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean maps; 1 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance (pixels) between boolean maps ``[H, W]`` or ``[D, H, W]``
    (MONAI's).

    Both empty: 0; exactly one empty: the diagonal ``sqrt(H^2 + W^2)`` (``sqrt(D^2 + H^2 + W^2)``).
    """
    from monai.metrics import compute_hausdorff_distance

    a_any, b_any = bool(a.any()), bool(b.any())
    if not (a_any or b_any):
        return 0.0
    if a_any != b_any:
        return math.hypot(*a.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty maps, which are handled above
        value = compute_hausdorff_distance(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                                           include_background=True, percentile=HD_PERCENTILE)
    return float(value.item())


def surface_dice(a: np.ndarray, b: np.ndarray, tolerance: float = SURFACE_DICE_TOLERANCE) -> float:
    """Normalised surface Dice of boolean maps ``[H, W]`` or ``[D, H, W]`` at ``tolerance`` pixels (MONAI's); see
    module docstring."""
    from monai.metrics import compute_surface_dice

    a_any, b_any = bool(a.any()), bool(b.any())
    if a_any != b_any:
        return 0.0
    if not a_any:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notice about get_mask_edges' return type
        value = compute_surface_dice(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                                     [float(tolerance)], include_background=True)
    return float(value.item())


def _edge_maps(images: torch.Tensor, masks: torch.Tensor) -> list[np.ndarray]:
    images, masks = images.detach().cpu().numpy(), masks.detach().cpu().numpy()
    return [edge_map(images[i, 0], masks[i, 0]) for i in range(len(images))]


def boundary_metrics(generated: torch.Tensor, real: torch.Tensor, masks: torch.Tensor,
                     tolerance: float = SURFACE_DICE_TOLERANCE) -> dict[str, np.ndarray]:
    """``{"b_dice", "surface_dice", "hd95"}`` -> ``float64 [N]`` each, of the edge maps of each pair
    ``[N,1,H,W]`` or ``[N,1,D,H,W]`` (each map computed once); ``tolerance`` (px) is the surface Dice's."""
    check_images(generated, real)
    check_masks(real, masks)
    pairs = list(zip(_edge_maps(generated, masks), _edge_maps(real, masks)))
    return {"b_dice": np.array([dice(g, r) for g, r in pairs]),
            "surface_dice": np.array([surface_dice(g, r, tolerance) for g, r in pairs]),
            "hd95": np.array([hd95(g, r) for g, r in pairs])}


def check_masks(images: torch.Tensor, masks: torch.Tensor) -> None:
    """ValueError unless ``masks`` have the shape of ``images``."""
    if masks.shape != images.shape:
        raise ValueError(f"masks shape {tuple(masks.shape)} does not match images {tuple(images.shape)}")


def boundary_dice_per_image(generated: torch.Tensor, real: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """B-Dice of each pair (edge maps of generated vs real within the pair's heart region) -> ``[N]``."""
    check_images(generated, real)
    check_masks(real, masks)
    return np.array([dice(g, r) for g, r in zip(_edge_maps(generated, masks), _edge_maps(real, masks))])


def hd95_per_image(generated: torch.Tensor, real: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """HD95 in pixels of each pair's edge maps (generated vs real) -> ``[N]``."""
    check_images(generated, real)
    check_masks(real, masks)
    return np.array([hd95(g, r) for g, r in zip(_edge_maps(generated, masks), _edge_maps(real, masks))])


def surface_dice_per_image(generated: torch.Tensor, real: torch.Tensor, masks: torch.Tensor,
                           tolerance: float = SURFACE_DICE_TOLERANCE) -> np.ndarray:
    """Surface Dice at ``tolerance`` px of each pair's edge maps (generated vs real) -> ``[N]``."""
    check_images(generated, real)
    check_masks(real, masks)
    return np.array([surface_dice(g, r, tolerance) for g, r in zip(_edge_maps(generated, masks),
                                                                   _edge_maps(real, masks))])


def paired_metrics(generated: torch.Tensor, real: torch.Tensor, masks: torch.Tensor, batch_size: int = 64,
                   tolerance: float = SURFACE_DICE_TOLERANCE) -> dict[str, np.ndarray]:
    """All per-image metrics ``{"ssim", "psnr", "b_dice", "surface_dice", "hd95"}`` -> ``float64 [N]`` each;
    ``tolerance`` (px) is the surface Dice's.

    Same values as the single-metric functions; edge maps are computed once per image.
    """
    check_images(generated, real)
    check_masks(real, masks)
    out: dict[str, list[np.ndarray]] = {"ssim": [], "psnr": [], "b_dice": [], "surface_dice": [], "hd95": []}
    for start in tqdm(range(0, len(real), batch_size), desc="per-image metrics", unit="batch", leave=False):
        gen, ref, msk = (t[start : start + batch_size] for t in (generated, real, masks))
        out["ssim"].append(ssim_per_image(gen, ref))
        out["psnr"].append(psnr_per_image(gen, ref))
        for name, values in boundary_metrics(gen, ref, msk, tolerance).items():
            out[name].append(values)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def bootstrap_ci(values, clusters=None, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval ``(mean, lo, hi)`` of per-image values ``[N]``.

    ``clusters`` ``[N]`` (any hashable ids; default: each value its own cluster) names the unit that is
    resampled: in evaluation, the source image whose mask conditioned each sample, so N samples that
    cycle over K < N masks are not counted as N independent draws (a cluster bootstrap). Each of the
    ``n_boot`` replicates draws K clusters with replacement (``np.random.default_rng(seed).integers(0, K,
    size=(n_boot, K))``, clusters in sorted id order) and takes the mean of all values in the drawn
    clusters: ``sum of drawn cluster sums / sum of drawn cluster counts``. lo/hi are the 2.5% / 97.5%
    quantiles of the replicates (``inverted_cdf``: defined with ``inf`` values, as PSNR of identical
    images). ``mean`` is the mean over all N values. NaN is an error.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if np.isnan(values).any():
        raise ValueError(f"bootstrap_ci: {int(np.isnan(values).sum())} of {values.size} values are NaN")
    if clusters is None:
        sums, counts = values, np.ones(values.size)
    else:
        clusters = np.asarray(clusters).ravel()
        if clusters.size != values.size:
            raise ValueError(f"bootstrap_ci: {clusters.size} cluster ids for {values.size} values")
        _, members = np.unique(clusters, return_inverse=True)
        sums, counts = np.bincount(members, weights=values), np.bincount(members).astype(np.float64)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, sums.size, size=(n_boot, sums.size))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
    return float(values.mean()), float(lo), float(hi)


def summarise(values, clusters=None, n_boot: int = 1000, seed: int = 0) -> dict[str, float | int]:
    """``{"n", "n_clusters", "mean", "ci95_lo", "ci95_hi"}`` of per-image values (see :func:`bootstrap_ci`)."""
    mean, lo, hi = bootstrap_ci(values, clusters, n_boot=n_boot, seed=seed)
    n = int(np.asarray(values).size)
    n_clusters = n if clusters is None else int(np.unique(np.asarray(clusters)).size)
    return {"n": n, "n_clusters": n_clusters, "mean": mean, "ci95_lo": lo, "ci95_hi": hi}
