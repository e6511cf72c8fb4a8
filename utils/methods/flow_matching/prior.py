"""The warm-start prior: the one function that draws x_0, for training, validation, inference and evaluation.

x_0 = alpha * Blur_{k,sigma}(enc(mask)) + sqrt(1 - alpha^2) * eps,   eps ~ N(0, I).

alpha = 0 returns eps itself (the MOTFM prior, bit for bit). The blur is deterministic (fixed k and
sigma) and separable, one 1-D pass per spatial axis, so a 3-D mask is blurred across slices too; with a voxel
spacing (``prior_args.spacing``) each axis gets its own sigma in voxels. enc(mask) maps each label to a
value in [-1, 1] (the image range): in echo the cavities are dark and the myocardium bright, so label order
is not intensity order and the default encoding is each label's mean training intensity (see DESIGN.md section 5).
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


def axis_sigmas(sigma: float, spacing: tuple[float, ...], dims: int) -> tuple[float, ...]:
    """The blur's sigma in voxels along each of ``dims`` spatial axes (array order).

    Empty ``spacing``: ``sigma`` on every axis (isotropic voxels). Otherwise sigma is in units of the finest
    spacing and axis a gets ``sigma * min(spacing) / spacing[a]``: the same physical width on every axis
    (an axis with 3 mm voxels beside 1 mm ones is blurred over a third as many voxels).
    """
    if not spacing:
        return (sigma,) * dims
    if len(spacing) != dims:
        raise ValueError(f"spacing needs one entry per spatial axis ({dims}), got {list(spacing)}")
    finest = min(spacing)
    return tuple(sigma * finest / s for s in spacing)


def spacing_mismatch(spacing: tuple[float, ...], data_spacings, rtol: float = 0.05) -> int | None:
    """The index of the first of ``data_spacings`` (voxel spacings, one entry per axis, in array order) whose
    proportions ``s / min(s)`` differ from those of ``spacing`` (empty: isotropic) by more than ``rtol``, else
    None. Only the proportions matter to the blur (:func:`axis_sigmas`)."""
    for i, data in enumerate(data_spacings):
        want = tuple(spacing) or (1.0,) * len(data)
        if len(want) != len(data):
            return i
        if any(abs((d / min(data)) / (w / min(want)) - 1.0) > rtol for d, w in zip(data, want)):
            return i
    return None


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float, padding: str = "reflect",
                  spacing: tuple[float, ...] = ()) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) or (B, C, D, H, W), same size out: one 1-D convolution per
    spatial axis, the last axis first, with sigma per axis from :func:`axis_sigmas`. ``padding`` "reflect" or
    "zeros" (the seed's code: ``F.conv2d(padding=k // 2)``, which darkens the borders)."""
    dims = x.ndim - 2
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    for axis, axis_sigma in reversed(list(enumerate(axis_sigmas(sigma, spacing, dims)))):
        x = _blur_axis(x, axis, kernel_size, axis_sigma, padding, conv)
    return x


def _blur_axis(x: torch.Tensor, axis: int, kernel_size: int, sigma: float, padding: str, conv) -> torch.Tensor:
    """One 1-D Gaussian pass along spatial ``axis`` (0 = the first after B, C) of (B, C, *spatial)."""
    dims, c, pad = x.ndim - 2, x.shape[1], kernel_size // 2
    k = gaussian_kernel1d(kernel_size, sigma).to(x.device, x.dtype)
    shape = [1] * dims
    shape[axis] = -1
    sides = [0, 0] * (dims - 1 - axis) + [pad, pad] + [0, 0] * axis  # F.pad lists the last axis first
    if padding == "zeros":
        x = F.pad(x, sides)
    else:
        x = F.pad(x, sides, mode="reflect" if pad < x.shape[2 + axis] else "replicate")
    return conv(x, k.view(1, 1, *shape).expand(c, 1, *shape), groups=c)


def encode_mask(mask: torch.Tensor, label_values: torch.Tensor) -> torch.Tensor:
    """Map integer labels (B, 1, *spatial) to float values: ``label_values[mask]``, same shape."""
    return label_values.to(mask.device, torch.float32)[mask.long()]


def warm_start_prior(
    mask: torch.Tensor,
    eps: torch.Tensor,
    alpha: float,
    kernel_size: int,
    sigma: float,
    label_values: torch.Tensor,
    padding: str = "reflect",
    spacing: tuple[float, ...] = (),
) -> torch.Tensor:
    """Draw x_0 (B, 1, H, W) or (B, 1, D, H, W) from the mask's warm-start prior, given the noise ``eps``.

    ``mask``: integer labels (B, 1, H', W') or (B, 1, D', H', W'), resized with nearest neighbour to eps's
    size if needed. ``eps``: standard normal noise like x_0; the caller draws it (so tests and the inferer pin
    it). ``label_values``: (num_classes,) value of each label in [-1, 1]. ``spacing``: the voxel spacing per
    spatial axis for an anisotropic blur (:func:`axis_sigmas`), empty for isotropic.
    """
    if alpha == 0.0:
        return eps
    if mask.shape[2:] != eps.shape[2:]:
        mask = F.interpolate(mask.float(), size=eps.shape[2:], mode="nearest")
    # float32 whatever autocast the caller runs under (training does, sampling does not): one prior, bit for bit
    with torch.autocast(eps.device.type, enabled=False):
        structure = gaussian_blur(encode_mask(mask, label_values), kernel_size, sigma, padding, spacing)
    return alpha * structure.to(eps.dtype) + math.sqrt(1.0 - alpha**2) * eps
