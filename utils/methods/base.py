"""What every method is to the rest of the code: a LightningModule with a small, fixed set of operations.

Trainer, inferer, evaluate and the benchmark call only these:

- ``training_step(batch, batch_idx)`` (Lightning's), and ``validation_loss(batch)``, the number the best
  checkpoint is chosen by (computed with the weights that make images, deterministic for a given batch);
- ``generate(mask, noise, num_steps, sampler)``: images in [0, 1] for integer masks, where every random
  number of sample i comes from ``noise`` (:class:`utils.seeding.SampleNoise`), and ``nfe(num_steps, sampler)``;
  a class-conditional method (non-empty ``class_names``) also takes ``classes=`` (B,) class indices;
- ``parameter_counts()`` and ``describe()`` for the log.

The base class holds what the methods share: the typed config, the EMA of the generating network
``self.model``, per-(rank, epoch, batch) training randomness, the first-step timing of compiled blocks, and
the default optimizer (the validation sample grid is a callback: :mod:`utils.methods.sample_grid`). A method is
one subclass in package ``utils/methods/<name>/`` registered in :mod:`utils.methods`.
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel

from utils.config import RunConfig, config_to_dict
from utils.methods.networks import compile_blocks, compile_network, count_parameters, to_channels_last
from utils.seeding import SampleNoise, noise_for_indices, seeded_generator

log = logging.getLogger(__name__)


class MethodSetupError(ValueError):
    """A method that cannot be set up for this data (e.g. Med-DT-FM's stage-0 segmenter below its Dice threshold)."""


def use_fused_adam(on_cuda: bool, precision: str, gradient_clip_val: float) -> bool:
    """Fused Adam (one kernel for all parameters) on CUDA, except for fp16 with clipping: there Lightning's
    GradScaler must unscale before clipping, which an optimizer that unscales inside its step prevents. Under
    bf16 the method clips by itself (:meth:`SynthesisMethod.configure_gradient_clipping`)."""
    return on_cuda and not (precision == "16-mixed" and gradient_clip_val > 0)


@torch.no_grad()
def update_ema(average: AveragedModel, network: torch.nn.Module, decay: float) -> None:
    """``AveragedModel.update_parameters`` with ``get_ema_multi_avg_fn(decay)``, bit for bit, without reading
    the device: the first update copies the weights, the later ones lerp towards them by 1 - decay. torch
    branches on ``n_averaged == 0`` on the host (two device-to-host syncs a step); here the weight is a device
    tensor, where(n_averaged == 0, 1, 1 - decay) in float32, and lerp with weight 1 returns the network's value
    exactly. Buffers are copied, as ``AveragedModel`` does without ``use_buffers``: spectral norm's power-iteration
    vectors among them, so the copy (which never iterates: it only makes images, in eval mode) normalises with the
    trained network's current estimate of each weight's largest singular value."""
    averaged = [p.detach() for p in average.module.parameters()]
    live = [p.detach() for p in network.parameters()]
    weight = torch.where(average.n_averaged == 0, 1.0, 1.0 - decay).to(averaged[0])
    torch._foreach_lerp_(averaged, live, [weight] * len(averaged))
    for b_average, b_live in zip(average.module.buffers(), network.buffers(), strict=True):
        b_average.copy_(b_live)
    average.n_averaged += 1


class SynthesisMethod(pl.LightningModule):
    """A mask-conditional image generator trained with Lightning; subclasses build ``self.model``.

    Built from the method's validated run config (:class:`utils.config.RunConfig`), whose plain dict is saved
    in the checkpoint with any extra hyperparameter a subclass takes: the checkpoint alone rebuilds the module
    (:func:`utils.methods.load_module`).
    """

    # Lightning's global_step counts every optimizer.step() (Lightning issue #17958): a method that steps
    # other optimizers (a discriminator) with each generator step says how many steps that makes.
    optimizer_steps_per_generator_step = 1
    # DDP's find_unused_parameters: True for a method whose backward passes each reach only some parameters.
    ddp_find_unused_parameters = False

    def __init__(self, cfg: RunConfig, **hyperparameters):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": config_to_dict(cfg), **hyperparameters})
        self.ema: AveragedModel | None = None
        self._steps_before_batch = 0
        self._compiled = ""  # what train_args.compile compiled
        self._sampling_compiled = False  # whether sampling_args.compile compiled the sampling network
        self._channels_last = 0  # convolution weights train_args.channels_last stored channels-last
        self._time_first_step = False  # log the first step's wall time (it includes the compilation)
        self._first_step_clock = 0.0
        # Set by the trainer; a method that optimises by hand (automatic_optimization = False) accumulates this many.
        self.accumulate_grad_batches = 1

    @classmethod
    def for_data(cls, cfg: RunConfig, datamodule) -> SynthesisMethod:
        """The module to train on ``datamodule`` (a method whose hyperparameters come from the data overrides)."""
        return cls(cfg)

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
            self.ema = AveragedModel(self.model)  # stepped by update_ema
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

    def compilable_network(self) -> torch.nn.Module | None:
        """The UNet + ControlNet that ``train_args.compile`` compiles, for the methods that have one; None."""
        return None

    def configure_model(self):
        """Training only (called by the Trainer), in place: ``train_args.channels_last`` stores the network's and
        its EMA's convolution weights channels-last; ``train_args.compile`` "blocks" compiles the network's
        repeated blocks, "full" the whole network as one graph."""
        network, t = self.compilable_network(), self.cfg.train_args
        if network is None:
            return
        if t.channels_last and not self._channels_last:
            nets = [network] if self.ema is None else [network, self.ema.module]
            self._channels_last = sum(to_channels_last(net, self.cfg.model_args.spatial_dims) for net in nets)
            log.info("channels-last: %d convolution weights", self._channels_last)
        mode = t.compile
        if mode == "none" or self._compiled:
            return
        self._compiled = f"{compile_blocks(network)} blocks" if mode == "blocks" else \
            f"the whole network as {compile_network(network)} graph"
        self._time_first_step = True
        log.info("torch.compile of %s: the first training step compiles it", self._compiled)

    def compile_for_sampling(self) -> None:
        """``sampling_args.compile: full``: the network images are made with (:meth:`sampling_network`) compiled in
        place as one graph for fixed shapes, once; nothing otherwise."""
        if self.cfg.sampling_args.compile == "none" or self._sampling_compiled:
            return
        compile_network(self.sampling_network())
        self._sampling_compiled = True
        log.info("torch.compile of the sampling network as one graph: the first batch compiles it")

    def on_train_batch_start(self, batch, batch_idx):
        self._steps_before_batch = self.generator_steps()
        if self._time_first_step:
            self._first_step_clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None and self.generator_steps() != self._steps_before_batch:  # once per generator step
            update_ema(self.ema, self.model, self.cfg.train_args.ema_decay)
        if self._time_first_step:
            if batch["x_1"].is_cuda:
                torch.cuda.synchronize()
            log.info("first training step took %.1f s (it compiled %s; inductor caches the kernels)",
                     time.perf_counter() - self._first_step_clock, self._compiled)
            self._time_first_step = False

    def validation_step(self, batch, batch_idx):
        loss = self.validation_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["x_1"].shape[0])

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
