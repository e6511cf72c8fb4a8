"""The ControlNet diffusion baseline's config: its noise schedule and samplers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from utils.config import RunConfig, require


@dataclass(frozen=True)
class DDPMConfig:
    """A denoising diffusion model on the same network (the ControlNet baseline of the seed's main table).

    The noise schedule is MONAI's ``DDPMScheduler`` default, Ho et al.'s: betas linear from 1e-4 to 0.02
    over 1,000 steps (the seed does not give its baseline's schedule).
    """

    num_train_timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "linear_beta"
    beta_start: float = 1e-4  # the beta schedules' ends (not used by cosine)
    beta_end: float = 2e-2
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    eta: float = 0.0  # the ddim sampler's noise: 0 = deterministic DDIM, 1 = DDPM's posterior variance
    clip_sample: bool = True  # clamp each step's predicted image to [-1, 1]
    # ddim: step along the noise re-derived from the clamped image (diffusers' use_clipped_model_output), so the
    # two halves of a step agree; false is MONAI's DDIM step, which clamps the image and keeps the raw noise
    use_clipped_model_output: bool = False

    def check(self, key):
        require(self.num_train_timesteps >= 2, key("num_train_timesteps"),
                f"must be >= 2, got {self.num_train_timesteps}")
        require(0 < self.beta_start < self.beta_end < 1, key("beta_start"),
                f"and beta_end must satisfy 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")
        require(0 <= self.eta <= 1, key("eta"), f"must be in [0, 1], got {self.eta}")


@dataclass(frozen=True)
class DDPMRunConfig(RunConfig):
    ddpm_args: DDPMConfig = field(default_factory=DDPMConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = ("ddpm_args",)
    SAMPLERS: ClassVar[tuple[str, ...]] = ("ddim", "ddpm")
    INFERENCE_KEYS: ClassVar[tuple[str, ...]] = ("ddpm_args.eta", "ddpm_args.use_clipped_model_output")
    UNET: ClassVar[bool] = True

    def check(self, key):
        super().check(key)
        steps, train_steps = self.sampling_args.num_steps, self.ddpm_args.num_train_timesteps
        require(steps <= train_steps, "sampling_args.num_steps",
                f"must be <= ddpm_args.num_train_timesteps ({train_steps}), got {steps}")
