"""Several processes: gathering tensors across DDP ranks, the launcher's rank, waiting for rank 0."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def gather_no_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0 (no gradient), and this rank's offset in it.

    Every rank must pass the same shape (DistributedSampler gives each rank equally many samples).
    Without an initialised process group this is ``(x.detach(), 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach(), 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun: RANK, SLURM: SLURM_PROCID, Lightning's own
    launcher: LOCAL_RANK in the processes it starts); 0 for a process started alone."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def wait_for(ready: Callable[[], bool], what: str, timeout: float, poll: float = 0.5) -> None:
    """Block a rank other than 0 until ``ready()`` (rank 0 writes shared files; the others wait for them)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"error: waited {timeout:.0f} s for rank 0 to {what}; did rank 0 stop with an error?")
        time.sleep(poll)
