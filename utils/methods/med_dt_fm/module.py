"""Med-DT-FM (the draft paper the project was specified from; README "Methods"): flow matching with a bridged
decoder distilled towards a frozen segmentation encoder, plus a small adversarial term.

Stage 0 (:meth:`MedDTFMModule.for_data`): a U-KAN segmenter is trained on the training split only, scored on the
validation split (below ``ukan_args.min_val_dice`` the run stops), frozen, and its encoder's per-channel
feature statistics over the training split are measured; weights and statistics live in this module's state
dict, so the checkpoint alone rebuilds everything. With several processes only rank 0 trains it: DDP
broadcasts rank 0's parameters and buffers, the segmenter's included, when it wraps the module.

Stage 1 (:meth:`MedDTFMModule.losses`), per batch, with x_0 ~ N(0, I), t ~ U[0, 1), x_t = t x_1 + (1 - t) x_0:

    L_G = mse(v, x_1 - x_0) + sum_i lambda_i mse(P_i(B_i), Ebar_i(x_1)) + w(epoch) * (-D(x1_hat, mask))
    L_D = hinge(D(x_1, mask), D(x1_hat.detach(), mask))

(the D terms over the samples with t >= t_adv_min only)

with (v, B_i) from :class:`utils.methods.med_dt_fm.bridged.BridgedVelocityField`, Ebar_i the standardised encoder
features of the clean image x_1 (float32, no gradient), x1_hat = ``path.velocity_to_target(v, x_t, t)``. The
draft's objective has no L_FM (then nothing trains a velocity field); it is added here. G and D are stepped by
:class:`utils.methods.adversarial.AdversarialMethod` (manual optimisation, accumulation and clipping in the
module, EMA and max_steps in generator steps).

Generation: noise-based (the framework's ODE from x_0 = noise, ``generate``), or reference-guided
(:meth:`MedDTFMModule.generate_from_reference`): start on the straight path at t0 towards the reference,
x_t0 = t0 I_ref + (1 - t0) x_0, and integrate from t0 to 1 under the target mask.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
from pytorch_lightning.strategies import ParallelStrategy

from losses.distillation import distillation_loss, standardise
from utils.distributed import launch_rank
from utils.images import to_unit
from utils.methods.adversarial import AdversarialMethod, Losses, PatchDiscriminator, one_hot
from utils.methods.base import MethodSetupError
from utils.methods.med_dt_fm.bridged import BridgedVelocityField, ProjectionHeads, bridge_channels
from utils.methods.med_dt_fm.config import MedDTFMRunConfig
from utils.methods.med_dt_fm.ukan_training import build_ukan, encoder_statistics, foreground_dice, predict, train_ukan
from utils.methods.networks import VelocityAdapter, count_parameters
from utils.methods.ode_sampler import NFE_PER_STEP, reference_steps, sample
from utils.seeding import SampleNoise, fixed_times

log = logging.getLogger(__name__)


class FeatureGuidedAdapter(VelocityAdapter):
    """The solver's adapter with feature guidance (see :meth:`MedDTFMModule.generate_from_reference`). Sampling runs
    under ``torch.inference_mode``; the gradient is taken on copies of the inputs outside it. The projection heads
    are the trained ones (there is no EMA of them), also when the velocity field is the EMA's."""

    def __init__(self, model, heads: ProjectionHeads, targets: dict[int, torch.Tensor], weights, scale: float):
        super().__init__(model)
        self.heads, self.targets, self.weights, self.scale = heads, targets, weights, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extras) -> torch.Tensor:
        self.nfe += 1
        with torch.inference_mode(False), torch.enable_grad():
            x_t = x.clone().requires_grad_(True)
            t = t.clone().to(x.dtype).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.clone()
            v, features = self.model.velocity_and_features(self.network_input(x_t), t, extras["mask"].clone())
            targets = {i: target.clone() for i, target in self.targets.items()}
            with torch.autocast(device_type=x.device.type, enabled=False):
                projections = self.heads([f.float() for f in features], {i: p.shape[-2:] for i, p in targets.items()})
                # per-sample sums, so each sample's gradient is its own
                distance = sum(self.weights[i] * (projections[i] - targets[i]).square().flatten(1).mean(1).sum()
                               for i in targets)
            grad = torch.autograd.grad(distance, x_t)[0]
            v = v.detach().to(x.dtype)
        return v - self.scale * per_sample_norm(v) * grad / per_sample_norm(grad)


def per_sample_norm(z: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, 1, 1, 1): the L2 norm of each sample (at least 1e-12)."""
    return z.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def adversarial_weight(alpha: float, start: int, ramp: int, now: int) -> float:
    """w(now): 0 before ``start``, then alpha * (now - start + 1) / ramp up to alpha, all in one unit (epochs, or
    generator steps); a function of the counter only, so it survives resume."""
    if alpha == 0 or now < start:
        return 0.0
    return alpha * min(1.0, (now - start + 1) / ramp)


class MedDTFMModule(AdversarialMethod):
    def __init__(self, cfg: MedDTFMRunConfig):
        super().__init__(cfg)
        m, d = self.cfg.med_dt_fm_args, self.cfg.data_args
        self.model = BridgedVelocityField(self.cfg.model_args, d.num_classes, m.cond_channels, m.use_controlnet)
        self.encoder = build_ukan(self.cfg.ukan_args, d.num_classes).eval().requires_grad_(False)
        self.heads = ProjectionHeads(bridge_channels(self.cfg.model_args.channels),
                                     [self.encoder.channels[level - 1] for level in m.levels])
        self.discriminator = PatchDiscriminator(1 + d.num_classes, m.d_channels, m.d_num_layers)
        for stage in sorted(set(m.levels)):  # the standardisation of E_stage, measured after stage 0
            c = self.encoder.channels[stage - 1]
            self.register_buffer(f"feature_mean_{stage}", torch.zeros(c))
            self.register_buffer(f"feature_std_{stage}", torch.ones(c))
        self.register_buffer("segmenter_val_dice", torch.tensor(float("nan")))
        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.keep_ema()

    # --- stage 0 ------------------------------------------------------------------------------------
    @classmethod
    def for_data(cls, cfg: MedDTFMRunConfig, datamodule) -> MedDTFMModule:
        """The module to train: stage 0 runs now, unless the run resumes (its checkpoint holds the segmenter)."""
        module = cls(cfg)
        if not any(module.cfg.med_dt_fm_args.lambdas):
            log.info("stage 0 skipped: med_dt_fm_args.lambdas are all 0, so nothing reads the segmenter's features")
            return module
        if (module.cfg.run_dir / "last.ckpt").is_file():
            log.info("stage 0 skipped: the run resumes from %s, which holds the segmenter and its feature "
                     "statistics", module.cfg.run_dir / "last.ckpt")
            return module
        if launch_rank() != 0:
            log.info("stage 0 runs on rank 0 only: this rank's segmenter and feature statistics come from rank 0 "
                     "when DDP broadcasts the module's state at the start of training")
            return module
        module.pretrain_segmenter(datamodule.train_set, datamodule.val_set)
        return module

    def pretrain_segmenter(self, train_set, val_set, progress: bool = True) -> float:
        """Train U-KAN on ``train_set`` (x_1, mask), score it on ``val_set``, freeze it into this module with its
        training-split feature statistics; returns the validation foreground Dice."""
        u, k = self.cfg.ukan_args, self.cfg.data_args.num_classes
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        log.info("stage 0: U-KAN (%s, widths %s) on %d training images, %d steps of %d", u.kind, list(u.widths),
                 len(train_set.x_1), u.steps, u.batch_size)
        net = train_ukan(train_set.x_1, train_set.mask, u, k, device, progress)
        dice = foreground_dice(predict(net, val_set.x_1), val_set.mask.long(), k)
        log.info("stage 0: segmenter validation foreground Dice %.4f (%d images; threshold %.2f)", dice,
                 len(val_set.x_1), u.min_val_dice)
        if dice < u.min_val_dice:
            raise MethodSetupError(
                f"stage 0: the U-KAN segmenter reached a validation foreground Dice of {dice:.4f}, below "
                f"ukan_args.min_val_dice ({u.min_val_dice}): its features would be poor distillation targets. "
                "Train it longer (ukan_args.steps), or lower ukan_args.min_val_dice deliberately")
        self.encoder.load_state_dict(net.state_dict())
        for stage, (mean, std) in encoder_statistics(net, train_set.x_1, list(self.cfg.med_dt_fm_args.levels)).items():
            getattr(self, f"feature_mean_{stage}").copy_(mean)
            getattr(self, f"feature_std_{stage}").copy_(std)
        self.segmenter_val_dice.fill_(dice)
        return dice

    def train(self, mode: bool = True):
        """The frozen segmenter stays in eval mode (its batch-norm statistics never move)."""
        super().train(mode)
        self.encoder.eval()
        return self

    # --- the interface ------------------------------------------------------------------------------
    def describe(self) -> str:
        m, u = self.cfg.med_dt_fm_args, self.cfg.ukan_args
        control = "with" if m.use_controlnet else "without (the bridges alone carry the mask)"
        return (f"Med-DT-FM {control} the ControlNet: bridges with mask pyramid ({m.cond_channels} ch); "
                f"distillation lambdas "
                f"{list(m.lambdas)} to U-KAN stages {list(m.levels)} ({u.kind}, widths {list(u.widths)}, "
                f"validation Dice {float(self.segmenter_val_dice):.4f}); adversarial alpha {m.alpha:.3g} for "
                f"t >= {m.t_adv_min} from epoch {self.adversarial_start_epoch()} (ramp {m.adv_ramp_epochs}); "
                f"Adam G {m.lr_g:.3g} D {m.lr_d:.3g} betas {list(m.betas)}")

    def parameter_counts(self) -> dict[str, int]:
        net = self.model
        return {"UNet": count_parameters(net.unet),
                **({} if net.controlnet is None else {"ControlNet": count_parameters(net.controlnet)}),
                "bridges + mask pyramid": count_parameters(net.bridges) + count_parameters(net.cond),
                "projection heads": count_parameters(self.heads),
                "discriminator": count_parameters(self.discriminator),
                "U-KAN (frozen)": count_parameters(self.encoder)}

    def adam_settings(self):
        m = self.cfg.med_dt_fm_args
        return m.lr_g, m.lr_d, tuple(m.betas)

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters()) + list(self.heads.parameters())

    def compilable_network(self) -> torch.nn.Module:
        return self.model

    def adversarial_start_epoch(self) -> int:
        return math.ceil(self.cfg.med_dt_fm_args.adv_start_fraction * self.cfg.train_args.max_epochs)

    def adversarial_schedule(self) -> tuple[int, int, int]:
        """(now, start, ramp) of :func:`adversarial_weight` in the unit of the budget that ends the run: epochs,
        or generator steps when ``train_args.max_steps`` ends it before ``max_epochs`` (the term then starts
        after ``adv_start_fraction`` of max_steps and ramps over ``adv_ramp_epochs`` epochs' worth of steps;
        counted in epochs such a run would never reach it)."""
        m, t = self.cfg.med_dt_fm_args, self.cfg.train_args
        by_epochs = self.current_epoch, self.adversarial_start_epoch(), m.adv_ramp_epochs
        if t.max_steps == -1 or self._trainer is None:
            return by_epochs
        per_epoch = math.ceil(self.trainer.num_training_batches / self.accumulate_grad_batches)
        if t.max_steps >= t.max_epochs * per_epoch:
            return by_epochs
        return (self.generator_steps(), math.ceil(m.adv_start_fraction * t.max_steps),
                m.adv_ramp_epochs * per_epoch)

    # --- stage 1 ------------------------------------------------------------------------------------
    def training_draws(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) ~ U[0, 1) and x_0 ~ N(0, I) like x_1, from this (seed, rank, epoch, batch)'s stream."""
        x_1 = batch["x_1"]
        g = self.training_generator(batch_idx, x_1.device)
        t = torch.rand(x_1.shape[0], generator=g, device=x_1.device)
        return t, torch.randn(x_1.shape, generator=g, device=x_1.device, dtype=x_1.dtype)

    @torch.no_grad()
    def distillation_targets(self, x_1: torch.Tensor, which: list[int]) -> dict[int, torch.Tensor]:
        """{i: Ebar_i(x_1)} for the bridges ``which``: standardised frozen-encoder features of the clean image, fp32."""
        levels = self.cfg.med_dt_fm_args.levels
        with torch.autocast(device_type=x_1.device.type, enabled=False):
            maps = self.encoder.encode(x_1.float(), stages=max(levels[i] for i in which))
            return {i: standardise(maps[levels[i] - 1], getattr(self, f"feature_mean_{levels[i]}"),
                                   getattr(self, f"feature_std_{levels[i]}")) for i in which}

    def losses(self, batch: dict, batch_idx: int) -> Losses:
        m, x_1, mask = self.cfg.med_dt_fm_args, batch["x_1"], batch["mask"]
        t, x_0 = self.training_draws(batch, batch_idx)
        ps = self.path.sample(x_0=x_0, x_1=x_1, t=t)
        v, features = self.model.velocity_and_features(ps.x_t, t, mask)
        fm = F.mse_loss(v.float(), ps.dx_t.float())
        generator, logs = fm, {"train/fm_loss": fm}
        ddp = isinstance(self.trainer.strategy, ParallelStrategy) if self._trainer is not None else False
        which = [i for i, w in enumerate(m.lambdas) if w > 0]
        if which:
            targets = self.distillation_targets(x_1, which)
            with torch.autocast(device_type=x_1.device.type, enabled=False):
                projections = self.heads([f.float() for f in features], {i: e.shape[-2:] for i, e in targets.items()})
            dt, terms = distillation_loss(projections, targets, m.lambdas)
            generator = generator + dt
            logs.update({"train/dt_loss": dt, **{f"train/dt_level{i}": term for i, term in terms.items()}})
        if ddp and len(which) < 4:  # DDP expects a gradient for every trained parameter
            generator = generator + 0.0 * sum(p.sum() for p in self.heads.parameters())
        now, start, ramp = self.adversarial_schedule()
        weight = adversarial_weight(m.alpha, start, ramp, now)
        discriminator = x_1.new_zeros((), dtype=torch.float32)
        selected = t >= m.t_adv_min
        logs["train/adv_weight"] = torch.tensor(weight)
        if weight > 0 and bool(selected.any()):
            x1_hat = self.path.velocity_to_target(v, ps.x_t, t.view(-1, 1, 1, 1))
            cond = one_hot(mask, self.cfg.data_args.num_classes).to(x_1.dtype)
            adv = self.adversarial_terms(x_1[selected], x1_hat[selected], cond[selected])
            generator = generator + weight * adv.generator
            discriminator = adv.discriminator
            logs.update(adv.logs, **{"train/g_adv": adv.generator})
        elif ddp:
            discriminator = discriminator + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
        logs["train/loss"] = generator
        return Losses(generator, discriminator, {k: v.detach() for k, v in logs.items()})

    def validation_loss(self, batch: dict) -> torch.Tensor:
        """The flow-matching MSE at fixed (t, x_0) per validation image, with the weights that make images."""
        x_1, mask = batch["x_1"], batch["mask"]
        t = fixed_times(batch["index"]).to(x_1.device)
        ps = self.path.sample(x_0=self.validation_noise(batch), x_1=x_1, t=t)
        return F.mse_loss(self.sampling_network()(ps.x_t, t, mask).float(), ps.dx_t.float())

    # --- generation ---------------------------------------------------------------------------------
    supports_reference = True

    @property
    def default_t0(self) -> float:
        return self.cfg.med_dt_fm_args.reference_t0

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str) -> torch.Tensor:
        x_0 = noise.initial()
        return to_unit(sample(VelocityAdapter(self.sampling_network()), x_0, mask, num_steps, sampler))

    def generate_from_reference(self, mask: torch.Tensor, reference: torch.Tensor, noise: SampleNoise,
                                num_steps: int, sampler: str, t0: float, feature_guidance: float = 0.0) -> torch.Tensor:
        """Images in [0, 1] for ``mask`` guided by ``reference`` (B, 1, H, W) in [-1, 1]: from
        x_t0 = t0 reference + (1 - t0) x_0 on the path, round((1 - t0) N) steps of the N-step grid's size up to
        t = 1. t0 = 0 is :meth:`generate` bit for bit; t0 = 1 returns the reference.

        ``feature_guidance`` s > 0 (experimental, off by default: in a 200-step CPU prototype it moved samples
        *away* from the reference): each velocity becomes v - s ||v|| g / ||g|| per sample, g the gradient in
        x_t of sum_i lambda_i mse(P_i(B_i(x_t)), Ebar_i(reference)) (the projection heads and the frozen encoder).
        """
        x_0 = noise.initial()
        t = torch.full((x_0.shape[0],), float(t0), device=x_0.device)
        reference = reference.to(x_0)
        x_t0 = self.path.sample(x_0=x_0, x_1=reference, t=t).x_t
        adapter = VelocityAdapter(self.sampling_network())
        if feature_guidance > 0:
            which = [i for i, w in enumerate(self.cfg.med_dt_fm_args.lambdas) if w > 0]
            if not which:
                raise ValueError("feature guidance needs distillation (med_dt_fm_args.lambdas all 0: no trained "
                                 "projection heads, no segmenter)")
            adapter = FeatureGuidedAdapter(self.sampling_network(), self.heads, self.distillation_targets(
                reference, which), self.cfg.med_dt_fm_args.lambdas, feature_guidance)
        return to_unit(sample(adapter, x_t0, mask, num_steps, sampler, t0=t0))

    def nfe(self, num_steps: int, sampler: str, t0: float = 0.0) -> int:
        return reference_steps(num_steps, t0) * NFE_PER_STEP[sampler]
