"""One process per run or study directory: a lock file that names its holder."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """The directory is in use by another process (or its lock file cannot be read)."""


@contextmanager
def directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``directory/.lock`` (created with the directory if need be) while the block runs.

    The lock holds this process's id and host. A lock held by a live process is a LockError naming the lock and
    its process id; one whose process has ended (same host) is taken over with one warning. The lock is removed
    when the block ends, however it ends."""
    path = Path(directory) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _acquire(path)
    try:
        yield path
    finally:
        if _holder(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


def _acquire(path: Path) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a stale lock is removed once, then created again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _alive(holder):
                raise LockError(
                    f"{path.parent} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"since {holder.get('since', '?')} (lock file {path}); wait for it to finish, or remove the "
                    f"lock file if no process uses the directory") from None
            log.warning("%s: taking over the lock of process %s, which is no longer running", path,
                        holder.get("pid"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise LockError(f"{path.parent}: another process took the lock {path} while a stale one was being removed")


def _holder(path: Path) -> dict:
    """The lock's contents; {} when it is missing, being written or not a lock this module wrote."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: its process exists on this host, or it cannot be told (another host,
    a lock being written or unreadable)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
