"""The built-in synthetic echocardiography phantom: apical 2CH/4CH views with CAMUS-style masks.

Each synthetic patient draws its own heart (LV length/width, wall thickness, tilt, LA size, shape
harmonics) and its own scanner settings (sector, gain, attenuation, tissue brightness) from a
generator seeded by ``(seed, patient index)``, so a patient is identical whatever else is built.
Four records per patient: views 2CH/4CH x phases ED/ES (ES: shorter, narrower LV cavity, thicker
myocardium, larger LA; 4CH: LV shifted and tilted to the image right, with an unlabelled right
ventricle and atrium on its left, as in CAMUS).

Geometry is in units of the image side: the sector apex (the probe) at the top centre, ``y`` down
into the body, LV apex near the probe, LA below the mitral plane towards the bottom of the sector.
Labels (CAMUS): 0 background, 1 LV cavity, 2 myocardium, 3 LA cavity; every label lies inside the
sector. Image formation, per pixel, in [0, 1] before the uint8 conversion::

    E     = echogenicity: blood ~0.06, tissue ~0.17 x smooth log-normal texture, myocardium ~0.9
            (brighter where the wall faces the beam), thin atrial walls and pericardium; blurred by
            an axial x lateral Gaussian point-spread function, plus near-field clutter at the probe
    R     = speckle: |complex Gaussian noise| smoothed in polar (depth, angle) bins and
            scan-converted, so grains widen laterally with depth; Rayleigh-like, mean 1
    image = (1 - exp(-gain * E * R * exp(-attenuation * depth))) ** gamma   inside the sector, 0 outside

Example::

    python -m utils.data.synthetic_echo --output data/synthetic_echo.npz --size 256 --seed 0

The same command builds the 3-D brain phantom of :mod:`utils.data.synthetic_brain` with ``--dims 3``
(as a ``.npz``/``.pkl`` file, or a NIfTI folder when ``--output`` has no suffix), and
:func:`ensure_synthetic_dataset` builds it when asked for ``dims=3``.
"""

from __future__ import annotations

import argparse
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from utils.data.layout import REDRAW_STREAM, view_phase_class

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")
MIN_SIZE = 32  # below this the thin myocardium and the LA are no longer resolved in every mask
_MAX_FAN_HALF_ANGLE = np.deg2rad(40.0)  # the polar speckle grid covers every patient's sector
_MAX_DEPTH = 1.05
_ATRIAL_WALL = 1.12  # outer edge of an atrial wall, in normalised radius of its atrium


def build_synthetic_dataset(
    size: int = 256, patients: tuple[int, int, int] = (350, 50, 50), seed: int = 0, progress: bool = True
) -> dict[str, list[dict]]:
    """The phantom in the record layout of :mod:`utils.data.dataset_io`.

    Args:
        size: image side H = W in pixels (>= 32).
        patients: patients in train, valid, test (each >= 1); a patient gives 4 records (2CH/4CH x ED/ES).
        seed: patient ``k`` (0-based over all splits) is drawn from ``np.random.default_rng([seed, k])``.
        progress: show a tqdm bar over patients.

    Returns:
        ``{"train"|"valid"|"test": [record]}``; ``image`` uint8 ``[1, size, size]``, ``mask`` uint8
        ``[1, size, size]`` in {0, 1, 2, 3}; ``class`` view x phase (0 2CH_ED, 1 2CH_ES, 2 4CH_ED, 3 4CH_ES);
        ``metadata`` ``{"patient": "synth0001", "view": "2CH"|"4CH", "phase": "ED"|"ES", "split": ...,
        "class_name": "2CH_ED"|...}``.
    """
    from tqdm import tqdm

    if size < MIN_SIZE:
        raise ValueError(f"synthetic echo: size must be >= {MIN_SIZE} pixels, got {size}")
    if len(patients) != len(SPLITS) or any(int(n) < 1 for n in patients):
        raise ValueError(f"synthetic echo: patients must be 3 counts >= 1 (train valid test), got {patients}")
    # glibc raises its mmap and trim thresholds to the size of the largest block freed so far; without
    # one large block first, every frame's ~15 MB of temporaries goes back to the kernel and is
    # page-faulted in again (measured at 256 px: 67 -> 37 ms of CPU per patient)
    np.empty(16 << 20, np.uint8)  # allocated and freed at once
    splits = [split for split, n in zip(SPLITS, patients) for _ in range(int(n))]
    data: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for k in tqdm(range(len(splits)), desc="synthetic echo", unit="patient", disable=not progress):
        split = splits[k]
        for view, phase, image, mask in render_patient(size, seed, k):
            meta = {"patient": f"synth{k + 1:04d}", "view": view, "phase": phase, "split": split,
                    "class_name": f"{view}_{phase}"}
            data[split].append({"image": image[None], "mask": mask[None], "class": view_phase_class(view, phase),
                                "metadata": meta})
    return data


def render_patient(size: int, seed: int, index: int, redraw: int | None = None
                   ) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """The 4 frames of patient ``index``: ``[(view, phase, image uint8 [H,W], mask uint8 [H,W])]``.

    ``redraw`` k >= 0 renders the same patient again with a new appearance drawn from
    ``default_rng([seed, index, REDRAW_STREAM + k])``: tissue texture, speckle and every setting the masks do not
    fix (:data:`APPEARANCE`: gain, attenuation, gamma, tissue intensities, clutter, speckle size). Anatomy, view
    geometry, the sector and the masks are those of ``redraw=None`` bit for bit (the patient's own stream is
    still consumed draw for draw); so are the unlabelled right heart's shape and the sector, which a mask does
    not fix either. The images are another sample of what this phantom makes of those masks (the evaluation's
    oracle).
    """
    rng = np.random.default_rng([seed, index])
    noise_rng = rng if redraw is None else np.random.default_rng([seed, index, REDRAW_STREAM + redraw])
    p = _draw_patient(rng)
    if noise_rng is not rng:
        redrawn = _draw_patient(noise_rng)
        p.update({k: redrawn[k] for k in APPEARANCE})
    grid = _grid(size)
    frames = []
    for view in VIEWS:
        v = _draw_view(rng, view)
        texture = _redrawn(rng, noise_rng, lambda g: _smooth_texture(g, grid))  # shared by ED and ES
        for phase in PHASES:
            image, mask = _render_frame(grid, p, v, phase, texture, rng, noise_rng)
            frames.append((view, phase, image, mask))
    return frames


def _redrawn(rng: np.random.Generator, noise_rng: np.random.Generator, draw):
    """``draw(noise_rng)``, after ``draw(rng)`` when they differ, so ``rng`` is left where a plain render leaves it."""
    value = draw(rng)
    return value if noise_rng is rng else draw(noise_rng)


APPEARANCE = ("gain", "attenuation", "gamma", "tissue", "myo", "blood", "pericardium", "clutter", "speckle")


def _draw_patient(rng: np.random.Generator) -> dict:
    """Per-patient anatomy (ED) and scanner settings; lengths in units of the image side."""
    u = rng.uniform
    return dict(
        fan_half=np.deg2rad(u(33.0, 38.0)), fan_depth=u(0.90, 0.97),
        apex_depth=u(0.06, 0.10), lv_len=u(0.45, 0.54), lv_half_width=u(0.12, 0.155), kappa=u(0.55, 0.65),
        wall=u(0.034, 0.048), wall_ratio=u(0.8, 1.2), apex_wall=u(0.7, 1.0),
        la_len=u(0.09, 0.12), la_half_width=u(0.09, 0.125),
        es_len=u(0.85, 0.92), es_width=u(0.70, 0.82), es_wall=u(1.25, 1.45), es_la=u(1.06, 1.18),
        gain=u(1.3, 1.8), attenuation=u(0.5, 1.0), gamma=u(0.85, 1.0),
        tissue=u(0.12, 0.22), myo=u(0.8, 1.0), blood=u(0.04, 0.08), pericardium=u(0.45, 0.8),
        clutter=u(0.1, 0.3), speckle=u(0.8, 1.25),
    )


def _draw_view(rng: np.random.Generator, view: str) -> dict:
    """Per-view orientation and shape harmonics (shared by the view's ED and ES frames)."""
    u = rng.uniform
    deg = np.deg2rad
    v = dict(
        view=view,
        tilt=deg(u(-7.0, 7.0)) if view == "2CH" else deg(u(4.0, 10.0)),
        apex_angle=deg(u(-4.0, 4.0)) if view == "2CH" else deg(u(6.0, 14.0)),
        width=u(0.95, 1.08) if view == "2CH" else u(0.85, 0.97),
        harmonics=_harmonics(rng, 0.05), wall_harmonics=_harmonics(rng, 0.06),
        la_harmonics=_harmonics(rng, 0.06), la_shift=u(-0.02, 0.02), la_tilt=deg(u(-12.0, 12.0)),
    )
    if view == "4CH":
        v.update(
            rv_tilt=deg(u(-22.0, -12.0)), rv_len=u(0.65, 0.8), rv_half_width=u(0.75, 0.95),
            rv_drop=u(0.09, 0.15), rv_harmonics=_harmonics(rng, 0.06),
            ra_len=u(0.8, 1.1), ra_half_width=u(0.8, 1.1),
        )
    return v


def _harmonics(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Boundary wobble ``delta(phi) = sum_k eps_k cos(k phi + psi_k)``, k = 2..4, as the complex
    coefficients ``c_k = eps_k exp(i psi_k)`` (``delta = Re(sum_k c_k exp(i k phi))``)."""
    k = np.arange(2, 5)
    return (rng.uniform(0, amplitude, 3) / k * np.exp(1j * rng.uniform(0, 2 * np.pi, 3))).astype(np.complex64)


@lru_cache(maxsize=4)
def _grid(size: int) -> dict:
    """Per-size constants: pixel-centre coordinates (x right, y down, units of the side); depth r and
    beam angle theta from the sector apex at (0.5, 0); ``polar``, the flat index of each pixel's
    nearest (depth, angle) bin of a ``size x size`` polar grid (scan conversion of the speckle); and
    ``basis``, Gaussian bumps ``[size, 10]`` spaced 1/8 apart for smooth random textures."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    dx = x - 0.5
    r = np.hypot(dx, y)
    theta = np.arctan2(dx, y)
    depth_bin = np.clip(np.rint(r / _MAX_DEPTH * (size - 1)), 0, size - 1)
    angle_bin = np.clip(np.rint((theta / _MAX_FAN_HALF_ANGLE + 1) * 0.5 * (size - 1)), 0, size - 1)
    centres = np.linspace(-0.0625, 1.0625, 10, dtype=np.float32)
    basis = np.exp(-0.5 * ((c[:, None] - centres[None]) / 0.08) ** 2)
    return dict(size=size, x=x, y=y, r=r, theta=theta, near_field=np.exp(-r / 0.07),
                polar=(depth_bin * size + angle_bin).astype(np.intp), basis=basis)


def _smooth_texture(rng: np.random.Generator, grid: dict) -> np.ndarray:
    """Smooth random field ``[size, size]``, zero mean, unit std: ``basis @ noise(10 x 10) @ basis.T``."""
    b = grid["basis"]
    # einsum, not matmul: a threaded BLAS call here costs more than the whole frame when cores are busy
    rows = np.einsum("ik,kl->il", b, rng.standard_normal((b.shape[1], b.shape[1]), dtype=np.float32))
    field = np.einsum("il,jl->ij", rows, b)
    return (field - field.mean()) / (field.std() + 1e-6)


def _axis_coords(grid: dict, origin: tuple[float, float], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along an axis through ``origin`` tilted ``angle`` from straight down:
    ``u`` along it (into the body), ``v`` across it (to the image right when ``angle`` = 0)."""
    s, c = float(np.sin(angle)), float(np.cos(angle))  # Python floats keep the arrays float32
    dx, dy = grid["x"] - float(origin[0]), grid["y"] - float(origin[1])
    return dx * s + dy * c, dx * c - dy * s


def _radius(u, v, centre: float, a: float, b, harmonics: np.ndarray) -> np.ndarray:
    """Normalised radius of a wobbly ellipse about (u, v) = (centre, 0) with semi-axes a (along u)
    and b (along v; an array gives a different half-width per side): ``rho / (1 + delta(phi))``,
    <= 1 inside, where rho exp(i phi) = (u - centre) / a + i v / b and delta = Re(sum_k c_k exp(i k phi))."""
    z = (u - centre) / a + 1j * (v / b)
    rho = np.abs(z)
    z = z / np.maximum(rho, 1e-6)  # exp(i phi); powers of it are cheaper than cos(k phi + psi)
    z2 = z * z
    return rho / (1.0 + (harmonics[0] * z2 + harmonics[1] * z2 * z + harmonics[2] * z2 * z2).real)


def _bullet(u, v, length: float, kappa: float, half_width, wall_u: float, wall_v, harmonics) -> np.ndarray:
    """A ventricle-like bullet: apex at u = 0 (``wall_u`` further out), base cut flat at u = length."""
    centre = kappa * length
    return (_radius(u, v, centre, centre + wall_u, half_width + wall_v, harmonics) <= 1.0) & (u <= length)


def _render_frame(grid: dict, p: dict, v: dict, phase: str, texture: np.ndarray, rng: np.random.Generator,
                  noise_rng: np.random.Generator):
    """One frame: ``(image uint8 [H, W], mask uint8 [H, W])``; the speckle from ``noise_rng`` (see
    :func:`render_patient`)."""
    from scipy import ndimage

    es = phase == "ES"
    size, r, theta = grid["size"], grid["r"], grid["theta"]
    fan = (np.abs(theta) <= p["fan_half"]) & (r <= p["fan_depth"])

    # Left ventricle: apex fixed near the probe; in systole the base moves towards the apex.
    lv_len = p["lv_len"] * (p["es_len"] if es else 1.0)
    half_width = p["lv_half_width"] * v["width"] * (p["es_width"] if es else 1.0)
    wall = p["wall"] * (p["es_wall"] if es else 1.0)
    apex = (0.5 + p["apex_depth"] * np.sin(v["apex_angle"]), p["apex_depth"] * np.cos(v["apex_angle"]))
    u, w = _axis_coords(grid, apex, v["tilt"])
    wall_v = np.where(w > 0, wall * p["wall_ratio"], wall / p["wall_ratio"])  # septal vs lateral wall
    centre = p["kappa"] * lv_len
    cavity = _bullet(u, w, lv_len, p["kappa"], half_width, 0.0, 0.0, v["harmonics"])
    outer = _bullet(u, w, lv_len, p["kappa"], half_width, wall * p["apex_wall"], wall_v, v["wall_harmonics"])

    # Left atrium: below the mitral plane (u = lv_len), larger at end-systole when it fills.
    la_len = p["la_len"] * (p["es_la"] if es else 1.0)
    la_half_width = p["la_half_width"] * (p["es_la"] if es else 1.0)
    la_u, la_v = _axis_coords(grid, _along(apex, v["tilt"], lv_len, v["la_shift"]), v["tilt"] + v["la_tilt"])
    la_radius = _radius(la_u, la_v, 0.8 * la_len, la_len, la_half_width, v["la_harmonics"])
    la = (la_radius <= 1.0) & (u >= lv_len) & ~outer
    la_wall = la_radius <= _ATRIAL_WALL

    mask = np.zeros((size, size), np.uint8)
    mask[la] = 3
    mask[outer] = 2
    mask[cavity] = 1
    mask[~fan] = 0

    # Echogenicity: textured tissue, bright myocardium (brightest where the wall faces the beam),
    # dark blood, thin atrial walls, and in 4CH an unlabelled right heart.
    echo = p["tissue"] * np.exp(0.35 * texture)
    sac = _radius(u, w, centre, centre + wall + 0.04, half_width + wall_v + 0.04, v["wall_harmonics"])
    pericardium = (sac <= 1.0) & (sac >= 0.92) & (w > 0) & (u <= lv_len)  # lateral side; RV in 4CH is left
    echo[pericardium] = p["pericardium"] * p["myo"] * np.exp(0.5 * texture[pericardium])
    atrial_wall = la_wall & (la_u >= 0)  # thin, and fainter than the ventricular wall
    echo[atrial_wall] = 0.4 * p["myo"] * np.exp(0.5 * texture[atrial_wall])
    if v["view"] == "4CH":
        _draw_right_heart(grid, p, v, es, apex, lv_len, half_width, wall, outer | la_wall, echo)
    myo = mask == 2
    # wall normal ~ gradient of the cavity ellipse; the beam's angle in axis coordinates is theta - tilt
    normal = np.arctan2(w[myo] / half_width**2, (u[myo] - centre) / centre**2)
    beam_facing = np.abs(np.cos(normal - theta[myo] + v["tilt"]))
    echo[myo] = p["myo"] * (0.8 + 0.2 * beam_facing) * np.exp(0.2 * texture[myo])
    echo[(mask == 1) | (mask == 3)] = p["blood"]
    if es:  # closed mitral leaflets across the valve plane
        echo[(np.abs(u - lv_len) < 0.006) & (cavity | la | outer)] = 0.6 * p["myo"]
    px = max(size / 256.0, 0.25)  # speckle and blur widths are set for 256 px and scale with the image
    echo = ndimage.gaussian_filter(echo, (1.0 * px, 1.8 * px)) + p["clutter"] * grid["near_field"]

    # Speckle: smoothed complex noise in (depth, angle) bins, so grains widen laterally with depth.
    noise = _redrawn(rng, noise_rng, lambda g: g.standard_normal((2, size, size), dtype=np.float32))
    noise = ndimage.gaussian_filter(noise, (0, 0.9 * px * p["speckle"], 1.6 * px * p["speckle"]))
    speckle = np.hypot(noise[0], noise[1])
    # nearest-bin scan conversion; the blur hides its steps and the sub-pixel angle bins near the apex
    speckle = ndimage.gaussian_filter(speckle.ravel()[grid["polar"]], 0.7 * px)
    speckle /= speckle.mean()

    edge = np.clip((p["fan_half"] - np.abs(theta)) / 0.06, 0.0, 1.0)  # soft lateral sector edges
    image = echo * speckle * np.exp(-p["attenuation"] * r) * (0.4 + 0.6 * edge)
    image = (1.0 - np.exp(-p["gain"] * image)) ** p["gamma"]  # soft saturation instead of clipping
    image = np.where(fan, np.rint(image * 255.0), 0).astype(np.uint8)
    return image, mask


def _along(origin: tuple[float, float], angle: float, u: float, v: float) -> tuple[float, float]:
    """The image point at axis coordinates (u, v) of an axis through ``origin`` tilted ``angle``."""
    s, c = np.sin(angle), np.cos(angle)
    return origin[0] + u * s + v * c, origin[1] + u * c - v * s


def _draw_right_heart(grid, p, v, es, apex, lv_len, half_width, wall, left_heart, echo) -> None:
    """Paint an (unlabelled) right ventricle and atrium on the image-left of the septum into ``echo``."""
    scale = p["es_width"] ** 0.5 if es else 1.0  # the RV contracts less than the LV
    rv_width = v["rv_half_width"] * half_width * scale
    rv_apex = _along(apex, v["tilt"], v["rv_drop"], -(half_width + wall + 0.3 * rv_width))
    rv_tilt = v["tilt"] + v["rv_tilt"]
    rv_len = v["rv_len"] * lv_len * scale
    u, w = _axis_coords(grid, rv_apex, rv_tilt)
    rv = _bullet(u, w, rv_len, p["kappa"], rv_width, 0.0, 0.0, v["rv_harmonics"])
    rv_wall = _bullet(u, w, rv_len, p["kappa"], rv_width, 0.6 * wall, 0.6 * wall, v["rv_harmonics"])
    ra_len, ra_width = v["ra_len"] * p["la_len"], v["ra_half_width"] * p["la_half_width"]
    ra_u, ra_v = _axis_coords(grid, _along(rv_apex, rv_tilt, rv_len, 0.0), rv_tilt)
    ra_radius = _radius(ra_u, ra_v, 0.8 * ra_len, ra_len, ra_width, v["rv_harmonics"])
    ra, ra_wall = ra_radius <= 1.0, ra_radius <= _ATRIAL_WALL
    echo[(rv_wall & ~left_heart) | (ra_wall & (ra_u >= 0) & ~left_heart)] = 0.8 * p["myo"]
    echo[(rv | (ra & (ra_u >= 0))) & ~left_heart] = p["blood"]


def ensure_synthetic_dataset(
    path: str | Path, size: int = 256, patients: tuple[int, int, int] = (350, 50, 50), seed: int = 0,
    dims: int = 2,
) -> Path:
    """Build the phantom and save it to ``path`` (.npz or .pkl) unless ``path`` already exists.

    ``dims`` 2: the echo phantom (4 images ``[1, size, size]`` per patient); 3: the brain phantom of
    :mod:`utils.data.synthetic_brain` (one volume ``[1, size, size, size]`` per patient).
    An existing file is reused after checking its image shape and split sizes against ``size``, ``dims``
    and ``patients`` (a :class:`utils.data.dataset_io.DatasetError` names the mismatch); its seed is not checked.
    """
    from utils.data.dataset_io import DatasetError, load_dataset, save_dataset

    path = Path(path)
    name, per_patient = ("echo", 4) if dims == 2 else ("brain", 1)
    if path.exists():
        data = load_dataset(path)
        found = {split: len(data.get(split, [])) for split in SPLITS}
        expected = {split: per_patient * int(n) for split, n in zip(SPLITS, patients)}
        shape = tuple(data["train"][0]["image"].shape) if found["train"] else None
        if found != expected or shape != (1, *(size,) * dims):
            raise DatasetError(
                f"{path}: existing synthetic dataset has images {shape} and split sizes {found}, expected "
                f"{(1, *(size,) * dims)} and {expected}; delete it or choose another path"
            )
        logger.info("using the existing synthetic %s dataset %s", name, path)
        return path
    logger.info("building the synthetic %s dataset (size %d, patients %s, seed %d) -> %s",
                name, size, tuple(patients), seed, path)
    save_dataset(path, _builder(dims)(size, tuple(patients), seed))
    logger.info("wrote %s", path)
    return path


def _builder(dims: int):
    """The phantom builder ``(size, patients, seed) -> dataset`` of ``dims`` (2 echo, 3 brain)."""
    if dims == 2:
        return build_synthetic_dataset
    if dims == 3:
        from utils.data.synthetic_brain import build_brain_dataset

        return build_brain_dataset
    raise ValueError(f"synthetic dataset: dims must be 2 or 3, got {dims}")


def save_examples_png(data: dict[str, list[dict]], path: str | Path, n: int = 2) -> Path:
    """A PNG of the first ``n`` patients of the first non-empty split: per patient one row of its images
    and one row with the mask drawn over them (LV cavity red, myocardium green, LA cavity blue)."""
    from PIL import Image

    records = next(recs for recs in data.values() if recs)
    patients = list(dict.fromkeys(r["metadata"]["patient"] for r in records))[:n]
    colours = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 60], [50, 110, 255]], np.float32)
    rows = []
    for patient in patients:
        recs = [r for r in records if r["metadata"]["patient"] == patient]
        grey = [np.repeat(r["image"][0, :, :, None].astype(np.float32), 3, axis=2) for r in recs]
        overlay = [
            np.where(r["mask"][0, :, :, None] > 0, 0.55 * g + 0.45 * colours[r["mask"][0]], g)
            for g, r in zip(grey, recs)
        ]
        rows += [np.concatenate(grey, axis=1), np.concatenate(overlay, axis=1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8)).save(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.data.synthetic_echo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build the synthetic apical echo phantom (CAMUS labels and layout), or with --dims 3 the "
        "synthetic brain tumour phantom (BraTS labels), and save it.",
        epilog="examples:\n  python -m utils.data.synthetic_echo --output data/synthetic_echo.npz --size 256 "
        "--patients 350 50 50 --seed 0 \\\n      --examples docs/synthetic_examples.png\n"
        "  python -m utils.data.synthetic_echo --dims 3 --output data/synthetic_brain_nifti --size 32 "
        "--patients 8 2 2",
    )
    parser.add_argument("--output", required=True, type=Path,
                        help="dataset file to write (.npz or .pkl); with --dims 3 also a folder (no suffix), "
                        "written as NIfTI files {split}/images|masks/NAME.nii.gz")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2,
                        help="2: the echo phantom (images); 3: the brain phantom (volumes)")
    parser.add_argument("--size", type=int, help=f"image side in pixels (default 256, >= {MIN_SIZE}); with "
                        "--dims 3 the volume side in voxels (default 32, >= 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                        help="patients per split (default 350 50 50 with 4 images each; with --dims 3 "
                        "48 8 8 with one volume each)")
    parser.add_argument("--examples", type=Path, help="also write a PNG of the first 2 training patients "
                        "(3-D: three orthogonal slices through the tumour)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from utils.cli import configure_logging

    configure_logging(timestamps=False)
    nifti = args.dims == 3 and args.output.suffix == ""
    if not nifti and args.output.suffix.lower() not in (".npz", ".pkl", ".pickle"):
        parser.error(f"--output {args.output}: expected a .npz or .pkl file"
                     + (" or a folder name without a suffix (NIfTI)" if args.dims == 3 else ""))
    for out in (args.output, args.examples):
        if out is not None and out.exists() and not args.overwrite:
            parser.error(f"{out} exists; pass --overwrite to replace it")
    size = args.size or (256 if args.dims == 2 else 32)
    patients = tuple(args.patients or ((350, 50, 50) if args.dims == 2 else (48, 8, 8)))
    try:
        data = _builder(args.dims)(size, patients, args.seed)
    except ValueError as e:
        parser.error(str(e))
    _save(args.output, data, nifti, args.overwrite)
    logger.info("wrote %s (%s records)", args.output, " / ".join(str(len(data[s])) for s in SPLITS))
    if args.examples is not None:
        logger.info("wrote %s", _save_examples(data, args.examples, args.dims))


def _save_examples(data: dict[str, list[dict]], path: Path, dims: int) -> Path:
    """The examples PNG of the echo phantom (``dims`` 2) or the brain phantom (3: orthogonal slices)."""
    if dims == 2:
        return save_examples_png(data, path)
    from utils.data.synthetic_brain import save_brain_examples_png

    return save_brain_examples_png(data, path)


def _save(output: Path, data: dict[str, list[dict]], nifti: bool, overwrite: bool) -> None:
    """``data`` to a .npz/.pkl file, or (``nifti``) to a NIfTI folder (files of the same names are replaced;
    nothing else in the folder is deleted)."""
    if nifti:
        from utils.data.nifti_folder import save_nifti_folder

        save_nifti_folder(output, data)
    else:
        from utils.data.dataset_io import save_dataset

        save_dataset(output, data, overwrite=overwrite)


if __name__ == "__main__":
    main()
