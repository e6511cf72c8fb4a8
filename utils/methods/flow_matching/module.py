"""Flow matching from the warm-start prior to images (COMET; MOTFM is alpha = 0 and no contrastive term).

The velocity field is the UNet + ControlNet of :mod:`utils.methods.networks`, conditioned on the mask, the image
class, both or neither (``conditioning_args``); the path and the solver are ``flow_matching``'s; the optional
cosine InfoNCE term on velocities is :mod:`losses.contrastive_flow`. Training may drop conditions (a null mask,
a null class), which classifier-free guidance (``sampling_args.guidance_scale``) then contrasts with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler

from losses.contrastive_flow import contrastive_velocity_loss, contrastive_weight
from utils.config import ConfigError
from utils.images import to_unit
from utils.methods.base import SynthesisMethod
from utils.methods.flow_matching.config import FlowMatchingRunConfig
from utils.methods.flow_matching.contrastive_keys import ContrastiveKeys, valid_keys
from utils.methods.flow_matching.prior import spacing_mismatch, warm_start_prior
from utils.methods.networks import (
    ConditionalVelocityField,
    VelocityAdapter,
    build_model,
    controlnet_parameter_counts,
)
from utils.methods.ode_sampler import NFE_PER_STEP, sample
from utils.seeding import SampleNoise, fixed_times, seeded_generator

log = logging.getLogger(__name__)
# The training stream's extra entropy for condition dropout: its own draws, so t and eps do not change with it.
DROPOUT_STREAM = 1


@dataclass(frozen=True)
class StepDraws:
    """Everything random in one training step, drawn before it from the (seed, rank, epoch, batch) streams,
    so that the step itself (:meth:`FlowMatchingModule.step_loss`) is a pure function of them."""

    t: torch.Tensor  # (B,) ~ U[0, 1)
    eps: torch.Tensor  # N(0, I) like x_1
    labels_kept: torch.Tensor | None = None  # (B, labels) bool: mask / label dropout; None when off
    drop_class: torch.Tensor | None = None  # (B,) bool: class dropout; None when off


def check_prior_spacing(spacing: tuple[float, ...], datamodule) -> None:
    """``prior_args.spacing`` against the voxel spacing of the training volumes as the model sees them (records
    with an affine; a resampled volume has isotropic voxels whatever its file's spacing): a spacing they do not
    have is a ConfigError naming both; anisotropic volumes with no spacing given, a warning."""
    spacings = datamodule.voxel_spacings()
    i = spacing_mismatch(spacing, spacings)
    if i is None:
        return
    have = " x ".join(f"{v:.3g}" for v in spacings[i])
    if spacing:
        raise ConfigError(
            f"prior_args.spacing {list(spacing)} does not match the training volumes of {datamodule.cfg.path}: one "
            f"has {have} mm voxels on the model's grid (volumes of another size are padded to a physical cube and "
            f"resized to image_size^3, which makes their voxels isotropic; utils.data.resample). prior_args.spacing "
            f"is the spacing of the fitted volumes, not of the files: set it to their proportions, or leave it empty "
            f"for isotropic voxels")
    log.warning("training volumes of %s have anisotropic voxels (%s mm) but prior_args.spacing is empty: the prior "
                "blurs every axis by the same number of voxels", datamodule.cfg.path, have)


def from_signed(x: torch.Tensor, image_range: tuple[float, ...]) -> torch.Tensor:
    """Images (or image values) in the data's [-1, 1] to the flow's ``prior_args.image_range`` [lo, hi]."""
    lo, hi = image_range
    return x if (lo, hi) == (-1.0, 1.0) else lo + (x + 1.0) * ((hi - lo) / 2.0)


class FlowMatchingModule(SynthesisMethod):
    """``label_values`` (num_classes,) is enc(label) for the prior; ``class_names`` the data's image classes in
    index order (class-conditional modes only); ``motfm``, only in a checkpoint imported from MOTFM
    (:mod:`utils.motfm`), ``{"time_floor": bool, "image_range": [lo, hi]}``: the network floors t * 999 as MOTFM
    did, on MOTFM's time grid (:func:`utils.methods.ode_sampler.motfm_time_grid`), and its outputs are MOTFM's
    min-max units, image = lo + x (hi - lo) in [0, 1]. All are saved in the checkpoint with the config."""

    def __init__(self, cfg: FlowMatchingRunConfig, label_values: list[float], class_names: list[str] | None = None,
                 motfm: dict | None = None):
        super().__init__(cfg, label_values=label_values, class_names=class_names, motfm=motfm)
        self.model = self.build_network()
        self.register_buffer("label_values", torch.tensor(label_values, dtype=torch.float32), persistent=False)
        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.keep_ema()
        self.keys = ContrastiveKeys(self.cfg.contrastive_args.num_keys)

    def build_network(self) -> ConditionalVelocityField:
        """A new velocity network of this module's config and classes (on the current default device)."""
        cond, motfm = self.cfg.conditioning_args, self.hparams.get("motfm")
        return build_model(self.cfg.model_args, self.cfg.data_args.num_classes, cond,
                           len(self.hparams.get("class_names") or ()) if cond.uses_class else 0,
                           time_floor=bool(motfm and motfm["time_floor"]))

    @classmethod
    def for_data(cls, cfg: FlowMatchingRunConfig, datamodule) -> FlowMatchingModule:
        p = cfg.prior_args
        label_values = datamodule.label_values(p.mask_encoding)
        if p.mask_encoding != "unit_labels":  # values in [-1, 1] image units, to the flow's image range
            label_values = [round(float(v), 6) for v in from_signed(torch.tensor(label_values), p.image_range)]
        if p.alpha > 0:
            check_prior_spacing(p.spacing, datamodule)
        return cls(cfg, label_values, datamodule.class_names() if cfg.conditioning_args.uses_class else None)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.get("class_names") or ()) if self.cfg.conditioning_args.uses_class else []

    def describe(self) -> str:
        p, c, k = self.cfg.prior_args, self.cfg.contrastive_args, self.cfg.conditioning_args
        classes = f" {len(self.class_names)} classes {self.class_names}," if self.class_names else ""
        return (f"flow matching; conditioning: {k.mode},{classes} mask input {k.mask_input}, dropout mask "
                f"{k.mask_dropout:g} / label {k.label_dropout:g} / class {k.class_dropout:g}; prior: alpha "
                f"{p.alpha:.3g}, enc(mask) = {p.mask_encoding} {self.hparams.label_values}, images in "
                f"{list(p.image_range)}, blur padding {p.padding}; contrastive: weight "
                f"{c.weight:.3g} from epoch {c.warmup_epochs}, target {c.target}, {c.num_keys} keys"
                f"{', same-patient keys excluded' if c.exclude_same_patient else ''}")

    def parameter_counts(self) -> dict[str, int]:
        return controlnet_parameter_counts(self.model)

    def compilable_network(self) -> torch.nn.Module:
        return self.model

    # --- the method -------------------------------------------------------------------------------
    def prior(self, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        p = self.cfg.prior_args
        return warm_start_prior(mask, eps, p.alpha, p.kernel_size, p.sigma, self.label_values, p.padding, p.spacing)

    def sampling_adapter(self) -> VelocityAdapter:
        return VelocityAdapter(self.sampling_network(), self.cfg.sampling_args.guidance_scale, self.null_conditions)

    def conditions(self, mask: torch.Tensor, classes: torch.Tensor | None) -> dict:
        """The network's condition keywords: the mask (the prior needs it whatever the mode) and, for a
        class-conditional network, ``classes`` (B,) int64."""
        if not self.class_names:
            return {"mask": mask}
        if classes is None or bool((classes < 0).any()) or bool((classes >= len(self.class_names)).any()):
            raise ValueError(f"this model is conditioned on the image class: every sample needs a class in "
                             f"0..{len(self.class_names) - 1} ({', '.join(self.class_names)})")
        return {"mask": mask, "classes": classes}

    def null_conditions(self, conditions: dict) -> dict:
        """``conditions`` without what training dropped (guidance's v_u): the all-zero null mask when
        ``mask_dropout`` > 0, the null class (-1, a zero context) when ``class_dropout`` > 0."""
        c, out, mask = self.cfg.conditioning_args, dict(conditions), conditions["mask"]
        if c.mask_dropout > 0:
            out["labels_kept"] = torch.zeros(len(mask), self.cfg.data_args.num_classes, dtype=torch.bool,
                                             device=mask.device)
        if c.class_dropout > 0:
            out["classes"] = torch.full_like(conditions["classes"], -1)
        return out

    def dropout_draws(self, b: int, device: torch.device, batch_idx: int) -> tuple:
        """Training's condition dropout for ``b`` samples, drawn from this (seed, rank, epoch, batch)'s own
        stream: (labels_kept (B, labels) bool, drop_class (B,) bool), each None when its dropout is off. Per
        sample, the whole mask goes with probability ``mask_dropout``, each label but the background with
        ``label_dropout``, the class with ``class_dropout``."""
        c = self.cfg.conditioning_args
        if not (c.mask_dropout or c.label_dropout or c.class_dropout):
            return None, None
        t = self.cfg.train_args
        g = seeded_generator([t.seed, self.global_rank, self.current_epoch, batch_idx, DROPOUT_STREAM], device)
        keep_label = torch.rand(b, self.cfg.data_args.num_classes, generator=g, device=device) >= c.label_dropout
        keep_label[:, 0] = True  # the background is not an anatomy
        keep_mask = torch.rand(b, 1, generator=g, device=device) >= c.mask_dropout
        drop_class = torch.rand(b, generator=g, device=device) < c.class_dropout
        return (keep_label & keep_mask if c.mask_dropout or c.label_dropout else None,
                drop_class if c.class_dropout else None)

    @staticmethod
    def dropped_conditions(conditions: dict, draws: StepDraws) -> dict:
        """``conditions`` after the condition dropout in ``draws`` (themselves, when there is none)."""
        if draws.labels_kept is None and draws.drop_class is None:
            return conditions
        out = dict(conditions)
        if draws.labels_kept is not None:
            out["labels_kept"] = draws.labels_kept
        if draws.drop_class is not None:
            out["classes"] = torch.where(draws.drop_class, -1, conditions["classes"])
        return out

    def flow_matching_loss(self, network, x_1, mask, eps, t, conditions: dict | None = None):
        """MSE of ``network``'s velocity at x_t; ``conditions`` (default: the mask alone) go to the network, the
        prior is always drawn from ``mask``."""
        x_0 = self.prior(mask, eps)
        ps = self.path.sample(x_0=x_0, x_1=x_1, t=t)
        v = network(ps.x_t, t, **(conditions or {"mask": mask}))
        return F.mse_loss(v.float(), ps.dx_t.float()), v, x_0, ps

    def training_draws(self, x_1: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) ~ U[0, 1) and eps ~ N(0, I) like x_1, from this (seed, rank, epoch, batch)'s stream."""
        g = self.training_generator(batch_idx, x_1.device)
        t = torch.rand(x_1.shape[0], generator=g, device=x_1.device)
        return t, torch.randn(x_1.shape, generator=g, device=x_1.device, dtype=x_1.dtype)

    def step_draws(self, x_1: torch.Tensor, batch_idx: int) -> StepDraws:
        """Everything random in the training step on ``x_1``, drawn before the step."""
        t, eps = self.training_draws(x_1, batch_idx)
        return StepDraws(t, eps, *self.dropout_draws(len(x_1), x_1.device, batch_idx))

    def step_loss(self, batch: dict, draws: StepDraws) -> tuple[torch.Tensor, dict]:
        """The training loss and its logs: a function of the batch, ``draws``, the weights, the epoch (the
        contrastive weight) and the key bank, which it updates in place; no random draw of its own, and the
        batch's shapes throughout (the key set is ``num_keys`` rows from the first step), as a CUDA graph
        capture needs."""
        x_1, mask = from_signed(batch["x_1"], self.cfg.prior_args.image_range), batch["mask"]
        conditions = self.dropped_conditions(self.conditions(mask, batch.get("class")), draws)
        fm, v, x_0, ps = self.flow_matching_loss(self.model, x_1, mask, draws.eps, draws.t, conditions)
        c = self.cfg.contrastive_args
        weight = contrastive_weight(c.weight, c.warmup_epochs, self.current_epoch)
        logs = {"train/fm_loss": fm, "train/nce_weight": weight}
        if weight == 0:
            return fm, logs
        keys = self.keys(x_0, x_1, batch["patient"])
        valid = keys.filled.expand(len(x_1), -1)
        if c.exclude_same_patient:
            valid = valid & valid_keys(batch["patient"], keys.patient)
        out = contrastive_velocity_loss(c.target, v, x_0, ps.x_t, draws.t, keys.x_0, keys.x_1, keys.positive,
                                        c.temperature, valid)
        logs.update({"train/nce_loss": out.loss, "train/nce_pos_cos": out.pos_cos,
                     "train/nce_neg_cos": out.neg_cos, "train/nce_keys": float(out.num_keys),
                     "train/nce_valid_keys": out.valid_keys, "train/nce_chance": out.chance})
        return fm + weight * out.loss, logs

    def training_step(self, batch, batch_idx):
        loss, logs = self.step_loss(batch, self.step_draws(batch["x_1"], batch_idx))
        logs["train/loss"] = loss
        b = batch["x_1"].shape[0]
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=b)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=b)
        return loss

    def validation_loss(self, batch: dict) -> torch.Tensor:
        """The flow-matching MSE at fixed (t, eps) per validation image, with the weights that make images."""
        x_1, mask, index = from_signed(batch["x_1"], self.cfg.prior_args.image_range), batch["mask"], batch["index"]
        eps = self.validation_noise(batch)
        fm, *_ = self.flow_matching_loss(self.sampling_network(), x_1, mask, eps, fixed_times(index).to(x_1.device),
                                         self.conditions(mask, batch.get("class")))
        return fm

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str,
                 classes: torch.Tensor | None = None) -> torch.Tensor:
        conditions = self.conditions(mask, classes)
        x_0 = self.prior(mask, noise.initial())
        motfm = self.hparams.get("motfm")  # MOTFM's floored time: on MOTFM's own grid
        x_1 = sample(self.sampling_adapter(), x_0, mask, num_steps, sampler, classes=conditions.get("classes"),
                     motfm_grid=bool(motfm and motfm["time_floor"]))
        if motfm:  # MOTFM's min-max units mapped back to the dataset's [0, 1]
            lo, hi = self.hparams["motfm"]["image_range"]
            return (lo + x_1.float() * (hi - lo)).clamp(0.0, 1.0)
        return to_unit(x_1, self.cfg.prior_args.image_range)

    def nfe(self, num_steps: int, sampler: str) -> int:
        """Network evaluations per image: the sampler's per step, twice with guidance (w != 1)."""
        return num_steps * NFE_PER_STEP[sampler] * (1 if self.cfg.sampling_args.guidance_scale == 1.0 else 2)

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
