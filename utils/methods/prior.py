"""The warm-start prior: the one function that draws x_0, for training, validation, inference and evaluation.

x_0 = alpha * Blur_{k,sigma}(enc(mask)) + sqrt(1 - alpha^2) * eps,   eps ~ N(0, I).

alpha = 0 returns eps itself (the MOTFM prior, bit for bit). The blur is deterministic (fixed k and
sigma). enc(mask) maps each label to a value in [-1, 1] (the image range): in echo the cavities are dark
and the myocardium bright, so label order is not intensity order and the default encoding is each label's
mean training intensity (see DESIGN.md section 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, shape (kernel_size,), float32."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), same size out; ``padding`` "reflect" or "zeros" (the seed's
    code: ``F.conv2d(padding=k // 2)``, which darkens the borders)."""
    k = gaussian_kernel1d(kernel_size, sigma).to(x.device, x.dtype)
    c = x.shape[1]
    pad = kernel_size // 2

    def padded(x, sides, size):
        if padding == "zeros":
            return F.pad(x, sides)
        return F.pad(x, sides, mode="reflect" if pad < size else "replicate")

    x = F.conv2d(padded(x, (pad, pad, 0, 0), x.shape[-1]), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(padded(x, (0, 0, pad, pad), x.shape[-2]), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def encode_mask(mask: torch.Tensor, label_values: torch.Tensor) -> torch.Tensor:
    """Map integer labels (B, 1, H, W) to float values: ``label_values[mask]``, shape (B, 1, H, W)."""
    return label_values.to(mask.device, torch.float32)[mask.long()]


def warm_start_prior(
    mask: torch.Tensor,
    eps: torch.Tensor,
    alpha: float,
    kernel_size: int,
    sigma: float,
    label_values: torch.Tensor,
    padding: str = "reflect",
) -> torch.Tensor:
    """Draw x_0 (B, 1, H, W) from the mask's warm-start prior, given the Gaussian noise ``eps``.

    ``mask``: integer labels (B, 1, H', W'), resized with nearest neighbour to eps's size if needed.
    ``eps``: standard normal noise (B, 1, H, W); the caller draws it (so tests and the inferer pin it).
    ``label_values``: (num_classes,) value of each label in [-1, 1].
    """
    if alpha == 0.0:
        return eps
    if mask.shape[-2:] != eps.shape[-2:]:
        mask = F.interpolate(mask.float(), size=eps.shape[-2:], mode="nearest")
    # float32 whatever autocast the caller runs under (training does, sampling does not): one prior, bit for bit
    with torch.autocast(eps.device.type, enabled=False):
        structure = gaussian_blur(encode_mask(mask, label_values), kernel_size, sigma, padding)
    return alpha * structure.to(eps.dtype) + math.sqrt(1.0 - alpha**2) * eps
