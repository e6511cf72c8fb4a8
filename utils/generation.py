"""Generating images from a checkpoint: shared by inferer.py and evaluate.py.

The model and its configuration come from the checkpoint alone; the prior and the sampler are the ones
training used (utils.prior, utils.sampling). The noise of sample i depends only on (seed, i).
"""

from __future__ import annotations

import logging
import pickle
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from utils.images import to_unit
from utils.model import autocast
from utils.prior import noise_for_indices
from utils.sampling import sample

log = logging.getLogger(__name__)

_BEST = re.compile(r"best-epoch(\d+)-valloss([0-9.eE+-]+?)(?:-v\d+)?\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


# What torch.load raises on a file that is not a readable checkpoint (truncated, empty, text, another zip).
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A ``.ckpt`` file as given, or in a run directory the best checkpoint (lowest val/loss in the
    ``best-epochE-vallossL.ckpt`` names) or ``last.ckpt``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint does not exist (give a .ckpt file or a run directory)")
    if which == "last":
        last = path / "last.ckpt"
        if not last.is_file():
            raise CheckpointError(f"{path}: has no last.ckpt (is it a run directory?)")
        return last
    scored = []
    for p in path.glob("best-*.ckpt"):
        m = _BEST.search(p.name)
        if m:
            scored.append((float(m.group(2)), -int(m.group(1)), p))
    if not scored:
        raise CheckpointError(f"{path}: has no best-epoch*-valloss*.ckpt (is it a run directory?); "
                              "use --which last or give a .ckpt file")
    return min(scored)[2]


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint dict of a COMET ``.ckpt`` (``torch.load(weights_only=True)``), its layout checked.

    ``mmap`` maps the tensors instead of reading them (for a look at epoch and step).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?)") from e
        reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line), "")
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): {reason}") from e
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}") from e
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "config" not in hp or "label_values" not in hp:
        raise CheckpointError(f"{path}: not a COMET checkpoint (no hyper_parameters with config and label_values); "
                              "expected a .ckpt written by trainer.py")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: has no state_dict; expected a .ckpt written by trainer.py")
    return ckpt


def load_module(checkpoint: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()):
    """Rebuild the trained COMETModule from a checkpoint, with inference ``--set`` overrides applied.

    Raises :class:`CheckpointError` for a file that is not a usable COMET checkpoint and
    :class:`utils.config.ConfigError` for a refused or invalid override; both name the file or key.
    """
    from utils.config import inference_config
    from utils.module import COMETModule

    ckpt = read_checkpoint(checkpoint)
    config = inference_config(ckpt["hyper_parameters"]["config"], list(overrides), f"{checkpoint}'s config")
    module = COMETModule(config, ckpt["hyper_parameters"]["label_values"])
    try:
        result = module.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # a tensor of another shape
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"{checkpoint}: weights do not fit the network of its config ({detail})") from e
    for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            raise CheckpointError(f"{checkpoint}: state_dict does not match its config: {len(keys)} {what} "
                                  f"key(s), e.g. {keys[0]}")
    return module.to(device).eval()


@dataclass
class Generated:
    images: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    nfe: int  # network evaluations per sample
    seconds: float


def generate(module, masks: torch.Tensor, sample_ids: torch.Tensor, seed: int, num_steps: int, method: str,
             batch_size: int, devices: list[str], progress: bool = True, batch_invariant: bool = False) -> Generated:
    """Images for ``masks`` (N, 1, H, W) uint8; sample ``k`` uses the noise of (seed, sample_ids[k]).

    Work is split over ``devices`` (the module itself on its own device, a copy on any other; one thread
    each; see :func:`same_device`). Batch size and device count
    do not change the noise, the prior or the sampler; batched kernels (convolutions, matrix products)
    still round differently for different batch sizes (about 1e-7 here). ``batch_invariant`` runs the
    network on one image at a time, which makes results bitwise identical for any batch size, at a cost.
    The network runs under the autocast of the checkpoint's ``sampling_args.precision`` (default: none).
    """
    n = len(masks)
    shape = (1, *masks.shape[-2:])
    out = torch.empty((n, *shape), dtype=torch.float32)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    models = [module if same_device(module.device, d) else _copy_to(module, d) for d in devices]
    bar = tqdm(total=n, unit="img", desc="generating", disable=not progress, dynamic_ncols=True)
    nfe = [0]

    def solve(m, mask: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        x_0 = m.prior(mask, noise_for_indices(ids, shape, seed).to(m.device))
        adapter = m.sampling_adapter()
        with torch.inference_mode(), autocast(m.cfg.sampling_args.precision, m.device):
            return sample(adapter, x_0, mask, num_steps, method), adapter.nfe

    def work(k: int, chunk: list[int]) -> None:
        m = models[k % len(models)]
        idx = torch.tensor(chunk)
        mask, ids = masks[idx].to(m.device), sample_ids[idx]
        if batch_invariant:  # the prior's blur and the network each see one image
            parts = [solve(m, mask[j:j + 1], ids[j:j + 1]) for j in range(len(chunk))]
            x_1, nfe[0] = torch.cat([p[0] for p in parts]), parts[0][1]
        else:
            x_1, nfe[0] = solve(m, mask, ids)
        out[idx] = to_unit(x_1).cpu()
        bar.update(len(chunk))

    start = time.perf_counter()
    if len(models) == 1:
        for k, chunk in enumerate(chunks):
            work(k, chunk)
    else:
        with ThreadPoolExecutor(len(models)) as pool:
            for group in range(0, len(chunks), len(models)):
                list(pool.map(work, range(group, min(group + len(models), len(chunks))),
                              chunks[group:group + len(models)]))
    bar.close()
    return Generated(out, nfe[0], time.perf_counter() - start)


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two device specs name the same device ("cuda" is the current CUDA device, "cpu:0" is "cpu")."""

    def canonical(spec) -> tuple[str, int]:
        d = torch.device(spec)
        if d.type == "cpu":
            return "cpu", 0
        if d.index is not None:
            return d.type, d.index
        return d.type, torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0

    return canonical(a) == canonical(b)


def _copy_to(module, device: str):
    import copy

    return copy.deepcopy(module).to(device).eval()
