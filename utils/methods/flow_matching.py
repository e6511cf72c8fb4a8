"""Flow matching from the warm-start prior to images (COMET; MOTFM is alpha = 0 and no contrastive term).

The velocity field is the UNet + ControlNet of :mod:`utils.methods.networks`; the path and the solver are
``flow_matching``'s; the optional cosine InfoNCE term on velocities is :mod:`losses.contrastive_flow`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler

from losses.contrastive_flow import contrastive_velocity_loss, contrastive_weight
from utils.config import NFE_PER_STEP
from utils.images import to_unit
from utils.methods.base import SynthesisMethod
from utils.methods.contrastive_keys import ContrastiveKeys, valid_keys
from utils.methods.networks import VelocityAdapter, build_model, compile_blocks, controlnet_parameter_counts
from utils.methods.ode_sampler import sample
from utils.methods.prior import warm_start_prior
from utils.seeding import SampleNoise, fixed_times

log = logging.getLogger(__name__)


class FlowMatchingModule(SynthesisMethod):
    """``label_values`` (num_classes,) is enc(label) for the prior; it is saved in the checkpoint with the config."""

    def __init__(self, config: dict, label_values: list[float]):
        super().__init__(config)
        self.save_hyperparameters()
        self.model = build_model(self.cfg.model_args, self.cfg.data_args.num_classes)
        self.register_buffer("label_values", torch.tensor(label_values, dtype=torch.float32), persistent=False)
        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.keep_ema()
        self.keys = ContrastiveKeys(self.cfg.contrastive_args.num_keys)

    @classmethod
    def for_data(cls, config: dict, datamodule) -> FlowMatchingModule:
        return cls(config, datamodule.label_values(config["prior_args"]["mask_encoding"]))

    def describe(self) -> str:
        p, c = self.cfg.prior_args, self.cfg.contrastive_args
        return (f"flow matching; prior: alpha {p.alpha:.3g}, enc(mask) = {p.mask_encoding} "
                f"{self.hparams.label_values}; contrastive: weight {c.weight:.3g} from epoch {c.warmup_epochs}, "
                f"target {c.target}, {c.num_keys} keys")

    def parameter_counts(self) -> dict[str, int]:
        return controlnet_parameter_counts(self.model)

    def compile_blocks(self) -> int:
        return compile_blocks(self.model)

    # --- the method -------------------------------------------------------------------------------
    def prior(self, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        p = self.cfg.prior_args
        return warm_start_prior(mask, eps, p.alpha, p.kernel_size, p.sigma, self.label_values, p.padding)

    def sampling_adapter(self) -> VelocityAdapter:
        return VelocityAdapter(self.sampling_network())

    def flow_matching_loss(self, network, x_1, mask, eps, t):
        x_0 = self.prior(mask, eps)
        ps = self.path.sample(x_0=x_0, x_1=x_1, t=t)
        v = network(ps.x_t, t, mask)
        return F.mse_loss(v.float(), ps.dx_t.float()), v, x_0, ps

    def training_draws(self, x_1: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) ~ U[0, 1) and eps ~ N(0, I) like x_1, from this (seed, rank, epoch, batch)'s stream."""
        g = self.training_generator(batch_idx, x_1.device)
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

    def validation_loss(self, batch: dict) -> torch.Tensor:
        """The flow-matching MSE at fixed (t, eps) per validation image, with the weights that make images."""
        x_1, mask, index = batch["x_1"], batch["mask"], batch["index"]
        eps = self.validation_noise(batch)
        fm, *_ = self.flow_matching_loss(self.sampling_network(), x_1, mask, eps, fixed_times(index).to(x_1.device))
        return fm

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str) -> torch.Tensor:
        x_0 = self.prior(mask, noise.initial())
        return to_unit(sample(self.sampling_adapter(), x_0, mask, num_steps, sampler))

    def nfe(self, num_steps: int, sampler: str) -> int:
        return num_steps * NFE_PER_STEP[sampler]

    # --- training state beyond the weights ----------------------------------------------------------
    def on_train_start(self):
        c = self.cfg.contrastive_args
        if not (c.weight > 0 and c.exclude_same_patient and self.global_rank == 0):
            return
        patient = self.trainer.datamodule.train_set.patient
        missing = int((patient < 0).sum())
        if missing:
            log.warning("%d of %d training images have no patient id (MOTFM pickles and PNG folders carry none): "
                        "contrastive_args.exclude_same_patient cannot keep their other images out of the "
                        "negatives", missing, len(patient))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["contrastive_keys"] = self.keys.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.keys.load_state_dict(checkpoint.get("contrastive_keys", {}))
