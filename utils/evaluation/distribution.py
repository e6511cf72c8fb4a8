"""Fidelity and diversity of a generated set, separately: improved precision and recall (Kynkäänniemi et al.
2019) and density and coverage (Naeem et al. 2020), from k-nearest-neighbour balls in a feature space.

With real features ``R [N, D]``, generated ``G [M, D]``, Euclidean distances and ``r_k(x)`` the distance from a
point to its k-th nearest neighbour in its own set (itself not counted):

- precision = (1/M) sum_j 1[exists i: ||g_j - r_i|| <= r_k(r_i)]  (generated points inside the real manifold)
- recall    = (1/N) sum_i 1[exists j: ||r_i - g_j|| <= r_k(g_j)]  (real points inside the generated manifold)
- density   = 1/(k M) sum_j sum_i 1[||g_j - r_i|| <= r_k(r_i)]    (how many real balls hold each generated point)
- coverage  = (1/N) sum_i 1[min_j ||r_i - g_j|| <= r_k(r_i)]       (real balls that hold a generated point)

A set scored against itself has precision = recall = coverage = 1; copies of a few real images have high
precision and low recall; blurred images, which leave the real manifold, have low precision and density.
"""

from __future__ import annotations

import numpy as np

PRDC_K = 5  # Naeem et al.'s default


def standardise(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every set z-scored with ``reference``'s per-feature mean and std (radiomic features span many orders of
    magnitude); features that are constant or not finite in any set are dropped."""
    sets = [np.asarray(s, np.float64) for s in (reference, *others)]
    std = sets[0].std(axis=0)
    keep = np.isfinite(std) & (std > 0) & np.all([np.isfinite(s).all(axis=0) for s in sets], axis=0)
    mean = sets[0].mean(axis=0)
    return [(s[:, keep] - mean[keep]) / std[keep] for s in sets]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]`` (float64, clipped at 0 against rounding)."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    d = _distances(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself (distance 0)


def prdc(real: np.ndarray, generated: np.ndarray, k: int = PRDC_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``generated [M, D]`` against ``real [N, D]`` (module
    docstring); both sets need more than ``k`` points."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"expected features [N, D] and [M, D], got {real.shape} and {generated.shape}")
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points per set, got "
                         f"{len(real)} real and {len(generated)} generated")
    real_radii, generated_radii = _kth_neighbour_radii(real, k), _kth_neighbour_radii(generated, k)
    d = _distances(real, generated)  # [N, M]
    inside_real = d <= real_radii[:, None]
    return {"precision": float(inside_real.any(axis=0).mean()),
            "recall": float((d <= generated_radii[None, :]).any(axis=1).mean()),
            "density": float(inside_real.sum() / (k * len(generated))),
            "coverage": float((d.min(axis=1) <= real_radii).mean())}
