"""Metric definitions for volumes (pure functions: volumes or features in, numbers out; no I/O).

Inputs: generated and real volumes ``float [N,1,D,H,W]`` in [0, 1], paired by index (generated volume i
was conditioned on the mask of real volume i), masks ``uint8 [N,1,D,H,W]``. Nothing is rescaled per
volume. PSNR, B-Dice, surface Dice and HD95 are the 2-D definitions of :mod:`utils.evaluation.metrics`
on 3-D edge maps (voxel units); FID is its :func:`~utils.evaluation.metrics.frechet_distance`.

Per volume (each generated volume against its paired real volume):

- SSIM: MONAI ``SSIMMetric(spatial_dims=3, data_range=1)`` with its defaults, the 2-D SSIM's constants:
  Gaussian window 11 (sigma 1.5, separable), K1 0.01, K2 0.03; MONAI convolves without padding, so the
  map covers the valid region only (as the 2-D SSIM's left-out border) and is averaged over it. Needs
  every side >= ``SSIM_WINDOW``.
- MS-SSIM: MONAI ``MultiScaleSSIMMetric(spatial_dims=3, data_range=1, kernel_size=5, weights=(0.1, 0.3,
  0.6))``, the setting of MOTFM's 3-D evaluation (evaluation_3d/evaluate_3d.py): 3 scales, 2x average
  pooling between them, ``relu(cs_1)^0.1 * relu(cs_2)^0.3 * relu(ssim_3)^0.6`` with each term the mean
  of its valid-region map (Gaussian window 5, sigma 1.5). MONAI's five-scale default (window 11) needs
  sides >= 176 voxels; this one needs sides >= ``MS_SSIM_MIN_SIDE`` = 20 (MONAI's check, ``side //
  (scales - 1)^2 > window - 1``), so it runs at the quick-start sizes. Smaller volumes: not computable
  (:func:`ms_ssim_problem` says why).

Set level:

- MMD: MONAI ``MMDMetric()`` (``compute_mmd``, no ``y_mapping``): each volume is one sample, a vector of
  its D*H*W voxels; the kernel is linear, ``k(x, y) = x . y`` (a sum over voxels, so the value grows with
  the volume size); the estimator is Gretton et al.'s unbiased MMD^2 (JMLR 2012, eq. 3):
  ``mean_{i!=j} k(r_i, r_j) + mean_{i!=j} k(g_i, g_j) - 2 mean_{i,j} k(g_i, r_j)``. With a linear kernel
  this equals ``||mean(r) - mean(g)||^2 - tr(C_r) / m - tr(C_g) / n`` (C: (N - 1) covariance of the
  voxel vectors): an unbiased estimate of the squared distance between the two mean volumes, 0 for two
  sets of one repeated volume, and slightly negative for a set against itself (-2 tr(C) / N). MONAI
  requires sets of equal size (>= 2 each), so it compares the generated volumes with their paired real
  volumes (as MOTFM). Not a per-pair score: one number per set.
- 2.5-D FID (as MAISI reports it): the 2-D FID extractor (Inception) on every slice of the three
  orthogonal planes, each plane on its own: ``HW`` (slices at each depth index d, images ``[H, W]``),
  ``DW`` (at each h, ``[D, W]``), ``DH`` (at each w, ``[D, H]``); per plane the FID of all real slices
  against all generated slices, and the mean of the three. Every slice counts, background ones too.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from utils.evaluation.metrics import (
    SURFACE_DICE_TOLERANCE,
    boundary_metrics,
    check_images,
    check_masks,
    frechet_distance,
    psnr_per_image,
)
from utils.images import PLANES

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
MS_SSIM_KERNEL = 5
MS_SSIM_WEIGHTS = (0.1, 0.3, 0.6)
MS_SSIM_MIN_SIDE = MS_SSIM_KERNEL * max(1, len(MS_SSIM_WEIGHTS) - 1) ** 2


def ssim_per_volume(generated: torch.Tensor, real: torch.Tensor) -> np.ndarray:
    """SSIM of each pair ``[N,1,D,H,W]`` in [0, 1] -> ``float64 [N]`` (MONAI; see module docstring)."""
    from monai.metrics import SSIMMetric

    check_images(generated, real, ndim=(5,))
    if min(real.shape[2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs volumes of at least {SSIM_WINDOW} voxels per side, got "
                         f"{tuple(real.shape[2:])}")
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=SSIM_WINDOW, kernel_sigma=SSIM_SIGMA,
                        reduction="none")
    return metric(generated.float(), real.float()).double().flatten().cpu().numpy()


def ms_ssim_problem(shape) -> str | None:
    """Why MS-SSIM cannot be computed on volumes of ``shape`` (``[..., D, H, W]``), or None when it can."""
    sides = tuple(shape[-3:])
    if min(sides) >= MS_SSIM_MIN_SIDE:
        return None
    return (f"MS-SSIM ({len(MS_SSIM_WEIGHTS)} scales, window {MS_SSIM_KERNEL}) needs volumes of at least "
            f"{MS_SSIM_MIN_SIDE} voxels per side, got {'x'.join(map(str, sides))}")


def ms_ssim_per_volume(generated: torch.Tensor, real: torch.Tensor) -> np.ndarray:
    """MS-SSIM of each pair ``[N,1,D,H,W]`` in [0, 1] -> ``float64 [N]`` (MONAI; see module docstring)."""
    from monai.metrics import MultiScaleSSIMMetric

    check_images(generated, real, ndim=(5,))
    problem = ms_ssim_problem(real.shape)
    if problem:
        raise ValueError(problem)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                                  kernel_sigma=SSIM_SIGMA, weights=MS_SSIM_WEIGHTS, reduction="none")
    return metric(generated.float(), real.float()).double().flatten().cpu().numpy()


def mmd_problem(count: int) -> str | None:
    """Why MMD cannot be computed on ``count`` generated volumes, or None when it can."""
    return None if count >= 2 else "MMD needs at least 2 generated volumes"


def mmd(real: torch.Tensor, generated: torch.Tensor) -> float:
    """MONAI's unbiased linear-kernel MMD^2 between two sets of ``[N,1,D,H,W]`` volumes (float64; module
    docstring). Memory: the sets as ``N x D*H*W`` float64 matrices."""
    from monai.metrics import MMDMetric

    check_images(generated, real, ndim=(5,))
    if len(real) < 2:
        raise ValueError(f"MMD needs at least 2 volumes per set, got {len(real)}")
    return float(MMDMetric()(real.double(), generated.double()))


def paired_volume_metrics(generated: torch.Tensor, real: torch.Tensor, masks: torch.Tensor, batch_size: int = 8,
                          tolerance: float = SURFACE_DICE_TOLERANCE) -> dict[str, np.ndarray]:
    """All per-volume metrics ``{"ssim", ["ms_ssim",] "psnr", "b_dice", "surface_dice", "hd95"}`` -> ``float64
    [N]`` each; ``ms_ssim`` only where :func:`ms_ssim_problem` allows it; ``tolerance`` (voxels) is the
    surface Dice's."""
    check_images(generated, real, ndim=(5,))
    check_masks(real, masks)
    with_ms_ssim = ms_ssim_problem(real.shape) is None
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("ssim", "ms_ssim", "psnr", "b_dice",
                                                              "surface_dice", "hd95")}
    if not with_ms_ssim:
        del out["ms_ssim"]
    for start in tqdm(range(0, len(real), batch_size), desc="per-volume metrics", unit="batch", leave=False):
        gen, ref, msk = (t[start : start + batch_size] for t in (generated, real, masks))
        out["ssim"].append(ssim_per_volume(gen, ref))
        if with_ms_ssim:
            out["ms_ssim"].append(ms_ssim_per_volume(gen, ref))
        out["psnr"].append(psnr_per_image(gen, ref))
        for name, values in boundary_metrics(gen, ref, msk, tolerance).items():
            out[name].append(values)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def plane_slices(volumes: torch.Tensor, plane: str) -> torch.Tensor:
    """Every slice of ``plane`` (one of :data:`utils.images.PLANES`) of ``[N,1,D,H,W]`` volumes as images
    ``[N*S,1,a,b]``, volume by volume (S: the volumes' size along the sliced axis)."""
    if volumes.ndim != 5 or volumes.shape[1] != 1:
        raise ValueError(f"expected volumes [N,1,D,H,W], got shape {tuple(volumes.shape)}")
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    moved = volumes.movedim(2 + PLANES.index(plane), 1)  # the fixed axis of [N,1,D,H,W] first: [N, S, 1, a, b]
    return moved.reshape(-1, 1, *moved.shape[-2:])


def fid_2p5d(real_features: dict[str, np.ndarray], generated_features: dict[str, np.ndarray]) -> dict[str, float]:
    """``{plane: FID, ..., "mean": mean of the three}`` from per-plane slice features ``{plane: [M, F]}``."""
    per_plane = {p: frechet_distance(real_features[p], generated_features[p]) for p in PLANES}
    return {**per_plane, "mean": float(np.mean(list(per_plane.values())))}
