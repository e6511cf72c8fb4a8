"""Checkpoints: finding one in a run directory and reading it safely (utils.methods.load_module rebuilds its
method)."""

from __future__ import annotations

import re
from pathlib import Path

from utils.files import load_torch_file

_BEST = re.compile(r"best-epoch(\d+)-valloss([0-9.eE+-]+?)(?:-v\d+)?\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


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
    scored = [(score[1], -score[0], p) for p in path.glob("best-*.ckpt") if (score := best_score(p.name))]
    if not scored:
        raise CheckpointError(f"{path}: has no best-epoch*-valloss*.ckpt (is it a run directory?); "
                              "use --which last or give a .ckpt file")
    return min(scored)[2]


def best_score(name: str) -> tuple[int, float] | None:
    """(epoch, val/loss) that a best checkpoint's file name ``best-epochE-vallossL[-vN].ckpt`` carries, else None."""
    m = _BEST.search(name)
    return (int(m.group(1)), float(m.group(2))) if m else None


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint dict of a COMET ``.ckpt`` (``torch.load(weights_only=True)``), its layout checked.

    ``mmap`` maps the tensors instead of reading them (for a look at epoch and step).
    """
    ckpt = load_torch_file(path, "a PyTorch checkpoint", CheckpointError, mmap)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("config"), dict):
        raise CheckpointError(f"{path}: not a COMET checkpoint (no hyper_parameters with a config); "
                              "expected a .ckpt written by trainer.py")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: has no state_dict; expected a .ckpt written by trainer.py")
    return ckpt
