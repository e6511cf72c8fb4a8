"""The built-in synthetic 3-D brain phantom: a head with ventricles and a glioma, BraTS-like labels.

Each synthetic patient draws its own head (size and shape), ventricles, tumour (hemisphere, position,
the radii of its necrotic core, enhancing rim and oedema, the oedema's lobed outline), tissue
brightness and smooth textures from ``np.random.default_rng([seed, patient index])``, so a patient is
identical whatever else is built. One record per patient.

Geometry is in units of the volume side, voxel centres at ``(index + 0.5) / size``. The array axes
are NIfTI's voxel axes with a RAS+ affine: ``d`` left -> right, ``h`` posterior -> anterior, ``w``
inferior -> superior; the affine puts the volume centre at the world origin with isotropic voxels
of ``FIELD_OF_VIEW_MM / size`` mm.

Labels (BraTS 2023 convention, ``num_classes`` 4): 0 background (everything outside the tumour,
healthy brain included), 1 necrotic tumour core, 2 peritumoural oedema, 3 enhancing tumour (a rim
around the core). The tumour's centre is 0.4-0.7 of the way from the midline to the brain's edge (less
its rim) in its hemisphere. The tumour is three nested shells: core radius >= 0.06 of the side, rim 0.035-0.05
thick around it, oedema out to a lobed radius 0.05-0.09 beyond the rim, clipped to the brain; so every
label is present from ``MIN_SIZE`` = 16 voxels on. ``class``: the tumour's hemisphere, 0 left, 1 right.

Image formation (a FLAIR-like contrast), per voxel in [0, 1] before the uint8 conversion::

    scalp/skull shell 0.5, white matter ~0.35, cortex (outer brain shell) ~0.45, ventricles ~0.08,
    oedema ~0.75, enhancing rim ~0.95, necrotic core ~0.2; brain tissue x exp(0.15 * smooth texture);
    then x a smooth bias field (+-10 %), a Gaussian blur of 0.6 voxel (partial volume) and noise (std 0.01)

Example::

    python -m utils.data.synthetic_echo --dims 3 --output data/synthetic_brain_32.npz --size 32
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from utils.data.layout import REDRAW_STREAM, SPLITS

logger = logging.getLogger(__name__)

MIN_SIZE = 16  # below this the enhancing rim is no longer resolved in every mask
FIELD_OF_VIEW_MM = 200.0
HEMISPHERES = ("left", "right")
_BASIS = 8  # Gaussian bumps per axis of the smooth random fields


def build_brain_dataset(
    size: int = 32, patients: tuple[int, int, int] = (48, 8, 8), seed: int = 0, progress: bool = True
) -> dict[str, list[dict]]:
    """The phantom in the record layout of :mod:`utils.data.dataset_io`.

    Args:
        size: volume side D = H = W in voxels (>= 16).
        patients: patients (= records) in train, valid, test (each >= 1).
        seed: patient ``k`` (0-based over all splits) is drawn from ``np.random.default_rng([seed, k])``.
        progress: show a tqdm bar over patients.

    Returns:
        ``{"train"|"valid"|"test": [record]}``; ``image`` uint8 ``[1, size, size, size]``, ``mask`` uint8
        ``[1, size, size, size]`` in {0, 1, 2, 3}, ``affine`` float64 ``[4, 4]``, ``class`` the tumour's
        hemisphere (0 left, 1 right), ``metadata`` ``{"patient": "brain0001", "split": ..., "class_name":
        "left"|"right"}``.
    """
    from tqdm import tqdm

    if size < MIN_SIZE:
        raise ValueError(f"synthetic brain: size must be >= {MIN_SIZE} voxels, got {size}")
    if len(patients) != len(SPLITS) or any(int(n) < 1 for n in patients):
        raise ValueError(f"synthetic brain: patients must be 3 counts >= 1 (train valid test), got {patients}")
    splits = [split for split, n in zip(SPLITS, patients) for _ in range(int(n))]
    data: dict[str, list[dict]] = {split: [] for split in SPLITS}
    affine = brain_affine(size)
    for k in tqdm(range(len(splits)), desc="synthetic brain", unit="patient", disable=not progress):
        image, mask, hemisphere = render_brain(size, seed, k)
        meta = {"patient": f"brain{k + 1:04d}", "split": splits[k], "class_name": HEMISPHERES[hemisphere]}
        data[splits[k]].append({"image": image[None], "mask": mask[None], "affine": affine.copy(),
                                "class": hemisphere, "metadata": meta})
    return data


def brain_affine(size: int) -> np.ndarray:
    """``float64 [4, 4]``: isotropic ``FIELD_OF_VIEW_MM / size`` mm voxels, the volume centre at the origin."""
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2.0
    return affine


def render_brain(size: int, seed: int, index: int, redraw: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Patient ``index``: ``(image uint8 [D, H, W], mask uint8 [D, H, W], hemisphere 0 left | 1 right)``.

    ``redraw`` k >= 0: the same head and tumour (the mask bit for bit), with the ventricles' size, tissue
    texture, intensities and noise drawn from ``default_rng([seed, index, REDRAW_STREAM + k])`` (the evaluation's
    oracle; the head's shape stays, as the mask's brain region depends on it).
    """
    from scipy import ndimage

    rng = np.random.default_rng([seed, index])
    u = rng.uniform
    grid = _grid(size)
    head_axes = np.array([u(0.36, 0.40), u(0.43, 0.47), u(0.38, 0.42)])
    head_centre = 0.5 + u(-0.02, 0.02, 3)
    head = _ellipsoid_radius(grid, head_centre, head_axes)
    brain = head <= 0.88
    hemisphere = int(rng.integers(2))
    ventricle_scale = u(0.8, 1.3)
    mask = _tumour(grid, rng, head_centre, head_axes, hemisphere) * brain

    if redraw is not None:  # everything below is appearance, and the unlabelled ventricles' size
        rng = np.random.default_rng([seed, index, REDRAW_STREAM + redraw])
        u = rng.uniform
        ventricle_scale = u(0.8, 1.3)
    ventricles = _ventricles(grid, head_centre, ventricle_scale)
    texture = _smooth_field(rng, grid)
    image = np.where(head <= 1.0, 0.5, 0.0)
    tissue = np.where(head <= 0.78, u(0.3, 0.4), u(0.4, 0.5)) * np.exp(0.15 * texture)
    image = np.where(brain, tissue, image)
    image[ventricles & brain] = u(0.05, 0.1)
    for label, low, high in ((2, 0.68, 0.8), (3, 0.9, 1.0), (1, 0.15, 0.25)):
        image[mask == label] = u(low, high) * np.exp(0.1 * texture[mask == label])
    image = image * (1.0 + 0.1 * _smooth_field(rng, grid) / 3.0)
    image = ndimage.gaussian_filter(image, 0.6) + rng.normal(0.0, 0.01, image.shape)
    image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image, mask.astype(np.uint8), hemisphere


@lru_cache(maxsize=4)
def _grid(size: int) -> dict:
    """Per-size constants: voxel-centre coordinates ``c`` along one axis (units of the side), the three
    broadcastable axes ``d [S,1,1]``, ``h [1,S,1]``, ``w [1,1,S]``, and ``basis`` ``[S, 8]`` Gaussian bumps."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    centres = np.linspace(-0.0625, 1.0625, _BASIS)
    basis = np.exp(-0.5 * ((c[:, None] - centres[None]) / 0.1) ** 2)
    return dict(size=size, d=c[:, None, None], h=c[None, :, None], w=c[None, None, :], basis=basis)


def _ellipsoid_radius(grid: dict, centre, axes) -> np.ndarray:
    """Normalised radius ``[S, S, S]`` about ``centre`` with semi-axes ``axes`` (<= 1 inside)."""
    return np.sqrt(sum(((grid[a] - c) / r) ** 2 for a, c, r in zip("dhw", centre, axes)))


def _ventricles(grid: dict, head_centre, scale: float) -> np.ndarray:
    """Two lateral ventricles ``bool [S, S, S]``, mirrored about the midline, a little above the centre."""
    axes = np.array([0.03, 0.13, 0.06]) * scale
    left = _ellipsoid_radius(grid, head_centre + [-0.045 * scale, 0.0, 0.03], axes)
    right = _ellipsoid_radius(grid, head_centre + [0.045 * scale, 0.0, 0.03], axes)
    return (left <= 1.0) | (right <= 1.0)


def _tumour(grid: dict, rng: np.random.Generator, head_centre, head_axes, hemisphere: int) -> np.ndarray:
    """Labels ``int [S, S, S]``: 1 core, 3 enhancing rim, 2 lobed oedema (the module docstring's radii)."""
    u = rng.uniform
    core = u(0.06, 0.08)
    rim = core + u(0.035, 0.05)
    oedema = rim + u(0.05, 0.09)
    # off the midline into its hemisphere, inside the brain (0.88 of the head) with the rim clear of its surface
    offset = np.array([(1 if hemisphere else -1) * u(0.4, 0.7), u(-0.4, 0.4), u(-0.4, 0.4)])
    centre = head_centre + offset * (0.88 * head_axes - rim)
    offsets = [grid[a] - c for a, c in zip("dhw", centre)]
    distance = np.sqrt(sum(o**2 for o in offsets))
    cosines = [sum(o * v for o, v in zip(offsets, rng.normal(size=3) / np.sqrt(3))) / np.maximum(distance, 1e-9)
               for _ in range(3)]
    lobes = 1.0 + 0.25 * sum(np.cos(np.pi * c + u(0, 2 * np.pi)) for c in cosines) / 3.0
    labels = np.where(distance <= (oedema - rim) * lobes + rim, 2, 0)
    labels[distance <= rim] = 3
    labels[distance <= core] = 1
    return labels


def _smooth_field(rng: np.random.Generator, grid: dict) -> np.ndarray:
    """Smooth random field ``[S, S, S]``, zero mean, unit std: 8^3 Gaussian weights on the basis bumps."""
    b = grid["basis"]
    field = np.einsum("ia,jb,kc,abc->ijk", b, b, b, rng.standard_normal((_BASIS,) * 3), optimize=True)
    return (field - field.mean()) / (field.std() + 1e-6)


def save_brain_examples_png(data: dict[str, list[dict]], path: str | Path, n: int = 2) -> Path:
    """A PNG of the first ``n`` records of the first non-empty split: per record one row of three orthogonal
    slices through the tumour's centre (the volume centre when the mask is empty), ``d``, ``h`` and ``w``
    fixed in turn, and one row with the labels drawn over them (core red, oedema green, enhancing blue)."""
    from PIL import Image

    records = next(recs for recs in data.values() if recs)[:n]
    colours = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 60], [50, 110, 255]], np.float32)
    rows = []
    for r in records:
        image, mask = r["image"][0], r["mask"][0]
        centre = np.rint(np.argwhere(mask > 0).mean(axis=0)).astype(int) if mask.any() else np.array(mask.shape) // 2
        slices = [(image[i], mask[i]) for i in [(centre[0], ...), (slice(None), centre[1]), (..., centre[2])]]
        grey = [np.repeat(x[:, :, None].astype(np.float32), 3, axis=2) for x, _ in slices]
        overlay = [np.where(m[:, :, None] > 0, 0.55 * g + 0.45 * colours[np.minimum(m, 3)], g)
                   for g, (_, m) in zip(grey, slices)]
        rows += [np.concatenate(grey, axis=1), np.concatenate(overlay, axis=1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8)).save(path)
    return path
