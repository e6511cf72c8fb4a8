"""The training run's sample grid: every ``train_args.sample_every_n_epochs`` (and after the last epoch) the
method makes images for the first validation masks the way inferer.py does; mask | real | generated goes to
``samples/epochNNNN.png`` and TensorBoard, and their SSIM and PSNR to the log (``val/sample_ssim``, ``_psnr``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from utils.evaluation.metrics import psnr_per_image, ssim_per_image
from utils.generation.generate import generate
from utils.images import display_tiles, grid_image, mask_to_unit, save_png, to_unit

log = logging.getLogger(__name__)


class SampleGrid(pl.Callback):
    """Lightning callback of the sample grid, for any :class:`utils.methods.base.SynthesisMethod`."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, module) -> None:
        every = module.cfg.train_args.sample_every_n_epochs
        last = module.current_epoch + 1 >= trainer.max_epochs
        if trainer.sanity_checking or not ((module.current_epoch + 1) % every == 0 or last):
            return
        metrics = sample_grid(trainer, module)
        if metrics:
            module.log_dict(metrics, rank_zero_only=True, sync_dist=False)


@rank_zero_only
def sample_grid(trainer: pl.Trainer, module) -> dict:
    """Sample the first validation masks; write mask | real | generated as PNG and to TensorBoard."""
    ds = trainer.datamodule.val_set
    cfg = module.cfg
    n = min(cfg.train_args.num_sample_images, len(ds))
    mask, s = ds.mask[:n], cfg.sampling_args
    # the inferer's path: noise of (seed, i), the method's sampler, under sampling_args.precision
    gen01 = generate(module, mask, torch.arange(n), cfg.train_args.seed, s.num_steps, s.sampler,
                     batch_size=n, devices=[str(module.device)], progress=False,
                     classes=ds.classes[:n] if module.class_names else None).images
    real01 = to_unit(ds.x_1[:n])
    scores = sample_scores(gen01, real01)  # volumes scored whole, as evaluate.py scores them
    # volumes: each shown by its three orthogonal mid-slices
    mask01 = mask_to_unit(mask, cfg.data_args.num_classes)
    grid = grid_image([display_tiles(x) for x in (mask01, real01, gen01)], row_labels=["mask", "real", "generated"])
    out = Path(trainer.default_root_dir) / "samples" / f"epoch{module.current_epoch:04d}.png"
    save_png(grid, out)
    if module.logger is not None and hasattr(module.logger.experiment, "add_image"):
        module.logger.experiment.add_image("samples/mask_real_generated", grid, module.global_step, dataformats="HW")
    units = {"val/sample_ssim": "SSIM {:.3f}", "val/sample_psnr": "PSNR {:.2f} dB"}
    log.info("epoch %d: sample grid %s (%s on %d validation masks)", module.current_epoch, out,
             ", ".join(units[k].format(v) for k, v in scores.items()), n)
    return scores


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
