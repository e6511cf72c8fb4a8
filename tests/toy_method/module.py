"""The toy method: one convolution from the scaled mask to the image, plus noise when generating."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.images import to_unit
from utils.methods.base import SynthesisMethod
from utils.seeding import SampleNoise


class ToyModule(SynthesisMethod):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.keep_ema()

    def predict(self, mask: torch.Tensor) -> torch.Tensor:
        return self.sampling_network()(mask.float() / (self.cfg.data_args.num_classes - 1))

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.model(batch["mask"].float() / (self.cfg.data_args.num_classes - 1)), batch["x_1"])
        self.log("loss", loss, prog_bar=True, batch_size=batch["x_1"].shape[0])
        return loss

    def validation_loss(self, batch: dict) -> torch.Tensor:
        return F.mse_loss(self.predict(batch["mask"]), batch["x_1"])

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str) -> torch.Tensor:
        return to_unit(self.predict(mask) + self.cfg.toy_args.noise_scale * noise.initial())

    def nfe(self, num_steps: int, sampler: str) -> int:
        return 1
