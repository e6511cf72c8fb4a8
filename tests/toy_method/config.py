"""The toy method's config: its one section and its one sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from utils.config import RunConfig, require


@dataclass(frozen=True)
class ToyConfig:
    noise_scale: float = 0.1  # the generated image's N(0, noise_scale^2) noise

    def check(self, key):
        require(self.noise_scale >= 0, key("noise_scale"), f"must be >= 0, got {self.noise_scale}")


@dataclass(frozen=True)
class ToyRunConfig(RunConfig):
    toy_args: ToyConfig = field(default_factory=ToyConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = ("toy_args",)
    SAMPLERS: ClassVar[tuple[str, ...]] = ("one_pass",)
