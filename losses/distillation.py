"""Med-DT-FM's distillation term, as pure functions:

    L_DT = sum_i lambda_i * mean((P_i(B_i) - Ebar_i(x_1))^2),   Ebar_i = (E_i - mu_i) / sigma_i per channel,

with E_i the frozen segmentation encoder's features of the clean image x_1 and (mu_i, sigma_i) their
per-channel statistics over the training split, so that the lambda_i act on comparable scales. Everything
is computed in float32 outside autocast. A level with lambda_i = 0 is not computed at all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def standardise(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) features minus ``mean`` (C,), divided by ``std`` (C,), in float32."""
    return (features.float() - mean.float().view(1, -1, 1, 1)) / std.float().view(1, -1, 1, 1)


def channel_moments(batches: Iterable[torch.Tensor], min_std: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (float32, (C,)) over every image and position of a stream of
    (B, C, h, w) batches, accumulated in float64; ``std`` is at least ``min_std`` (a channel that is constant
    on the training set, e.g. a dead ReLU, must not divide by zero)."""
    total, square, n = 0.0, 0.0, 0
    for f in batches:
        f = f.double()
        total = total + f.sum(dim=(0, 2, 3))
        square = square + f.square().sum(dim=(0, 2, 3))
        n += f.shape[0] * f.shape[2] * f.shape[3]
    if n == 0:
        raise ValueError("channel_moments needs at least one feature map")
    mean = total / n
    var = (square / n - mean.square()).clamp_min(0)
    return mean.float(), var.sqrt().clamp_min(min_std).float()


def distillation_loss(projections: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
                      weights: tuple[float, ...]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(sum_i weights[i] * mse(projections[i], targets[i]), {i: that level's unweighted mse}).

    ``projections[i]`` (B, C_i, h_i, w_i) carry the generator's graph; ``targets[i]`` the same shape, no gradient.
    """
    with torch.autocast(device_type=next(iter(projections.values())).device.type, enabled=False):
        terms = {i: F.mse_loss(p.float(), targets[i].detach().float()) for i, p in projections.items()}
        total = sum(weights[i] * term for i, term in terms.items())
    return total, terms
