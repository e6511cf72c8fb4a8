"""The diffusion model's schedule and samplers: MONAI's DDPMScheduler (training) and its DDIM / DDPM steps.

MONAI's schedulers are used for all of the arithmetic, with two corrections:

- ``set_timesteps(N)`` visits ``linspace(T - 1, 0, N).round()``, but ``step`` assumes equal strides (DDIM goes
  from t to t - T // N, DDPM to t - 1), so for N < T each step lands at a noise level other than the one the
  next step is evaluated at (MONAI 1.6; the same bug as diffusers #12633). :func:`sampling_scheduler` gives the
  sampler a scheduler of exactly the visited timesteps, whose step k goes from the k-th to the (k+1)-th (the
  last to the clean image): the DDIM paper's sampler on a sub-sequence, and Nichol & Dhariwal's respaced DDPM.
  With N = T it is the trained schedule itself.
- ``step`` draws its random term for the whole batch from one generator; :func:`step` swaps it for each
  sample's own noise, so that a sample does not depend on the batch it is made in.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, Scheduler

from utils.methods.ddpm.config import DDPMConfig
from utils.seeding import SampleNoise

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}  # sampling_args.sampler -> its MONAI scheduler


@NoiseSchedules.add_def("respaced", "a trained schedule on an ascending sub-sequence of its timesteps")
def _respaced(num_train_timesteps: int, betas: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor):
    """Step k spans the trained steps (timesteps[k - 1], timesteps[k]]: its beta is 1 - the product of their
    alphas, in float64 so that consecutive timesteps give back the trained betas exactly."""
    abar = torch.cumprod(1.0 - betas.double(), 0)[timesteps]
    step_betas = (1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])).float()
    return step_betas, 1.0 - step_betas, alphas_cumprod[timesteps]


def noise_schedule(cfg: DDPMConfig) -> DDPMScheduler:
    """The trained forward process q(x_t | x_1): ``add_noise``, ``get_velocity`` and ``alphas_cumprod`` (T,)."""
    betas = {} if cfg.schedule == "cosine" else {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
    return DDPMScheduler(cfg.num_train_timesteps, cfg.schedule, clip_sample=cfg.clip_sample,
                         prediction_type=cfg.prediction_type, **betas)


def sampling_scheduler(cfg: DDPMConfig, sampler: str, num_steps: int) -> tuple[Scheduler, torch.Tensor]:
    """The MONAI scheduler of ``sampler`` over ``num_steps`` steps, and the trained timesteps (N,) it visits.

    Its own timesteps are N - 1, ..., 0; its step at N - 1 - k starts from trained timestep ``timesteps[k]``
    (descending from T - 1, as MONAI's ``set_timesteps`` picks them) and ends at ``timesteps[k + 1]``.
    """
    trained = noise_schedule(cfg)
    trained.set_timesteps(num_steps)
    timesteps = trained.timesteps
    scheduler = SCHEDULERS[sampler](num_steps, "respaced", betas=trained.betas, alphas_cumprod=trained.alphas_cumprod,
                                    timesteps=timesteps.flip(0), clip_sample=cfg.clip_sample,
                                    prediction_type=cfg.prediction_type)
    scheduler.set_timesteps(num_steps)
    return scheduler, timesteps


def noise_scale(scheduler: Scheduler, timestep: int, eta: float) -> float:
    """sigma of the random term MONAI's ``step`` adds at ``timestep`` (DDIM: eta times the posterior's std)."""
    if isinstance(scheduler, DDIMScheduler):
        prev = timestep - scheduler.num_train_timesteps // scheduler.num_inference_steps
        return eta * float(scheduler._get_variance(timestep, prev)) ** 0.5
    return float(scheduler._get_variance(timestep)) ** 0.5 if timestep > 0 else 0.0


def clipped_model_output(scheduler: Scheduler, model_output: torch.Tensor, timestep: int, x_t: torch.Tensor,
                         prediction_type: str) -> torch.Tensor:
    """The network output (``epsilon`` or ``v_prediction``) that predicts the clamped image: x0 from the output,
    clamped to [-1, 1], back to the output's kind. MONAI's DDIM step clamps x0 but moves along the raw output's
    noise, so an x0 estimate far outside [-1, 1] (early steps of a poorly trained model) throws x_t off."""
    abar = scheduler.alphas_cumprod[timestep].to(x_t)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return (x_t - a * ((x_t - s * model_output) / a).clamp(-1, 1)) / s
    return (a * x_t - (a * x_t - s * model_output).clamp(-1, 1)) / s


def step(scheduler: Scheduler, model_output: torch.Tensor, timestep: int, x_t: torch.Tensor, eta: float,
         noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """MONAI's ``scheduler.step`` from ``x_t``, with its random term sigma * z taken from ``noise()`` (B, ...).

    MONAI draws z for the whole batch from the generator it is given; the draw is replayed and swapped for
    ``noise()`` (called only when sigma > 0), so the mean, the clipping and sigma stay MONAI's arithmetic.
    """
    model_output = model_output.float()  # the update in fp32 whatever the network's autocast
    kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    generator = torch.Generator(x_t.device).manual_seed(0)
    x_prev, _ = scheduler.step(model_output, timestep, x_t, generator=generator, **kwargs)
    sigma = noise_scale(scheduler, timestep, eta)
    if sigma == 0:
        return x_prev
    drawn = torch.randn(x_t.shape, dtype=model_output.dtype, generator=generator.manual_seed(0), device=x_t.device)
    return x_prev + sigma * (noise() - drawn)


@torch.no_grad()
def sample(denoiser: Callable, mask: torch.Tensor, noise: SampleNoise, cfg: DDPMConfig, sampler: str,
           num_steps: int) -> torch.Tensor:
    """x_1 (B, 1, H, W) in image units from x_T = ``noise.initial()``, in ``num_steps`` steps (network calls).

    ``denoiser(x_t, timesteps, mask)`` with integer ``timesteps`` (B,) predicts ``cfg.prediction_type``; the
    random term of step k (the ``ddpm`` sampler, ``ddim`` with eta > 0) is ``noise.step(k)``.
    """
    scheduler, timesteps = sampling_scheduler(cfg, sampler, num_steps)
    x_t = noise.initial()
    for k, (own, trained) in enumerate(zip(scheduler.timesteps.tolist(), timesteps.tolist())):
        model_output = denoiser(x_t, torch.full((len(x_t),), trained, device=x_t.device), mask).float()
        if cfg.use_clipped_model_output and sampler == "ddim":
            model_output = clipped_model_output(scheduler, model_output, own, x_t, cfg.prediction_type)
        x_t = step(scheduler, model_output, own, x_t, cfg.eta, partial(noise.step, k))
    return x_t
