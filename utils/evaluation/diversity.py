"""Diversity per mask, and what an average of the samples would score.

Samples that share a mask (the same source index) form a group. For a group of K >= 2 images ``x_1..x_K``:

- pairwise dissimilarity: the mean over the K(K-1)/2 pairs of ``1 - SSIM(x_a, x_b)`` (SSIM as
  :func:`utils.evaluation.metrics.ssim_per_image`); 0 when every sample is the same image;
- pixel std: the per-pixel standard deviation over the K samples (population, ddof 0), averaged over pixels.

The per-mask mean ``(1/K) sum_a x_a`` is a blurred average, not a plausible image; its paired metrics show how
much of a paired score averaging can buy. It is computed as ``x_1 + mean_a(x_a - x_1)``, so K identical samples
give back ``x_1`` exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def groups(indices, k: int | None = None) -> dict[int, np.ndarray]:
    """{source index: positions of its samples} for every index with at least 2 samples, each cut to the same
    K (``k``, or the smallest group size) so that every mask weighs the same; {} when no mask has 2."""
    indices = np.asarray(indices)
    found = {int(i): np.flatnonzero(indices == i) for i in np.unique(indices)}
    found = {i: p for i, p in found.items() if len(p) >= 2}
    if not found:
        return {}
    k = k or min(len(p) for p in found.values())
    return {i: p[:k] for i, p in found.items() if len(p) >= k}


def mean_of_samples(images: torch.Tensor, grouped: dict[int, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """(per-mask means ``[G, 1, ...]``, their source indices ``[G]``) of ``images [N, 1, ...]``."""
    means = []
    for positions in grouped.values():
        x = images[torch.as_tensor(positions)]
        means.append(x[0] + (x - x[0]).mean(dim=0))
    return torch.stack(means), np.array(list(grouped), dtype=np.int64)


def per_mask_diversity(images: torch.Tensor, grouped: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """{"pairwise_dissimilarity": [G], "pixel_std": [G]} for 2-D ``images [N, 1, H, W]`` in [0, 1]; volumes get
    only the pixel (voxel) std, the SSIM here being 2-D."""
    from utils.evaluation.metrics import ssim_per_image

    out = {"pixel_std": np.array([images[torch.as_tensor(p)].double().std(dim=0, unbiased=False).mean().item()
                                  for p in grouped.values()])}
    if images.ndim == 4:
        pairs = [(p[a], p[b]) for p in grouped.values() for a, b in itertools.combinations(range(len(p)), 2)]
        first, second = (torch.as_tensor([pair[j] for pair in pairs]) for j in (0, 1))
        dissimilarity = 1.0 - ssim_per_image(images[first], images[second])
        per_group = len(next(iter(grouped.values())))
        out["pairwise_dissimilarity"] = dissimilarity.reshape(len(grouped), per_group * (per_group - 1) // 2).mean(1)
    return out
