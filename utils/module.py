"""The LightningModule: glue between the data, the velocity field, the prior, the losses and the sampler."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
from pytorch_lightning.utilities import rank_zero_only
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from losses.contrastive_flow import contrastive_velocity_loss, contrastive_weight
from utils.config import config_from_dict
from utils.contrastive_keys import ContrastiveKeys, valid_keys
from utils.generation import generate
from utils.images import grid_image, mask_to_unit, save_png, to_unit
from utils.metrics import psnr_per_image, ssim_per_image
from utils.model import VelocityAdapter, build_model, compile_blocks
from utils.prior import noise_for_indices, seeded_generator, warm_start_prior

log = logging.getLogger(__name__)

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def use_fused_adam(on_cuda: bool, precision: str, gradient_clip_val: float) -> bool:
    """Fused Adam (one kernel for all parameters) on CUDA, except for fp16 with clipping: there Lightning's
    GradScaler must unscale before clipping, which an optimizer that unscales inside its step prevents."""
    return on_cuda and not (precision == "16-mixed" and gradient_clip_val > 0)


def fixed_times(index: torch.Tensor) -> torch.Tensor:
    """A fixed t in [0, 1) per validation sample (golden-ratio sequence), so val/loss is comparable."""
    return torch.remainder(index.double() * GOLDEN + 0.5 * GOLDEN, 1.0).float()


class COMETModule(pl.LightningModule):
    """Flow matching from the warm-start prior to images, with the optional contrastive velocity term.

    ``config`` is the plain-dict form of :class:`utils.config.Config`; ``label_values`` (num_classes,)
    is enc(label) for the prior. Both are saved in the checkpoint, which alone rebuilds the model.
    """

    def __init__(self, config: dict, label_values: list[float]):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config, "checkpoint config")
        self.model = build_model(self.cfg.model_args, self.cfg.data_args.num_classes)
        self.register_buffer("label_values", torch.tensor(label_values, dtype=torch.float32), persistent=False)
        self.path = AffineProbPath(scheduler=CondOTScheduler())
        decay = self.cfg.train_args.ema_decay
        self.ema = None
        if decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay))
            self.ema.requires_grad_(False)  # updated by hand; DDP must not wait for its gradients
        self._ema_step = -1
        self.keys = ContrastiveKeys(self.cfg.contrastive_args.num_keys)
        self._compiled_blocks = 0
        self._time_first_step = False  # log the first step's wall time (it includes the compilation)
        self._first_step_clock = 0.0

    def configure_model(self):
        """Regional compilation when ``train_args.compile`` is "blocks" (training only; called by the Trainer)."""
        if self.cfg.train_args.compile == "blocks" and not self._compiled_blocks:
            self._compiled_blocks = compile_blocks(self.model)
            self._time_first_step = True
            log.info("torch.compile on %d UNet/ControlNet blocks: the first training step compiles them",
                     self._compiled_blocks)

    # --- the method -------------------------------------------------------------------------------
    def prior(self, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        p = self.cfg.prior_args
        return warm_start_prior(mask, eps, p.alpha, p.kernel_size, p.sigma, self.label_values)

    def sampling_network(self) -> torch.nn.Module:
        """The weights images are made with: the EMA weights when kept, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def sampling_adapter(self) -> VelocityAdapter:
        return VelocityAdapter(self.sampling_network())

    def flow_matching_loss(self, network, x_1, mask, eps, t):
        x_0 = self.prior(mask, eps)
        ps = self.path.sample(x_0=x_0, x_1=x_1, t=t)
        v = network(ps.x_t, t, mask)
        return F.mse_loss(v.float(), ps.dx_t.float()), v, x_0, ps

    def training_draws(self, x_1: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) ~ U[0, 1) and eps ~ N(0, I) like x_1, from a stream of (seed, global rank, epoch, batch).

        Every DDP rank draws its own t and noise (``seed_everything`` alone gives all ranks one stream), and
        a resumed run draws what the uninterrupted run would have drawn at the same epoch and batch.
        """
        g = seeded_generator([self.cfg.train_args.seed, self.global_rank, self.current_epoch, batch_idx],
                             x_1.device)
        t = torch.rand(x_1.shape[0], generator=g, device=x_1.device)
        return t, torch.randn(x_1.shape, generator=g, device=x_1.device, dtype=x_1.dtype)

    def training_step(self, batch, batch_idx):
        x_1, mask = batch["x_1"], batch["mask"]
        t, eps = self.training_draws(x_1, batch_idx)
        fm, v, x_0, ps = self.flow_matching_loss(self.model, x_1, mask, eps, t)
        c = self.cfg.contrastive_args
        weight = contrastive_weight(c.weight, c.warmup_epochs, self.current_epoch)
        loss = fm
        logs = {"train/fm_loss": fm, "train/nce_weight": weight}
        if weight > 0:
            keys = self.keys(x_0, x_1, batch["patient"])
            valid = valid_keys(batch["patient"], keys.patient) if c.exclude_same_patient else None
            out = contrastive_velocity_loss(c.target, v, x_0, ps.x_t, t, keys.x_0, keys.x_1, keys.positive,
                                            c.temperature, valid)
            loss = fm + weight * out.loss
            logs.update({"train/nce_loss": out.loss, "train/nce_pos_cos": out.pos_cos,
                         "train/nce_neg_cos": out.neg_cos, "train/nce_keys": float(out.num_keys),
                         "train/nce_valid_keys": out.valid_keys, "train/nce_chance": out.chance})
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=x_1.shape[0])
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=x_1.shape[0])
        return loss

    def on_train_start(self):
        c, patient = self.cfg.contrastive_args, self.trainer.datamodule.train_set.patient
        missing = int((patient < 0).sum())
        if c.weight > 0 and c.exclude_same_patient and missing and self.global_rank == 0:
            log.warning("%d of %d training images have no patient id (MOTFM pickles and PNG folders carry none): "
                        "contrastive_args.exclude_same_patient cannot keep their other images out of the "
                        "negatives", missing, len(patient))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["contrastive_keys"] = self.keys.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.keys.load_state_dict(checkpoint.get("contrastive_keys", {}))

    def on_train_batch_start(self, batch, batch_idx):
        if self._time_first_step:
            self._first_step_clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None and self.global_step != self._ema_step:  # once per optimizer step
            self.ema.update_parameters(self.model)
            self._ema_step = self.global_step
        if self._time_first_step:
            if batch["x_1"].is_cuda:
                torch.cuda.synchronize()
            log.info("first training step took %.1f s (it compiled the %d blocks; inductor caches the kernels)",
                     time.perf_counter() - self._first_step_clock, self._compiled_blocks)
            self._time_first_step = False

    def validation_step(self, batch, batch_idx):
        x_1, mask, index = batch["x_1"], batch["mask"], batch["index"]
        eps = noise_for_indices(index.cpu(), tuple(x_1.shape[1:]), self.cfg.train_args.seed).to(x_1)
        # with the weights that will make the images (EMA when kept), so the best checkpoint is chosen by them
        fm, *_ = self.flow_matching_loss(self.sampling_network(), x_1, mask, eps, fixed_times(index).to(x_1.device))
        self.log("val/loss", fm, prog_bar=True, sync_dist=True, batch_size=x_1.shape[0])

    # --- what a person looks at ---------------------------------------------------------------------
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
        # the inferer's path: noise of (seed, i), the prior, the sampler, under sampling_args.precision
        gen01 = generate(self, mask, torch.arange(n), self.cfg.train_args.seed, s.num_steps, s.method,
                         batch_size=n, devices=[str(self.device)], progress=False).images
        real01 = to_unit(ds.x_1[:n])
        grid = grid_image([mask_to_unit(mask, self.cfg.data_args.num_classes), real01, gen01])
        out = Path(self.trainer.default_root_dir) / "samples" / f"epoch{self.current_epoch:04d}.png"
        save_png(grid, out)
        if self.logger is not None and hasattr(self.logger.experiment, "add_image"):
            self.logger.experiment.add_image("samples/mask_real_generated", grid, self.global_step,
                                             dataformats="HW")
        ssim, psnr = ssim_per_image(gen01, real01).mean(), psnr_per_image(gen01, real01).mean()  # evaluate.py's
        log.info("epoch %d: sample grid %s (SSIM %.3f, PSNR %.2f dB on %d validation masks)",
                 self.current_epoch, out, ssim, psnr, n)
        return {"val/sample_ssim": float(ssim), "val/sample_psnr": float(psnr)}

    def configure_optimizers(self):
        t = self.cfg.train_args
        fused = use_fused_adam(next(self.model.parameters()).is_cuda, self.trainer.precision, t.gradient_clip_val)
        log.info("optimizer: Adam, lr %.3g, %s", t.lr, "fused" if fused else "not fused")
        return torch.optim.Adam(self.model.parameters(), lr=t.lr, fused=fused)
