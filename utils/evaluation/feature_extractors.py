"""Feature extractors for FID / KID (Inception-v3), CMMD (CLIP) and 3D-FID (R3D-18), from local weights only.

Nothing here downloads anything. Weights are found by :func:`resolve_inception_weights` (flag, then
``$COMET_INCEPTION_WEIGHTS``, then the torch hub cache file torch-fidelity itself would use),
:func:`resolve_r3d_weights` (flag, then ``$COMET_R3D_WEIGHTS``, then the torch hub cache file torchvision
would use) and :func:`resolve_clip_dir` (flag, then ``$COMET_CLIP_DIR``); a missing file raises
:class:`MissingWeightsError` naming what was tried, where the weights come from and where to put them.

Preprocessing is identical for real and generated images (:func:`to_uint8_rgb`): images ``[N,1,H,W]``
(or volumes ``[N,1,D,H,W]``) in [0, 1] become ``uint8 [N,3,...]`` by ``round(clamp(x, 0, 1) * 255)``
(never wrapping), grey repeated to RGB. No per-image rescaling. Then:

- Inception (``inception-v3-compat``, 2048-d pool features): torch-fidelity's
  ``FeatureExtractorInceptionV3``, which resizes to 299 with its TF-1.x-compatible bilinear
  interpolation (no antialiasing) and maps x -> (x - 128) / 128.
- CLIP (ViT-L/14@336 for CMMD): as the CMMD reference (google-research ``cmmd``): centre crop to a
  square, PIL-compatible antialiased bicubic resize of the uint8 image to the processor's crop size
  (336), x / 255, normalised with the processor's mean/std; the embedding is ``image_embeds``.
- R3D-18 (torchvision ``r3d_18``, Kinetics-400 weights ``r3d_18-b3b3357e.pth``, 512-d features after
  the global average pool, ``fc`` removed; MOTFM's 3D-FID network): a volume ``[1,D,H,W]`` is a clip
  whose D slices are the frames; x / 255 normalised with the Kinetics mean (0.43216, 0.394666, 0.37645)
  and std (0.22803, 0.22145, 0.216989) per RGB channel, as the weights' ``VideoClassification``
  transform. Unlike that transform, nothing is resized or cropped (MOTFM's 3D-FID neither): the network
  ends in an adaptive pool, so any D, H, W >= 8 works. MOTFM's evaluation_3d/evaluate_3d.py feeds the
  per-set min-max [0, 1] volumes without the Kinetics normalisation, so its 3D-FID values are not
  comparable with these (same network, another input scale).

An extractor has ``name``, ``weights_sha256`` (one fingerprint of everything loaded),
``weights_files`` (``{file name: sha256}`` of each weights file) and
``__call__(images01 [N,1,H,W] (R3D: [N,1,D,H,W]) float in [0,1]) -> np.ndarray float64 [N, F]``.
:class:`FeatureCache` stores real-set features as ``.npy`` keyed by split, extractor, weights and data.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.evaluation.weights import (
    CLIP_ENV,
    CLIP_MODEL_ID,
    INCEPTION_ENV,
    INCEPTION_FILE_NAME,
    INCEPTION_URL,
    R3D_ENV,
    R3D_FILE_NAME,
    R3D_URL,
)
from utils.files import atomic_path, load_torch_file, sha256_file

logger = logging.getLogger(__name__)

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)  # torchvision's R3D_18_Weights.KINETICS400_V1 transform
KINETICS_STD = (0.22803, 0.22145, 0.216989)


class WeightsFileError(ValueError):
    """A weights file that is there but cannot be read as the weights it should hold."""


class MissingWeightsError(FileNotFoundError):
    """Weights for a metric are not on disk; the message says what was tried and how to fix it."""


def inception_hub_path() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (used by torch-fidelity) caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE_NAME


def r3d_hub_path() -> Path:
    """Where ``torchvision.models.video.r3d_18(weights=...)`` caches the Kinetics-400 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / R3D_FILE_NAME


def _resolve_file(flag_value, flag: str, env: str, hub_path: Path) -> tuple[Path, str]:
    """``(path, where it came from)``: the flag, else ``$env``, else the hub cache file.

    The first source that is set is the one used: a flag or variable naming a missing file is an
    error, not a reason to look elsewhere.
    """
    if flag_value:
        return Path(flag_value), flag
    if os.environ.get(env):
        return Path(os.environ[env]), f"${env}"
    return hub_path, "the torch hub cache"


def _weights_file(flag_value, flag: str, env: str, hub_path: Path, what: str, origin: str, url: str,
                  without: str) -> Path:
    """The weights file from ``flag``, ``$env`` or ``hub_path`` (:func:`_resolve_file`); when it is not there, a
    :class:`MissingWeightsError` saying what was tried, where the file comes from and where to put it."""
    path, source = _resolve_file(flag_value, flag, env, hub_path)
    if path.is_file():
        return path
    raise MissingWeightsError(
        f"{what} not found: tried {path} (from {source}). They are {origin}, normally downloaded from {url}. "
        f"On a machine with internet, download that file (`python -m utils.evaluation.weights fetch` downloads and "
        f"verifies it) and copy it to {hub_path}, or pass {flag} FILE, or set "
        f"{env}=FILE. Use --skip_missing_metrics to evaluate without {without}."
    )


def resolve_inception_weights(flag_value: str | Path | None) -> Path:
    """The Inception state-dict file: ``flag_value``, else ``$COMET_INCEPTION_WEIGHTS``, else the hub cache."""
    return _weights_file(flag_value, "--inception_weights", INCEPTION_ENV, inception_hub_path(),
                         "Inception-v3 weights for FID/KID (2.5-D FID of volumes)",
                         "torch-fidelity's converted TF Inception weights", INCEPTION_URL, "them")


def resolve_r3d_weights(flag_value: str | Path | None) -> Path:
    """The R3D-18 state-dict file: ``flag_value``, else ``$COMET_R3D_WEIGHTS``, else the hub cache."""
    return _weights_file(flag_value, "--r3d_weights", R3D_ENV, r3d_hub_path(), "R3D-18 weights for 3D-FID",
                         "torchvision's Kinetics-400 video ResNet weights", R3D_URL, "3D-FID")


def resolve_clip_dir(flag_value: str | Path | None) -> Path:
    """The local CLIP directory (``config.json``, ``preprocessor_config.json``, weights): flag, else env."""
    if flag_value:
        source, path = "--clip_dir", Path(flag_value)
    elif os.environ.get(CLIP_ENV):
        source, path = f"${CLIP_ENV}", Path(os.environ[CLIP_ENV])
    else:
        source, path = None, None
    how = (
        f"It is the Hugging Face model {CLIP_MODEL_ID}: on a machine with internet run "
        f"`hf download {CLIP_MODEL_ID} --local-dir DIR`, copy DIR here and pass --clip_dir DIR or set "
        f"{CLIP_ENV}=DIR. Use --skip_missing_metrics to evaluate without CMMD."
    )
    if path is None:
        raise MissingWeightsError(f"CLIP weights for CMMD not given: neither --clip_dir nor ${CLIP_ENV} "
                                  f"is set. {how}")
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (path / name).is_file()]
    if not missing and not _clip_weight_files(path):
        missing = ["model*.safetensors or pytorch_model*.bin"]
    if missing:
        raise MissingWeightsError(
            f"CLIP directory {path} (from {source}) is missing {', '.join(missing)}. {how}"
        )
    return path


def _clip_weight_files(directory: Path) -> list[Path]:
    """The weights files transformers loads from ``directory``: safetensors first, else .bin (shards too)."""
    return sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))


def to_uint8_rgb(images01: torch.Tensor) -> torch.Tensor:
    """``[N,1,H,W]`` (or ``[N,1,D,H,W]``) float in [0, 1] -> ``uint8 [N,3,...]``: ``round(clamp(x, 0, 1) *
    255)``, grey repeated.

    Rounding is half-to-even (``torch.round``, as ``np.rint``); out-of-range values saturate, never wrap.
    """
    if images01.ndim not in (4, 5) or images01.shape[1] != 1:
        raise ValueError(f"expected grey images [N,1,H,W] or volumes [N,1,D,H,W], got shape "
                         f"{tuple(images01.shape)}")
    if not images01.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images01.dtype}")
    u8 = torch.round(images01.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return u8.expand(-1, 3, *images01.shape[2:]).contiguous()


def data_fingerprint(images01: torch.Tensor) -> str:
    """SHA-256 of the shape and the uint8 pixels the extractors see (the cache key for a data set)."""
    u8 = torch.round(images01.detach().cpu().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    digest = hashlib.sha256(str(tuple(u8.shape)).encode())
    digest.update(u8.contiguous().numpy().tobytes())
    return digest.hexdigest()


class _BatchedExtractor:
    """Shared batching: ``__call__`` runs ``_features(uint8 [B,3,H,W] or [B,3,D,H,W] on device)`` over batches."""

    name: str
    weights_sha256: str
    weights_files: dict[str, str]

    def __init__(self, device: str | torch.device, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _features(self, u8: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _read_state_dict(self, weights_path: str | Path) -> dict:
        """The state dict in ``weights_path`` (``weights_only``: a pickle that would run code is refused; the CPU
        copy also loads GPU-saved files); records and logs the file's SHA-256."""
        weights_path = Path(weights_path)
        self.weights_sha256 = sha256_file(weights_path)
        self.weights_files = {weights_path.name: self.weights_sha256}
        logger.info("%s weights %s (sha256 %s)", self.name, weights_path, self.weights_sha256)
        return load_torch_file(weights_path, f"{self.name} weights (a state dict)", WeightsFileError)

    @torch.inference_mode()
    def __call__(self, images01: torch.Tensor) -> np.ndarray:
        """``[N,1,H,W]`` (R3D: ``[N,1,D,H,W]``) float in [0, 1] -> features ``float64 [N, F]`` (per batch)."""
        out = []
        starts = range(0, len(images01), self.batch_size)
        for start in tqdm(starts, desc=f"{self.name} features", unit="batch", leave=False):
            batch = to_uint8_rgb(images01[start : start + self.batch_size]).to(self.device)
            out.append(self._features(batch).double().cpu())
        return torch.cat(out).numpy()


class InceptionExtractor(_BatchedExtractor):
    """torch-fidelity ``inception-v3-compat``, 2048-d pool features, from a local state-dict file."""

    name = "inception-v3-compat"

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        super().__init__(device, batch_size)
        state_dict = self._read_state_dict(weights_path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        try:
            self.model = FeatureExtractorInceptionV3(self.name, ["2048"],
                                                     feature_extractor_weights_path=buffer)
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
            raise ValueError(f"{weights_path} is not torch-fidelity's Inception-v3 state dict: {e}") from e
        self.model.to(self.device)

    def _features(self, u8: torch.Tensor) -> torch.Tensor:
        return self.model(u8)[0]


class R3DExtractor(_BatchedExtractor):
    """torchvision R3D-18 (Kinetics-400), 512-d pooled features of volumes, from a local state-dict file."""

    name = "r3d-18-kinetics400"

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 4):
        from torchvision.models.video import r3d_18

        super().__init__(device, batch_size)
        state_dict = self._read_state_dict(weights_path)
        self.model = r3d_18()  # architecture only: weights=None downloads nothing
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as e:  # missing/unexpected keys or shapes
            raise ValueError(f"{weights_path} is not torchvision's R3D-18 state dict: {e}") from e
        self.model.fc = torch.nn.Identity()
        self.model.eval().requires_grad_(False).to(self.device)
        self.mean = torch.tensor(KINETICS_MEAN, device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(KINETICS_STD, device=self.device).view(1, 3, 1, 1, 1)

    def _features(self, u8: torch.Tensor) -> torch.Tensor:
        if u8.ndim != 5:
            raise ValueError(f"R3D-18 takes volumes [N,1,D,H,W], got images of shape {tuple(u8.shape)}")
        return self.model((u8.float() / 255.0 - self.mean) / self.std)


class ClipExtractor(_BatchedExtractor):
    """CLIP vision tower + projection (``image_embeds``) from a local transformers directory."""

    def __init__(self, clip_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        super().__init__(device, batch_size)
        clip_dir = Path(clip_dir)
        configs = [clip_dir / "config.json", clip_dir / "preprocessor_config.json"]
        files = [*_clip_weight_files(clip_dir), *configs]
        self.weights_files = {f.name: sha256_file(f) for f in files}
        self.weights_sha256 = hashlib.sha256(
            "".join(f"{k} {v}\n" for k, v in sorted(self.weights_files.items())).encode()
        ).hexdigest()
        processor = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
        self.image_size = int(processor.crop_size["height"])
        self.name = f"clip-{self.image_size}"
        self.mean = torch.tensor(processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=self.device).view(1, 3, 1, 1)
        self.model = CLIPVisionModelWithProjection.from_pretrained(clip_dir, local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        logger.info("CLIP weights %s (fingerprint %s)", clip_dir, self.weights_sha256)

    def pixel_values(self, u8: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,H,W]`` -> normalised ``[B,3,S,S]`` (S = crop size), as the CMMD reference."""
        import torchvision.transforms.v2.functional as TF

        side = min(u8.shape[-2:])
        u8 = TF.center_crop(u8, [side, side])
        # torchvision's uint8 antialiased bicubic matches PIL's Image.resize(BICUBIC) used by cmmd.
        u8 = TF.resize(u8, [self.image_size, self.image_size], interpolation=TF.InterpolationMode.BICUBIC,
                       antialias=True)
        return (u8.float() / 255.0 - self.mean) / self.std

    def _features(self, u8: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.pixel_values(u8)).image_embeds


class FeatureCache:
    """Real-set features on disk: ``{split}__{extractor}__{weights sha[:16]}__{data sha[:16]}.npy``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, split: str, extractor, fingerprint: str) -> Path:
        safe = "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", s) for s in (split, extractor.name))
        return self.directory / f"{safe}__{extractor.weights_sha256[:16]}__{fingerprint[:16]}.npy"

    def features(self, split: str, extractor, images01: torch.Tensor) -> np.ndarray:
        """Features of ``images01`` from the cache, or computed by ``extractor`` and stored."""
        path = self.path(split, extractor, data_fingerprint(images01))
        if path.is_file():
            feats = np.load(path, allow_pickle=False)
            if feats.ndim != 2 or len(feats) != len(images01):
                raise ValueError(f"{path}: cached features have shape {feats.shape}, expected "
                                 f"[{len(images01)}, D]; delete the file to recompute")
            logger.info("loaded cached %s features of split %s from %s", extractor.name, split, path)
            return feats
        feats = extractor(images01)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".tmp.npy") as tmp:  # a killed run never leaves a truncated cache file
            np.save(tmp, feats)
        logger.info("cached %s features of split %s at %s", extractor.name, split, path)
        return feats
