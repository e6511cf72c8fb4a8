"""Gathering tensors across DDP ranks, for the contrastive keys."""

from __future__ import annotations

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
