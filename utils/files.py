"""Files written whole or not at all, files' fingerprints, and a user's torch file read without running code."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write; when the block ends without an error it replaces ``path``
    (atomic on one filesystem: a killed run, or another rank, never sees half a file), else it is removed.

    ``suffix`` ends the temporary name, for writers that append their own (``np.save``: ``.tmp.npy``)."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_torch_file(path: str | Path, what: str, error: type[Exception], mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU (``mmap``: tensors mapped, not read). A file that is not
    one (truncated, text, another zip) or that would run code is ``error`` naming ``path`` as ``what``."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        text = str(e)
        if zipfile.is_zipfile(path) and "Weights only load failed" in text:  # a torch.save file that runs code
            reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
            raise error(f"{path}: refused by torch.load(weights_only=True), which runs no code from a file: "
                        f"{reason}") from e
        raise error(f"{path}: cannot read as {what} (truncated, corrupt or another kind of file: "
                    f"{type(e).__name__})") from e
