"""Dry runs of the generating CLIs (inferer.py, evaluate.py --dry_run): what a run would do, how long its
generation would take and how much memory it needs, from one real batch, with nothing written.

The estimate times the real sampler at the requested steps on the run's first batch, after a warm-up batch
(lazy initialisation, cuDNN's algorithm search and the allocator make a first batch slower than the rest),
and extrapolates by batches: on a GPU a batch costs about the same however full, so the last, partial batch
is counted whole.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from utils.cli import clock
from utils.generation.generate import Generated, generate


@dataclass(frozen=True)
class Estimate:
    timed: int  # samples in the timed batch
    batch_seconds: float  # the timed batch's generation time
    seconds: float  # all samples, extrapolated
    nfe: int  # network evaluations per sample
    peak_bytes: int
    peak_kind: str  # what peak_bytes measures

    def lines(self) -> dict[str, str]:
        """The plan's ``estimate`` and ``memory`` lines."""
        duration = f"{self.seconds:.1f} s" if self.seconds < 60 else clock(self.seconds)
        return {"estimate": f"about {duration} for generation ({self.batch_seconds:.3f} s for a timed "
                            f"batch of {self.timed} after a warm-up; {self.nfe} network evaluations per sample)",
                "memory": f"{self.peak_bytes / 2**30:.2f} GiB, {self.peak_kind}"}


def extrapolate(batch_seconds: float, batch_size: int, n: int, devices: int = 1) -> float:
    """Seconds for ``n`` samples in batches of ``batch_size``, ``devices`` batches at a time, when one batch
    takes ``batch_seconds``: ``ceil(ceil(n / batch_size) / devices) * batch_seconds``."""
    return math.ceil(math.ceil(n / batch_size) / devices) * batch_seconds


def estimate_generation(module, masks: torch.Tensor, seed: int, num_steps: int, sampler: str, batch_size: int,
                        devices: list[str], generate_fn: Callable[..., Generated] = generate,
                        **options) -> Estimate:
    """Generate the first ``min(batch_size, N)`` of the ``N`` samples of ``masks`` as the real run would (their
    noise, sampler, steps and ``options`` of :func:`utils.generation.generate.generate`, tensors among them
    cut to that batch) on ``devices[0]``, twice: a warm-up, then the timed batch; extrapolated to ``N`` over
    all ``devices``."""
    n, k = len(masks), min(batch_size, len(masks))
    first = {key: value[:k] if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    for _ in range(2):  # the second is timed
        result = generate_fn(module, masks[:k], torch.arange(k), seed, num_steps, sampler, k, devices[:1],
                             progress=False, **first)
    return Estimate(k, result.seconds, extrapolate(result.seconds, k, n, len(devices)), result.nfe,
                    *peak_memory(devices[0]))


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what they measure): the process's peak so far, the loaded models included, as a real run holds
    them while it generates. On a GPU what PyTorch allocated there; on a CPU the peak resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), f"peak GPU memory allocated on {device} " \
                                                        "(torch.cuda.max_memory_allocated, models included)"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "peak resident memory of the process " \
                                                                       "(CPU, getrusage ru_maxrss, models included)"


def describe_samples(indices: torch.Tensor, source: str) -> str:
    """'12 samples of 8 masks (1-2 per mask) from <source>', where ``indices`` (N,) gives each sample's mask."""
    counts = torch.bincount(indices)
    counts = counts[counts > 0]
    low, high = int(counts.min()), int(counts.max())
    per_mask = str(low) if low == high else f"{low}-{high}"
    return f"{len(indices)} samples of {len(counts)} masks ({per_mask} per mask) from {source}"


def format_plan(lines: dict[str, str]) -> str:
    """The printed plan: a header saying that nothing was written, then one ``name: text`` line each."""
    width = max(map(len, lines))
    return "\n".join(["dry run: nothing was written"] + [f"  {k + ':':<{width + 1}} {v}" for k, v in lines.items()])
