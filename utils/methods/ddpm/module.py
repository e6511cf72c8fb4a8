"""A denoising diffusion model on COMET's network: the ControlNet diffusion baseline of the seed's main table.

The UNet + ControlNet of :mod:`utils.methods.networks`, given integer diffusion timesteps, predicts the noise
(or the velocity) of x_t = sqrt(abar_t) * x_1 + sqrt(1 - abar_t) * eps under MONAI's DDPM schedule; images
come from x_T = eps by the DDIM or DDPM sampler of :mod:`utils.methods.ddpm.sampler`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.images import to_unit
from utils.methods.base import SynthesisMethod
from utils.methods.ddpm.config import DDPMRunConfig
from utils.methods.ddpm.sampler import noise_schedule, sample
from utils.methods.networks import build_model, controlnet_parameter_counts
from utils.seeding import SampleNoise, fixed_times


class DDPMModule(SynthesisMethod):
    def __init__(self, cfg: DDPMRunConfig):
        super().__init__(cfg)
        self.model = build_model(self.cfg.model_args, self.cfg.data_args.num_classes)
        self.schedule = noise_schedule(self.cfg.ddpm_args)
        self.keep_ema()

    def describe(self) -> str:
        d = self.cfg.ddpm_args
        betas = "" if d.schedule == "cosine" else f" from {d.beta_start:g} to {d.beta_end:g}"
        return (f"diffusion: {d.num_train_timesteps} steps, {d.schedule}{betas}, predicts {d.prediction_type}, "
                f"clip_sample {d.clip_sample}; ddim eta {d.eta:g}")

    def parameter_counts(self) -> dict[str, int]:
        return controlnet_parameter_counts(self.model)

    def compilable_network(self) -> torch.nn.Module:
        return self.model

    # --- the method -------------------------------------------------------------------------------
    def diffusion_loss(self, network, x_1, mask, eps, timesteps) -> torch.Tensor:
        """MSE of ``network``'s prediction of eps (or of the velocity) at x_t for integer ``timesteps`` (B,)."""
        x_t = self.schedule.add_noise(x_1, eps, timesteps)
        target = eps if self.cfg.ddpm_args.prediction_type == "epsilon" else self.schedule.get_velocity(
            x_1, eps, timesteps)
        return F.mse_loss(network.at_timesteps(x_t, timesteps, mask).float(), target.float())

    def training_draws(self, x_1: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (B,) uniform in {0, ..., T - 1} and eps ~ N(0, I) like x_1, from this (seed, rank, epoch,
        batch)'s stream."""
        g = self.training_generator(batch_idx, x_1.device)
        timesteps = torch.randint(0, self.cfg.ddpm_args.num_train_timesteps, (x_1.shape[0],), generator=g,
                                  device=x_1.device)
        return timesteps, torch.randn(x_1.shape, generator=g, device=x_1.device, dtype=x_1.dtype)

    def training_step(self, batch, batch_idx):
        x_1, mask = batch["x_1"], batch["mask"]
        timesteps, eps = self.training_draws(x_1, batch_idx)
        loss = self.diffusion_loss(self.model, x_1, mask, eps, timesteps)
        self.log("train/loss", loss, prog_bar=False, on_step=True, on_epoch=False, batch_size=x_1.shape[0])
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=x_1.shape[0])
        return loss

    def validation_loss(self, batch: dict) -> torch.Tensor:
        """The training MSE at a fixed (timestep, eps) per validation image, with the weights that make images."""
        x_1, mask, index = batch["x_1"], batch["mask"], batch["index"]
        eps = self.validation_noise(batch)
        num = self.cfg.ddpm_args.num_train_timesteps
        timesteps = (fixed_times(index) * num).long().clamp(max=num - 1).to(x_1.device)  # float32 t may round to 1
        return self.diffusion_loss(self.sampling_network(), x_1, mask, eps, timesteps)

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str) -> torch.Tensor:
        x_1 = sample(self.sampling_network().at_timesteps, mask, noise, self.cfg.ddpm_args, sampler, num_steps)
        return to_unit(x_1)

    def nfe(self, num_steps: int, sampler: str) -> int:
        return num_steps
