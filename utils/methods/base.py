"""What every method is to the rest of the code: a LightningModule with a small, fixed set of operations.

Trainer, inferer, evaluate and the benchmark call only these:

- ``training_step(batch, batch_idx)`` (Lightning's), and ``validation_loss(batch)``, the number the best
  checkpoint is chosen by (computed with the weights that make images, deterministic for a given batch);
- ``generate(mask, noise, num_steps, sampler)``: images in [0, 1] for integer masks, where every random
  number of sample i comes from ``noise`` (:class:`utils.seeding.SampleNoise`), and ``nfe(num_steps, sampler)``;
  a class-conditional method (non-empty ``class_names``) also takes ``classes=`` (B,) class indices;
- ``parameter_counts()`` and ``describe()`` for the log.

The base class holds what the methods share: the typed config, the EMA of the generating network
``self.model``, per-(rank, epoch, batch) training randomness, the validation sample grid, the
first-step timing of compiled blocks, and the default optimizer. A method is one subclass in
``utils/methods/`` registered in :mod:`utils.methods`, and one section of :mod:`utils.config`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.config import config_from_dict
from utils.evaluation.metrics import psnr_per_image, ssim_per_image
from utils.generation.generate import generate
from utils.images import display_tiles, grid_image, mask_to_unit, save_png, to_unit
from utils.methods.networks import count_parameters
from utils.seeding import SampleNoise, noise_for_indices, seeded_generator

log = logging.getLogger(__name__)


class MethodSetupError(ValueError):
    """A method that cannot be set up for this data (e.g. Med-DT-FM's stage-0 segmenter below its Dice threshold)."""


def use_fused_adam(on_cuda: bool, precision: str, gradient_clip_val: float) -> bool:
    """Fused Adam (one kernel for all parameters) on CUDA, except for fp16 with clipping: there Lightning's
    GradScaler must unscale before clipping, which an optimizer that unscales inside its step prevents. Under
    bf16 the method clips by itself (:meth:`SynthesisMethod.configure_gradient_clipping`)."""
    return on_cuda and not (precision == "16-mixed" and gradient_clip_val > 0)


def sample_scores(gen01: torch.Tensor, real01: torch.Tensor) -> dict[str, float]:
    """``val/sample_ssim`` and ``val/sample_psnr``: evaluate.py's SSIM and PSNR of generated against real, each
    pair ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` in [0, 1], averaged. Volumes get the 3-D SSIM
    (:func:`utils.evaluation.volume_metrics.ssim_per_volume`), not the 2-D SSIM of their mid-slices; volumes
    with a side under its window get PSNR only."""
    scores = {}
    if gen01.ndim == 5:
        from utils.evaluation.volume_metrics import SSIM_WINDOW, ssim_per_volume

        if min(gen01.shape[2:]) >= SSIM_WINDOW:
            scores["val/sample_ssim"] = float(ssim_per_volume(gen01, real01).mean())
    else:
        scores["val/sample_ssim"] = float(ssim_per_image(gen01, real01).mean())
    scores["val/sample_psnr"] = float(psnr_per_image(gen01, real01).mean())
    return scores


class SynthesisMethod(pl.LightningModule):
    """A mask-conditional image generator trained with Lightning; subclasses build ``self.model``.

    ``config`` is the plain-dict form of :class:`utils.config.Config`; it (and any extra hyperparameter a
    subclass takes) is saved in the checkpoint, which alone rebuilds the module.
    """

    # Lightning's global_step counts every optimizer.step() (Lightning issue #17958): a method that steps
    # other optimizers (a discriminator) with each generator step says how many steps that makes.
    optimizer_steps_per_generator_step = 1

    def __init__(self, config: dict):
        super().__init__()
        self.cfg = config_from_dict(config, "checkpoint config")
        self.ema: AveragedModel | None = None
        self._steps_before_batch = 0
        self._compiled_blocks = 0
        self._time_first_step = False  # log the first step's wall time (it includes the compilation)
        self._first_step_clock = 0.0
        # Set by the trainer; a method that optimises by hand (automatic_optimization = False) accumulates this many.
        self.accumulate_grad_batches = 1

    @classmethod
    def for_data(cls, config: dict, datamodule) -> SynthesisMethod:
        """The module to train on ``datamodule`` (a method whose hyperparameters come from the data overrides)."""
        return cls(config)

    # --- the interface ------------------------------------------------------------------------------
    def validation_loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str) -> torch.Tensor:
        """(B, 1, H, W) float images in [0, 1] for ``mask`` (B, 1, H, W) integer labels."""
        raise NotImplementedError

    def nfe(self, num_steps: int, sampler: str) -> int:
        """Network evaluations per image of :meth:`generate`."""
        raise NotImplementedError

    # A method that can also start from a reference image sets this and implements
    # ``generate_from_reference(mask, reference, noise, num_steps, sampler, t0)`` and ``nfe(..., t0)``.
    supports_reference = False

    @property
    def class_names(self) -> list[str]:
        """The image classes the method is conditioned on, in index order; empty when it is not (then
        :meth:`generate` takes no ``classes``)."""
        return []

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part, for the log (every trained network, the discriminator included)."""
        return {"network": count_parameters(self.model)}

    def describe(self) -> str:
        """One line of the method's settings for the log."""
        return self.cfg.method

    # --- shared machinery ---------------------------------------------------------------------------
    def keep_ema(self) -> None:
        """Keep an EMA of ``self.model`` when ``train_args.ema_decay`` > 0 (call after building it)."""
        decay = self.cfg.train_args.ema_decay
        if decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay))
            self.ema.requires_grad_(False)  # updated by hand; DDP must not wait for its gradients

    def generator_steps(self) -> int:
        """Optimizer steps of the generating network so far (train_args.max_steps counts these)."""
        return self.global_step // self.optimizer_steps_per_generator_step

    def trainer_max_steps(self, generator_steps: int) -> int:
        """Lightning's ``max_steps`` for ``generator_steps`` generator steps (-1, no limit, stays -1)."""
        return generator_steps * self.optimizer_steps_per_generator_step if generator_steps > 0 else -1

    def trainer_arguments(self, accumulate: int, generator_steps: int) -> dict:
        """The Lightning Trainer's accumulation, clipping and ``max_steps`` for this method, which accumulates
        ``accumulate`` micro-batches. Lightning refuses both with manual optimisation: such a method gets 1 and
        None and does them itself (it reads :attr:`accumulate_grad_batches`)."""
        self.accumulate_grad_batches = accumulate
        manual = not self.automatic_optimization
        return {"accumulate_grad_batches": 1 if manual else accumulate,
                "gradient_clip_val": None if manual else self.cfg.train_args.gradient_clip_val or None,
                "max_steps": self.trainer_max_steps(generator_steps)}

    def sampling_network(self) -> torch.nn.Module:
        """The weights images are made with: the EMA weights when kept, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def training_generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        """The random stream of this (seed, global rank, epoch, batch).

        Every DDP rank draws its own numbers (``seed_everything`` alone gives all ranks one stream), and a
        resumed run draws what the uninterrupted run would have drawn at the same epoch and batch.
        """
        return seeded_generator([self.cfg.train_args.seed, self.global_rank, self.current_epoch, batch_idx], device)

    def validation_noise(self, batch: dict) -> torch.Tensor:
        """Fixed N(0, I) noise like ``batch["x_1"]`` per validation image: that of (seed, index), so val/loss
        compares epochs and runs on the same draws."""
        x_1 = batch["x_1"]
        return noise_for_indices(batch["index"].cpu(), tuple(x_1.shape[1:]), self.cfg.train_args.seed).to(x_1)

    def compile_blocks(self) -> int:
        """Compile the network's repeated blocks in place for ``train_args.compile: blocks``; how many."""
        return 0

    def configure_model(self):
        """Regional compilation when ``train_args.compile`` is "blocks" (training only; called by the Trainer)."""
        if self.cfg.train_args.compile == "blocks" and not self._compiled_blocks:
            self._compiled_blocks = self.compile_blocks()
            self._time_first_step = self._compiled_blocks > 0
            log.info("torch.compile on %d blocks: the first training step compiles them", self._compiled_blocks)

    def on_train_batch_start(self, batch, batch_idx):
        self._steps_before_batch = self.generator_steps()
        if self._time_first_step:
            self._first_step_clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None and self.generator_steps() != self._steps_before_batch:  # once per generator step
            self.ema.update_parameters(self.model)
        if self._time_first_step:
            if batch["x_1"].is_cuda:
                torch.cuda.synchronize()
            log.info("first training step took %.1f s (it compiled the %d blocks; inductor caches the kernels)",
                     time.perf_counter() - self._first_step_clock, self._compiled_blocks)
            self._time_first_step = False

    def validation_step(self, batch, batch_idx):
        loss = self.validation_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["x_1"].shape[0])

    def on_validation_epoch_end(self):
        every = self.cfg.train_args.sample_every_n_epochs
        last = self.current_epoch + 1 >= self.trainer.max_epochs
        if self.trainer.sanity_checking or not ((self.current_epoch + 1) % every == 0 or last):
            return
        metrics = self._sample_grid()
        if metrics:
            self.log_dict(metrics, rank_zero_only=True, sync_dist=False)

    @rank_zero_only
    def _sample_grid(self) -> dict:
        """Sample the first validation masks; write mask | real | generated as PNG and to TensorBoard."""
        ds = self.trainer.datamodule.val_set
        n = min(self.cfg.train_args.num_sample_images, len(ds))
        mask, s = ds.mask[:n], self.cfg.sampling_args
        # the inferer's path: noise of (seed, i), the method's sampler, under sampling_args.precision
        gen01 = generate(self, mask, torch.arange(n), self.cfg.train_args.seed, s.num_steps, s.method,
                         batch_size=n, devices=[str(self.device)], progress=False,
                         classes=ds.classes[:n] if self.class_names else None).images
        real01 = to_unit(ds.x_1[:n])
        scores = sample_scores(gen01, real01)  # volumes scored whole, as evaluate.py scores them
        # volumes: each shown by its three orthogonal mid-slices
        mask01 = mask_to_unit(mask, self.cfg.data_args.num_classes)
        grid = grid_image([display_tiles(x) for x in (mask01, real01, gen01)], row_labels=["mask", "real", "generated"])
        out = Path(self.trainer.default_root_dir) / "samples" / f"epoch{self.current_epoch:04d}.png"
        save_png(grid, out)
        if self.logger is not None and hasattr(self.logger.experiment, "add_image"):
            self.logger.experiment.add_image("samples/mask_real_generated", grid, self.global_step,
                                             dataformats="HW")
        units = {"val/sample_ssim": "SSIM {:.3f}", "val/sample_psnr": "PSNR {:.2f} dB"}
        log.info("epoch %d: sample grid %s (%s on %d validation masks)", self.current_epoch, out,
                 ", ".join(units[k].format(v) for k, v in scores.items()), n)
        return scores

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Under bf16 there is no loss scaler, so the gradients are already true and are clipped here by norm:
        Lightning's MixedPrecision plugin refuses to clip a fused optimizer even then (found on an H200)."""
        if gradient_clip_val and self.trainer.precision == "bf16-mixed" and gradient_clip_algorithm in (None, "norm"):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        t = self.cfg.train_args
        fused = use_fused_adam(next(self.model.parameters()).is_cuda, self.trainer.precision, t.gradient_clip_val)
        log.info("optimizer: Adam, lr %.3g, %s", t.lr, "fused" if fused else "not fused")
        return torch.optim.Adam(self.model.parameters(), lr=t.lr, fused=fused)
