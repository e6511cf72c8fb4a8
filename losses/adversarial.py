"""GAN losses on multi-scale discriminator outputs, as pure functions (SPADE, pix2pixHD).

A multi-scale discriminator returns, per discriminator d, its patch logits ``logits[d]`` (B, 1, h_d, w_d)
and its intermediate feature maps ``features[d]`` (MONAI's ``MultiScalePatchDiscriminator`` layout).
Every term is a mean over the batch, so k equal micro-batches averaged give the loss of their union.
Everything is computed in float32 (the inputs may come from autocast).

MONAI's ``PatchAdversarialLoss(criterion="hinge")`` is not used: it passes the logits through tanh first,
so its discriminator term 1 - tanh(x) never reaches the hinge's zero, and its generator term is
relu(1 - tanh(x)) rather than SPADE's -x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """mean_d [ mean relu(1 - D_d(real)) + mean relu(1 + D_d(fake)) ] (Lim & Ye 2017; SPADE's D loss)."""
    terms = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def hinge_generator_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """mean_d [ -mean D_d(fake) ] (SPADE's G loss for the hinge GAN)."""
    return torch.stack([-f.float().mean() for f in fake]).mean()


def feature_matching_loss(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]) -> torch.Tensor:
    """mean_d sum_l L1(F_dl(fake), F_dl(real)) with the real features as constants (pix2pixHD, SPADE)."""
    per_d = [sum(F.l1_loss(f.float(), r.detach().float()) for f, r in zip(fd, rd)) for fd, rd in zip(fake, real)]
    return torch.stack(per_d).mean()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, averaged over the batch.

    SPADE sums over the batch too, which ties the weight to the batch size; the mean keeps it fixed.
    """
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=1)).mean()
