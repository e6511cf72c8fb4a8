"""Seeded randomness: every random draw of training and generation comes from a stream named by integers.

Sample i of a generation run depends only on (seed, i), whatever the batch size or the number of devices;
a training draw depends only on (seed, rank, epoch, batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def seeded_generator(entropy: list[int], device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from a list of integers (numpy's SeedSequence mixes them)."""
    seed = int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def noise_for_indices(indices: torch.Tensor, shape: tuple[int, ...], seed: int, stream: int = 0) -> torch.Tensor:
    """Standard normal noise (len(indices), *shape) where row i depends only on (seed, indices[i], stream).

    Results therefore do not change with the batch size or the number of devices. Stream 0 is a sample's
    starting noise; a sampler that adds noise along the way draws step k's from stream k + 1.
    """
    rows = [torch.randn(shape, generator=seeded_generator([seed, i] if stream == 0 else [seed, i, stream]))
            for i in indices.tolist()]
    return torch.stack(rows) if rows else torch.empty((0, *shape))


@dataclass(frozen=True)
class SampleNoise:
    """Every random number a sampler may use for a batch of samples: row i of each draw depends only on
    (seed, ids[i]), so an image does not depend on the batch it was made in."""

    ids: torch.Tensor  # (B,) sample indices
    seed: int
    shape: tuple[int, ...]  # one sample's shape, e.g. (1, H, W)
    device: torch.device | str = "cpu"

    def initial(self) -> torch.Tensor:
        """(B, *shape): where a sample starts (the prior's eps, x_T, a latent)."""
        return noise_for_indices(self.ids, self.shape, self.seed).to(self.device)

    def step(self, k: int) -> torch.Tensor:
        """(B, *shape): fresh noise for step k (k >= 0) of a stochastic sampler."""
        return noise_for_indices(self.ids, self.shape, self.seed, stream=k + 1).to(self.device)


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def fixed_times(index: torch.Tensor) -> torch.Tensor:
    """A fixed t in [0, 1) per validation sample (golden-ratio sequence), so val/loss is comparable."""
    return torch.remainder(index.double() * GOLDEN + 0.5 * GOLDEN, 1.0).float()
