"""SPADE (Park et al., CVPR 2019): a GAN whose generator normalises its features with the mask, the seed's GAN baseline.

Generator: MONAI's ``SPADENet`` on the one-hot mask. Without the VAE it starts from the mask downsampled to
the coarsest level and is deterministic (the noise of :meth:`generate` is unused); with ``is_vae`` an image
encoder gives the latent in training (KL term) and generation draws it from N(0, I), the first ``z_dim``
numbers of each sample's noise. It ends as SPADE's does (``spade_args.spade_output``, default): the last
residual block keeps ``channels[0]`` features, then LeakyReLU(0.2), a 3x3 convolution to one channel and tanh;
MONAI's own layout narrows the last block to one channel and ends with a 1 -> 1 convolution (older checkpoints).

Discriminator on [image, one-hot mask]: SPADE's (:class:`MultiscaleDiscriminator`: ``d_num`` discriminators of
``d_num_layers`` layers, the i-th on the input downsampled i times, widths capped at 512), or with
``spade_args.discriminator: monai`` (checkpoints from before 2026-12) MONAI's ``MultiScalePatchDiscriminator``
with instance norm (the i-th has i * ``d_num_layers`` layers on the full-size input, widths not capped). With
``spade_args.spectral_norm`` (default) both networks are spectrally normalised where NVlabs/SPADE's code does it
(:data:`SPECTRAL_GENERATOR`, :data:`SPECTRAL_DISCRIMINATOR`). Losses: hinge,
discriminator feature matching (weight 10), optional VGG-19 perceptual (local weights only) and KL.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import MultiScalePatchDiscriminator, SPADENet
from torch.nn.utils.parametrizations import spectral_norm

from losses.adversarial import kl_divergence
from losses.perceptual import PerceptualLoss, vgg19_features
from utils.images import to_unit
from utils.methods.adversarial import AdversarialMethod, Losses, one_hot
from utils.methods.spade.config import SpadeConfig, SpadeRunConfig
from utils.seeding import SampleNoise

# The convolutions NVlabs/SPADE's code spectrally normalises, by their names in MONAI's networks: the
# generator's residual-block convolutions (SPADEResnetBlock conv_0, conv_1, conv_s), and (discriminator
# "monai") the discriminators' inner convolutions (NLayerDiscriminator's norm_layer(Conv2d); not the first or
# the last). The "spade" discriminator normalises the same layers itself.
SPECTRAL_GENERATOR = re.compile(r"decoder\.blocks\.\d+\.conv_[01s]\.conv")
SPECTRAL_DISCRIMINATOR = re.compile(r"discriminator_\d+\.\d+\.conv")


def spectrally_normalise(network: torch.nn.Module, names: re.Pattern) -> list[str]:
    """Spectral norm (``torch.nn.utils.parametrizations``, one power iteration per training forward) on each
    convolution of ``network`` whose name matches ``names``; returns those names."""
    done = [name for name, m in network.named_modules() if isinstance(m, torch.nn.Conv2d) and names.fullmatch(name)]
    for name in done:
        spectral_norm(network.get_submodule(name))
    return done


def build_generator(cfg: SpadeConfig, num_classes: int, image_size: int) -> SPADENet:
    width = cfg.channels[0] if cfg.spade_output else 1  # the last residual block's output channels
    # list(): SPADENet reverses and extends the list it is given
    net = SPADENet(spatial_dims=2, in_channels=1, out_channels=width, label_nc=num_classes,
                   input_shape=(image_size, image_size), channels=list(cfg.channels), z_dim=cfg.z_dim,
                   is_vae=cfg.is_vae, spade_intermediate_channels=cfg.hidden_channels, last_act="TANH")
    if cfg.spade_output:  # NVlabs/SPADE: tanh(conv_img(leaky_relu(x, 0.2))), conv_img 3x3 to the image channels
        net.decoder.last_conv = torch.nn.Sequential(
            torch.nn.LeakyReLU(0.2),
            Convolution(spatial_dims=2, in_channels=width, out_channels=1, kernel_size=3, padding=1, norm=None,
                        act="TANH"))
    if cfg.spectral_norm:
        spectrally_normalise(net, SPECTRAL_GENERATOR)
    return net


class NLayerDiscriminator(torch.nn.Module):
    """One of SPADE's discriminators (NVlabs/SPADE ``NLayerDiscriminator``, ``norm_D`` spectralinstance): a 4x4
    conv of stride 2 to ``channels`` and LeakyReLU 0.2; ``num_layers - 1`` 4x4 convs doubling the width up to
    512 (stride 2, the last stride 1), each without bias, spectrally normalised when ``spectral``, then
    InstanceNorm (no affine) and LeakyReLU; a 4x4 conv to one logit per patch. Padding 2, as SPADE's."""

    def __init__(self, in_channels: int, channels: int, num_layers: int, spectral: bool):
        super().__init__()
        conv = torch.nn.Conv2d
        widths = [in_channels, channels] + [min(channels * 2**n, 512) for n in range(1, num_layers)]
        layers = [torch.nn.Sequential(conv(in_channels, channels, 4, stride=2, padding=2), torch.nn.LeakyReLU(0.2))]
        for n in range(1, num_layers):
            c = conv(widths[n], widths[n + 1], 4, stride=1 if n == num_layers - 1 else 2, padding=2, bias=False)
            layers.append(torch.nn.Sequential(spectral_norm(c) if spectral else c,
                                              torch.nn.InstanceNorm2d(widths[n + 1]), torch.nn.LeakyReLU(0.2)))
        self.layers = torch.nn.ModuleList(layers)
        self.head = conv(widths[-1], 1, 4, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return self.head(x), features


class MultiscaleDiscriminator(torch.nn.Module):
    """SPADE's multi-scale discriminator: ``num_d`` :class:`NLayerDiscriminator` s, the i-th on the input average-
    pooled i times (3x3, stride 2, padding not counted). (B, C, H, W) -> ([logits per D], [[features per D]]),
    the layout :meth:`utils.methods.adversarial.AdversarialMethod.adversarial_terms` reads."""

    def __init__(self, in_channels: int, channels: int, num_layers: int, num_d: int, spectral: bool):
        super().__init__()
        self.discriminators = torch.nn.ModuleList(NLayerDiscriminator(in_channels, channels, num_layers, spectral)
                                                  for _ in range(num_d))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        logits, features = [], []
        for d in self.discriminators:
            out, feats = d(x)
            logits.append(out)
            features.append(feats)
            x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
        return logits, features


def build_discriminator(cfg: SpadeConfig, num_classes: int, image_size: int) -> torch.nn.Module:
    if cfg.discriminator == "spade":
        return MultiscaleDiscriminator(1 + num_classes, cfg.d_channels, cfg.d_num_layers, cfg.d_num,
                                       cfg.spectral_norm)
    net = MultiScalePatchDiscriminator(num_d=cfg.d_num, num_layers_d=cfg.d_num_layers, spatial_dims=2,
                                       channels=cfg.d_channels, in_channels=1 + num_classes, norm="INSTANCE",
                                       minimum_size_im=image_size)
    if cfg.spectral_norm:
        spectrally_normalise(net, SPECTRAL_DISCRIMINATOR)
    return net


class SpadeModule(AdversarialMethod):
    def __init__(self, cfg: SpadeRunConfig):
        super().__init__(cfg)
        s, d = self.cfg.spade_args, self.cfg.data_args
        self.model = build_generator(s, d.num_classes, d.image_size)
        self.discriminator = build_discriminator(s, d.num_classes, d.image_size)
        self.keep_ema()
        self.perceptual: PerceptualLoss | None = None  # training only: see for_data
        self._pending: list[tuple[dict, int]] = []  # alternating: this step's micro-batches, for D's turn

    @classmethod
    def for_data(cls, cfg: SpadeRunConfig, datamodule) -> SpadeModule:
        """The module to train; it reads the perceptual loss's weights file (a checkpoint does not need it)."""
        module = cls(cfg)
        s = module.cfg.spade_args
        if s.perceptual_weight > 0:
            module.perceptual = PerceptualLoss(vgg19_features(s.perceptual_weights, "spade_args.perceptual_weights"))
        return module

    def describe(self) -> str:
        s = self.cfg.spade_args
        vae = f"VAE z_dim {s.z_dim} (KL {s.kld_weight:.3g})" if s.is_vae else "no VAE (deterministic)"
        return (f"SPADE: generator channels {list(s.channels)}, {vae}; {s.d_num} discriminators x "
                f"{s.d_num_layers} layers from {s.d_channels} channels; spectral norm "
                f"{'on' if s.spectral_norm else 'off'}; Adam G {s.lr_g:.3g} D {s.lr_d:.3g} "
                f"betas {list(s.betas)}; weights: hinge {s.adversarial_weight:.3g}, feature matching "
                f"{s.feature_matching_weight:.3g}, perceptual {s.perceptual_weight:.3g}")

    def adam_settings(self):
        s = self.cfg.spade_args
        return s.lr_g, s.lr_d, tuple(s.betas)

    # --- the method -------------------------------------------------------------------------------
    def synthesise(self, network: SPADENet, mask: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [-1, 1] for ``mask``; ``eps`` (B, 1, H, W) N(0, I) gives the VAE's latent."""
        s = self.cfg.spade_args
        z = eps.flatten(1)[:, : s.z_dim] if s.is_vae else None
        return network.decode(one_hot(mask, self.cfg.data_args.num_classes).to(eps.device), z)

    def fake(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The generator's images for the batch's masks, the one-hot masks, and (VAE) the KL term in a dict."""
        s = self.cfg.spade_args
        x_1, cond = batch["x_1"], one_hot(batch["mask"], self.cfg.data_args.num_classes)
        z, logs = None, {}
        if s.is_vae:
            mu, logvar = self.model.encoder(x_1)
            eps = torch.randn(mu.shape, generator=self.training_generator(batch_idx, x_1.device), device=x_1.device)
            z = mu + eps * torch.exp(0.5 * logvar)
            logs["train/kld"] = kl_divergence(mu, logvar)
        return self.model.decode(cond, z), cond, logs

    def losses(self, batch: dict, batch_idx: int, discriminator: bool = True) -> Losses:
        """G's and (with ``discriminator``) D's losses on one batch, from one generator pass."""
        s = self.cfg.spade_args
        fake, cond, logs = self.fake(batch, batch_idx)
        adv = self.adversarial_terms(batch["x_1"], fake, cond, discriminator)
        generator = s.adversarial_weight * adv.generator + s.feature_matching_weight * adv.feature_matching
        if s.is_vae:
            generator = generator + s.kld_weight * logs["train/kld"]
        logs.update(adv.logs, **{"train/g_adv": adv.generator, "train/g_feature_matching": adv.feature_matching})
        if self.perceptual is not None:
            logs["train/g_perceptual"] = self.perceptual(fake, batch["x_1"])
            generator = generator + s.perceptual_weight * logs["train/g_perceptual"]
        return Losses(generator, adv.discriminator, {k: v.detach() for k, v in logs.items()})

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Alternating steps backpropagate G's loss and D's loss separately: each reaches one network only."""
        return self.cfg.spade_args.alternating

    def training_step(self, batch, batch_idx):
        if not self.cfg.spade_args.alternating:
            return super().training_step(batch, batch_idx)
        step = self.ends_a_step(batch_idx)
        with self._gradient_sync(step):
            out = self.losses(batch, batch_idx, discriminator=False)  # G through the current D
            self.manual_backward(out.generator / self.accumulate_grad_batches)
        out.discriminator = None  # D's loss comes with its step
        self._pending.append((batch, batch_idx))
        if step:
            self.alternating_updates(out)
        return self.log_losses(out, batch)

    def alternating_updates(self, out: Losses) -> None:
        """G's step, then D's on the updated generator's images of the same micro-batches (NVlabs/SPADE's
        trainer); ``out`` gets D's loss of the last micro-batch and its logs."""
        opt_g, opt_d = self.optimizers()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        pending, self._pending = self._pending, []
        for i, (batch, batch_idx) in enumerate(pending):
            with self._gradient_sync(i == len(pending) - 1):
                with torch.no_grad():
                    fake, cond, _ = self.fake(batch, batch_idx)
                real_logits, _ = self.discriminator(torch.cat([batch["x_1"], cond], 1))
                out.discriminator, logs = self.discriminator_loss(real_logits, fake, cond)
                self.manual_backward(out.discriminator / self.accumulate_grad_batches)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        out.logs.update({k: v.detach() for k, v in logs.items()})

    def validation_loss(self, batch: dict) -> torch.Tensor:
        """L1 between the image generated for each validation mask and its paired real image.

        The GAN losses cannot rank checkpoints (they measure G against a discriminator that moves with it);
        a paired distance to the real image measures the generator alone and is deterministic: the
        generator is, and the VAE's latent is each image's noise of (seed, index), as at generation. L1
        favours the conditional mean, so it is a proxy for image quality, not FID.
        """
        x_1 = batch["x_1"]
        eps = self.validation_noise(batch)
        return F.l1_loss(self.synthesise(self.sampling_network(), batch["mask"], eps).float(), x_1.float())

    def generate(self, mask: torch.Tensor, noise: SampleNoise, num_steps: int, sampler: str) -> torch.Tensor:
        return to_unit(self.synthesise(self.sampling_network(), mask, noise.initial()))

    def nfe(self, num_steps: int, sampler: str) -> int:
        return 1
