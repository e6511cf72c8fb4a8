"""What every adversarially trained method shares: two optimizers stepped by hand, and a conditional discriminator.

Lightning refuses ``Trainer(accumulate_grad_batches > 1)`` and ``Trainer(gradient_clip_val)`` with manual
optimisation, so trainer.py passes 1 and None and :class:`AdversarialMethod` does both itself:

- one backward per micro-batch of (generator loss + discriminator loss) / k, k = ``accumulate_grad_batches``;
  the two losses reach disjoint parameters (the discriminator is frozen where the generator's loss runs it,
  and sees the generated image detached in its own), so under DDP one gradient reduction serves both;
- every k-th micro-batch (and at the epoch's end) the generator then the discriminator step, each clipped
  once to ``train_args.gradient_clip_val`` in ``on_before_optimizer_step`` (after fp16 unscaling).

Both losses use the parameters of the window's start (pix2pixHD's order: G and D losses from one generated
batch), so k micro-batches give exactly the update of one k-times-larger batch. Each step counts in
``global_step``; :attr:`optimizer_steps_per_generator_step` = 2 keeps train_args.max_steps and the EMA in
generator steps.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from pytorch_lightning.strategies import ParallelStrategy

from losses.adversarial import feature_matching_loss, hinge_discriminator_loss, hinge_generator_loss
from utils.config import RunConfig
from utils.methods.base import SynthesisMethod, use_fused_adam
from utils.methods.networks import count_parameters

log = logging.getLogger(__name__)


def one_hot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, H, W) integer labels -> (B, num_classes, H, W) float32 one-hot channels."""
    return torch.nn.functional.one_hot(mask[:, 0].long(), num_classes).permute(0, 3, 1, 2).float()


@contextmanager
def frozen(module: torch.nn.Module):
    """Within: ``module``'s parameters take no gradient (gradients still flow through it to its inputs)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class PatchDiscriminator(torch.nn.Module):
    """A conditional PatchGAN in pix2pix's layout (4x4 convolutions, ``num_layers`` of stride 2 from ``channels``
    doubling up to 8x, one of stride 1, a 1-channel logit map; LeakyReLU 0.2) with spectral norm on every
    convolution and no batch or instance norm (batch statistics in D are fragile with small per-GPU batches).

    (B, in_channels, H, W) -> ([logits (B, 1, h, w)], [[the hidden feature maps]]): the layout of MONAI's
    multi-scale discriminator with one scale, which :meth:`AdversarialMethod.adversarial_terms` reads.
    """

    def __init__(self, in_channels: int, channels: int = 64, num_layers: int = 3):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        widths = [in_channels] + [channels * 2 ** min(i, 3) for i in range(num_layers + 1)]
        strides = [2] * num_layers + [1]
        self.layers = torch.nn.ModuleList(sn(torch.nn.Conv2d(a, b, 4, stride=s, padding=1))
                                          for a, b, s in zip(widths[:-1], widths[1:], strides))
        self.head = sn(torch.nn.Conv2d(widths[-1], 1, 4, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        features = []
        for layer in self.layers:
            x = torch.nn.functional.leaky_relu(layer(x), 0.2)
            features.append(x)
        return [self.head(x)], [features]


@dataclass
class AdversarialTerms:
    discriminator: torch.Tensor  # hinge loss of D on (real, detached fake)
    generator: torch.Tensor  # hinge loss of G through the frozen D
    feature_matching: torch.Tensor
    logs: dict = field(default_factory=dict)


@dataclass
class Losses:
    generator: torch.Tensor
    discriminator: torch.Tensor | None  # None: not computed with this micro-batch
    logs: dict


class AdversarialMethod(SynthesisMethod):
    """A generator ``self.model`` trained against a conditional discriminator ``self.discriminator`` that sees
    [image, one-hot mask]. Subclasses build both and implement :meth:`losses` and :meth:`adam_settings`."""

    optimizer_steps_per_generator_step = 2

    def __init__(self, cfg: RunConfig, **hyperparameters):
        super().__init__(cfg, **hyperparameters)
        self.automatic_optimization = False

    def losses(self, batch: dict, batch_idx: int) -> Losses:
        raise NotImplementedError

    def adam_settings(self) -> tuple[float, float, tuple[float, float]]:
        """(generator lr, discriminator lr, Adam betas)."""
        raise NotImplementedError

    def parameter_counts(self) -> dict[str, int]:
        return {"generator": count_parameters(self.model), "discriminator": count_parameters(self.discriminator)}

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        """What the generator's optimizer trains (``self.model``; a method may add training-only parts)."""
        return list(self.model.parameters())

    def adversarial_terms(self, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor,
                          discriminator: bool = True) -> AdversarialTerms:
        """D's and G's hinge losses and G's feature matching for images (B, 1, H, W) under ``cond`` (B, C, H, W).

        ``fake`` carries the generator's graph; D's parameters get gradients only from D's own loss. Without
        ``discriminator`` D's loss is not computed (0; one discriminator pass fewer).
        """
        real_logits, real_features = self.discriminator(torch.cat([real, cond], 1))
        d_loss, logs = self.discriminator_loss(real_logits, fake.detach(), cond) if discriminator else (
            real.new_zeros(()), {})
        with frozen(self.discriminator):
            g_logits, g_features = self.discriminator(torch.cat([fake, cond], 1))
        return AdversarialTerms(d_loss, hinge_generator_loss(g_logits),
                                feature_matching_loss(g_features, real_features), logs)

    def discriminator_loss(self, real_logits: list[torch.Tensor], fake: torch.Tensor,
                           cond: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """D's hinge loss for its logits of real images and the (detached) ``fake`` under ``cond``, and its
        mean logits for the log."""
        fake_logits, _ = self.discriminator(torch.cat([fake, cond], 1))
        d_real = torch.stack([r.float().mean() for r in real_logits]).mean().detach()
        d_fake = torch.stack([f.float().mean() for f in fake_logits]).mean().detach()
        return hinge_discriminator_loss(real_logits, fake_logits), {"train/d_real": d_real, "train/d_fake": d_fake}

    def ends_a_step(self, batch_idx: int) -> bool:
        """Whether this micro-batch is the last of an optimizer step (accumulation, or the epoch's end)."""
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch

    def training_step(self, batch, batch_idx):
        k = self.accumulate_grad_batches
        step = self.ends_a_step(batch_idx)
        with self._gradient_sync(step):
            out = self.losses(batch, batch_idx)
            self.manual_backward((out.generator + out.discriminator) / k)
        if step:
            for opt in self.optimizers():  # the generator's, then the discriminator's
                opt.step()
                opt.zero_grad(set_to_none=True)
        return self.log_losses(out, batch)

    def log_losses(self, out: Losses, batch: dict) -> torch.Tensor:
        logs = {**out.logs, "train/g_loss": out.generator.detach()}
        if out.discriminator is not None:
            logs["train/d_loss"] = out.discriminator.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch["x_1"].shape[0])
        return out.generator.detach()

    def _gradient_sync(self, step: bool):
        """DDP all-reduces gradients only on the backward before a step (Lightning's own accumulation does so)."""
        strategy = self.trainer.strategy
        return nullcontext() if step or not isinstance(strategy, ParallelStrategy) else strategy.block_backward_sync()

    def on_before_optimizer_step(self, optimizer):
        clip = self.cfg.train_args.gradient_clip_val
        if clip > 0:
            self.configure_gradient_clipping(optimizer, clip, "norm")

    def configure_optimizers(self):
        lr_g, lr_d, betas = self.adam_settings()
        fused = use_fused_adam(next(self.model.parameters()).is_cuda, self.trainer.precision,
                               self.cfg.train_args.gradient_clip_val)
        log.info("optimizers: Adam, generator lr %.3g, discriminator lr %.3g, betas %s, %s", lr_g, lr_d, betas,
                 "fused" if fused else "not fused")
        return [torch.optim.Adam(self.generator_parameters(), lr=lr_g, betas=betas, fused=fused),
                torch.optim.Adam(self.discriminator.parameters(), lr=lr_d, betas=betas, fused=fused)]
