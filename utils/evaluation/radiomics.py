"""Fréchet Radiomics Distance (FRD; Konz, Osuala et al., Medical Image Analysis 2026) through the ``frd-score``
package: a distribution metric that needs no downloaded weights.

Features: every image is written as an 8-bit PNG (volumes: an 8-bit NIfTI), exactly what ``python -m
frd_score DIR1 DIR2`` would read, and passed with a whole-image mask to the package's own pyradiomics extractor
(``frd_score.frd.get_feature_extractor`` and ``process_image_mask_pair``), so the features are the package's:

- ``v0`` (Osuala et al. 2024): first-order, texture and shape features of the original image (~100 for 2-D);
  both sets min-max normalised to [0, 7.457] on their union; FRD = the Fréchet distance.
- ``v1`` (the package's default): the same classes on the original, LoG and wavelet images (~400); z-scored
  with the first (reference) set's statistics, columns with NaN/Inf dropped; FRD = log(Fréchet distance).

:func:`frechet_radiomics_distance` takes the per-image features of both sets and runs the package's
normalisation and Fréchet distance (``z_score_normalize``, ``min_max_normalize``, ``calculate_frechet_distance``)
in the order of its ``calculate_feature_statistics``; a test checks the result against the package's CLI on the
same PNG folders. Extracting the features once per set lets one reference serve every compared set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FRD_VERSIONS = ("v0", "v1")


class RadiomicsExtractor:
    """``images01 [N, 1, H, W]`` (or ``[N, 1, D, H, W]``) in [0, 1] -> raw radiomic features ``float64 [N, F]``
    of FRD ``version``. ``name`` and ``weights_sha256`` (the package, pyradiomics and version) key the
    :class:`utils.evaluation.feature_extractors.FeatureCache` of the reference set."""

    def __init__(self, version: str):
        if version not in FRD_VERSIONS:
            raise ValueError(f"FRD version must be one of {FRD_VERSIONS}, got {version!r}")
        from importlib.metadata import version as installed

        self.version, self.name = version, f"frd_{version}"
        packages = f"frd-score {installed('frd-score')}, pyradiomics {_pyradiomics_version()}"
        self.weights_sha256 = hashlib.sha256(f"{packages}, {version}".encode()).hexdigest()
        self.weights_files = {"(no weights)": packages}
        self._extractors = {}

    def __call__(self, images01) -> np.ndarray:
        images = np.asarray(images01, dtype=np.float64)
        if images.ndim not in (4, 5) or images.shape[1] != 1:
            raise ValueError(f"expected images [N,1,H,W] or volumes [N,1,D,H,W], got {list(images.shape)}")
        from tqdm import tqdm

        with tempfile.TemporaryDirectory(prefix="comet_frd_") as tmp:
            files = write_images(images, Path(tmp))
            rows = [self._features(f, images.ndim - 2)
                    for f in tqdm(files, desc=f"{self.name} radiomics", unit="img", leave=False)]
        failed = [i for i, r in enumerate(rows) if r is None]
        if len(failed) == len(rows):
            raise ValueError(f"pyradiomics extracted no {self.name} features from any of the {len(rows)} images "
                             "(all constant?)")
        if failed:
            log.warning("%s: no radiomic features for %d of %d images (constant images?), e.g. image %d; they are "
                        "left out of FRD and precision/recall", self.name, len(failed), len(rows), failed[0])
        width = next(len(r) for r in rows if r is not None)
        return np.stack([np.full(width, np.nan) if r is None else r for r in rows])

    def _features(self, path: Path, dims: int) -> np.ndarray | None:
        """The features of one image file, or None when pyradiomics cannot compute them (a constant image:
        its histogram has no width, ``ValueError``)."""
        from frd_score import frd

        if dims not in self._extractors:
            frd._ensure_radiomics()
            frd.setVerbosity(60)  # pyradiomics logs every image otherwise, to its own handler and to the root's
            for name in ("radiomics", "pykwalify"):  # pykwalify logs 'validation.valid' per extractor
                logging.getLogger(name).setLevel(logging.ERROR)
            self._extractors[dims] = frd.get_feature_extractor(frd_version=self.version, image_dim=dims)
        with _quiet():
            try:
                out = frd.process_image_mask_pair((path, None), feature_extractor=self._extractors[dims],
                                                  frd_version=self.version)
            except ValueError:
                return None
        if out is None:  # only for a mask of <= 1 voxel, which a whole-image mask never is
            raise ValueError(f"frd_score extracted no features from {path}")
        return np.asarray(out[0], dtype=np.float64)


@contextlib.contextmanager
def _quiet():
    """frd_score logs a line per constant feature to the root logger at INFO (the shape features of a
    whole-image mask are constant): silenced while it runs."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def radiomics_problem() -> str | None:
    """Why FRD cannot be computed here (frd-score or its pyradiomics missing), or None."""
    from importlib.util import find_spec

    missing = [name for name, module in (("frd-score", "frd_score"), ("pyradiomics-bhklab", "radiomics"))
               if find_spec(module) is None]
    return (f"{' and '.join(missing)} not installed (bash setup.sh installs them; or pip install frd-score "
            "pyradiomics-bhklab)") if missing else None


def _pyradiomics_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("pyradiomics-bhklab", "pyradiomics"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def write_images(images01: np.ndarray, directory: Path) -> list[Path]:
    """``images01 [N, 1, ...]`` in [0, 1] as ``directory/NNNNN.png`` (2-D, 8-bit grey) or ``.nii.gz`` (3-D, 8-bit):
    the files ``python -m frd_score`` reads. Returns them in order."""
    import SimpleITK as sitk
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    u8 = np.rint(np.clip(images01[:, 0], 0.0, 1.0) * 255.0).astype(np.uint8)
    files = []
    for i, image in enumerate(u8):
        if image.ndim == 2:
            path = directory / f"{i:05d}.png"
            Image.fromarray(image).save(path)
        else:
            path = directory / f"{i:05d}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
        files.append(path)
    return files


def frechet_radiomics_distance(reference: np.ndarray, features: np.ndarray, version: str) -> float:
    """FRD of ``features [N, F]`` against ``reference [M, F]`` (raw features of :class:`RadiomicsExtractor`),
    by the package's pipeline for ``version``; v1 is a log, so it can be negative (-inf for identical sets)."""
    from frd_score import frd

    sets = [np.asarray(reference, np.float64), np.asarray(features, np.float64)]
    if version == "v1":  # the package drops images with a NaN feature and works in float32
        sets = [s[~np.isnan(s).any(axis=1)].astype(np.float32) for s in sets]
    if min(len(s) for s in sets) < 2:
        raise ValueError(f"FRD needs at least 2 images with finite features per set, got {[len(s) for s in sets]}")
    with _quiet():
        normalised = _normalised(sets, version)
    mu = [s.mean(axis=0) for s in normalised]
    sigma = [np.cov(s, rowvar=False) for s in normalised]
    distance = float(frd.calculate_frechet_distance(mu[0], sigma[0], mu[1], sigma[1]))
    if version == "v0":
        return distance
    return float(np.log(distance)) if distance > 0 else float("-inf")


def _normalised(sets: list[np.ndarray], version: str) -> list[np.ndarray]:
    """The package's normalisation of ``[reference, compared]``: v0 min-max on the union of both sets (its
    ``norm_ref`` 'joint'), v1 z-scores with the reference's statistics ('d1'), then drops columns that are not
    finite in either set."""
    from frd_score import frd

    if version == "v0":
        base = np.concatenate(sets)
        return [frd.min_max_normalize(s, *frd.V0_DEFAULT_NORM_RANGE, base_distribution=base) for s in sets]
    normalised = [frd.z_score_normalize(s, *frd.V1_DEFAULT_NORM_RANGE, base_distribution=sets[0],
                                        replace_nan=False, handle_std_zero=False) for s in sets]
    keep = ~np.any([~np.isfinite(s).all(axis=0) for s in normalised], axis=0)
    return [s[:, keep] for s in normalised]
