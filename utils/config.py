"""Typed configuration: YAML files loaded into frozen dataclasses and validated once.

Every key is checked against the dataclass that owns it: an unknown key, a value of the wrong type
or out of range is a :class:`ConfigError` naming the file and the key, e.g.
``configs/x.yaml: train_args.lr must be > 0, got -1``. ``--set section.key=value`` overrides are
parsed as YAML scalars and typed by the same dataclasses. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

# Each method (utils.methods.METHODS) and the config sections only it reads; a section of another method
# in a config is an error. The method's own sections default to their dataclass defaults when left out.
METHOD_SECTIONS = {
    "flow_matching": ("prior_args", "contrastive_args", "conditioning_args"),
    "ddpm": ("ddpm_args",),
    "spade": ("spade_args",),
    "med_dt_fm": ("med_dt_fm_args", "ukan_args"),
}
# The samplers (sampling_args.method) each method offers; the first is its default.
SAMPLERS = {
    "flow_matching": ("euler", "midpoint", "heun3", "rk4"),
    "ddpm": ("ddim", "ddpm"),
    "spade": ("generator",),  # one generator pass, whatever sampling_args.num_steps
    "med_dt_fm": ("euler", "midpoint", "heun3", "rk4"),
}
# The methods whose network is model_args' UNet + ControlNet.
UNET_METHODS = ("flow_matching", "ddpm", "med_dt_fm")
ALL_SAMPLERS = tuple(dict.fromkeys(s for names in SAMPLERS.values() for s in names))
# Network evaluations per step of each fixed-grid ODE solver.
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}
# What --set may change at inference: where the masks come from and how the sampler runs. Every other key
# changes what the trained network means (its shape, classes, prior, normalisation) or only matters to training.
INFERENCE_OVERRIDES = ("data_args.path", "data_args.num_workers", "sampling_args.num_steps", "sampling_args.method",
                       "sampling_args.precision", "sampling_args.guidance_scale", "model_args.use_flash_attention",
                       "output_dir")
# The perceptual loss's network, from torchvision (ImageNet weights): a file the user provides, never downloaded.
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/" + VGG19_FILE


MIN_VOLUME_SIZE = 16  # data_args.image_size of a 3-D model


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class SyntheticConfig:
    """How to build the built-in synthetic set when the dataset file is missing: the echo phantom (2-D) or
    the brain phantom (3-D), as ``model_args.spatial_dims`` says."""

    size: int = 256
    patients: tuple[int, ...] = (350, 50, 50)
    seed: int = 0

    def check(self, key):
        _require(self.size >= 16, key("size"), f"must be >= 16 (utils.data.synthetic_brain.MIN_SIZE), got {self.size}")
        _require(len(self.patients) == 3 and min(self.patients) >= 1, key("patients"),
                 f"must be three positive patient counts (train, valid, test), got {list(self.patients)}")


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/synthetic_echo.npz"
    num_classes: int = 4
    image_size: int = 256
    num_workers: int = 2
    synthetic: SyntheticConfig | None = None

    def check(self, key):
        _require(self.num_classes >= 2, key("num_classes"), f"must be >= 2, got {self.num_classes}")
        _require(self.image_size >= 8, key("image_size"), f"must be >= 8, got {self.image_size}")
        _require(self.num_workers >= 0, key("num_workers"), f"must be >= 0, got {self.num_workers}")
        if self.synthetic is not None:
            _require(self.synthetic.size == self.image_size, key("synthetic.size"),
                     f"must equal data_args.image_size ({self.image_size}), got {self.synthetic.size}")


@dataclass(frozen=True)
class ModelConfig:
    """MONAI DiffusionModelUNet + ControlNet hyperparameters (the seed's network by default)."""

    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2, 2)
    attention_levels: tuple[bool, ...] = (False, False, True, True, True)
    num_head_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    norm_num_groups: int = 32
    resblock_updown: bool = True
    transformer_num_layers: int = 1
    conditioning_embedding_num_channels: tuple[int, ...] = (16,)
    # Attention through PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels) instead of
    # MONAI's einsum softmax (MOTFM's). Same parameters and state dict; outputs agree to float rounding.
    use_flash_attention: bool = True
    # 2: images [B, 1, H, W]; 3: volumes [B, 1, D, H, W] (data_args.image_size N means N^3). Only method
    # flow_matching (COMET, MOTFM) builds a 3-D network.
    spatial_dims: int = 2

    def check(self, key):
        _require(self.spatial_dims in (2, 3), key("spatial_dims"), f"must be 2 or 3, got {self.spatial_dims}")
        n = len(self.channels)
        for name in ("num_res_blocks", "attention_levels", "num_head_channels"):
            got = len(getattr(self, name))
            _require(got == n, key(name), f"needs one entry per level ({n}), got {got}")
        for c in self.channels:
            _require(c % self.norm_num_groups == 0, key("channels"),
                     f"each must be divisible by norm_num_groups ({self.norm_num_groups}), got {c}")
        for c, h in zip(self.channels, self.num_head_channels):
            _require(h > 0 and c % h == 0, key("num_head_channels"),
                     f"each must divide its level's channels, got {h} for {c}")
        _require(self.transformer_num_layers >= 1, key("transformer_num_layers"), "must be >= 1")


@dataclass(frozen=True)
class PriorConfig:
    """Warm-start prior x_0 = alpha * Blur_{k,sigma}(enc(mask)) + sqrt(1 - alpha^2) * eps."""

    alpha: float = 0.3
    kernel_size: int = 15
    sigma: float = 5.0
    # enc(mask): each label's mean training intensity in [-1, 1]; label / (num_classes - 1) * 2 - 1
    # (scaled_labels); or label / (num_classes - 1) in [0, 1] (unit_labels: the seed's code, min-max masks).
    mask_encoding: Literal["mean_intensity", "scaled_labels", "unit_labels"] = "mean_intensity"
    # The blur's border: reflect, or zeros (the seed's code: conv2d zero padding).
    padding: Literal["reflect", "zeros"] = "reflect"
    # Voxel spacing (one per spatial axis, array order: [sd, sh, sw] in 3-D), empty = isotropic. sigma is then
    # in units of the finest spacing: axis a is blurred with sigma * min(spacing) / spacing[a] voxels, the
    # same physical width on every axis. The spacing of the volumes as trained on: volumes fitted to N^3 have
    # isotropic voxels (utils.data.resample), so only data already N^3 need it (checked against the data).
    spacing: tuple[float, ...] = ()

    def check(self, key):
        _require(all(s > 0 for s in self.spacing), key("spacing"), f"must be > 0, got {list(self.spacing)}")
        _require(0.0 <= self.alpha < 1.0, key("alpha"), f"must be in [0, 1), got {self.alpha}")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, key("kernel_size"),
                 f"must be a positive odd number, got {self.kernel_size}")
        _require(self.sigma > 0, key("sigma"), f"must be > 0, got {self.sigma}")


@dataclass(frozen=True)
class ConditioningConfig:
    """What the flow-matching network is conditioned on, and which conditions training drops (for guidance).

    ``mode``: the mask through the ControlNet, the image class through the UNet's (and ControlNet's)
    cross-attention (a one-hot context of the data's classes, as MOTFM), both, or neither.
    ``mask_input``: what the ControlNet sees, one channel label / (num_classes - 1) (``scalar``, the seed's and
    MOTFM's) or one channel per label (``one_hot``). Each training sample loses its whole mask with probability
    ``mask_dropout`` (the ControlNet sees all zeros), each of its anatomy labels with ``label_dropout`` (their
    pixels become background: a partial mask) and its class with ``class_dropout`` (a zero context); guidance
    (``sampling_args.guidance_scale``) contrasts with the dropped mask and class.
    """

    mode: Literal["mask", "class", "mask+class", "unconditional"] = "mask"
    mask_input: Literal["scalar", "one_hot"] = "scalar"
    mask_dropout: float = 0.0
    label_dropout: float = 0.0
    class_dropout: float = 0.0

    @property
    def uses_mask(self) -> bool:
        return "mask" in self.mode

    @property
    def uses_class(self) -> bool:
        return "class" in self.mode

    def check(self, key):
        for name in ("mask_dropout", "label_dropout", "class_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, key(name), f"must be in [0, 1), got {getattr(self, name)}")
        if not self.uses_mask:
            for name in ("mask_dropout", "label_dropout"):
                _require(getattr(self, name) == 0, key(name), f"must be 0 for {key('mode')} {self.mode} (no mask)")
            _require(self.mask_input == "scalar", key("mask_input"),
                     f"must be left at scalar for {key('mode')} {self.mode} (no mask)")
        _require(self.uses_class or self.class_dropout == 0, key("class_dropout"),
                 f"must be 0 for {key('mode')} {self.mode} (no class)")


@dataclass(frozen=True)
class ContrastiveConfig:
    """Cosine InfoNCE on velocities: L = MSE + weight * InfoNCE, on after warmup_epochs."""

    weight: float = 0.01
    temperature: float = 0.07
    warmup_epochs: int = 5
    target: Literal["velocity", "same_noise", "denoised"] = "velocity"
    exclude_same_patient: bool = True
    # M, the keys each anchor is contrasted with (its positive included), whatever the number of GPUs: the
    # current micro-batch of every rank, topped up with the samples of earlier micro-batches (no gradient).
    num_keys: int = 16

    def check(self, key):
        _require(self.weight >= 0, key("weight"), f"must be >= 0, got {self.weight}")
        _require(self.num_keys >= 2, key("num_keys"), f"must be >= 2, got {self.num_keys}")
        _require(self.temperature > 0, key("temperature"), f"must be > 0, got {self.temperature}")
        _require(self.warmup_epochs >= 0, key("warmup_epochs"), f"must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class DDPMConfig:
    """A denoising diffusion model on the same network (the ControlNet baseline of the seed's main table).

    The noise schedule is MONAI's ``DDPMScheduler`` default, Ho et al.'s: betas linear from 1e-4 to 0.02
    over 1,000 steps (the seed does not give its baseline's schedule).
    """

    num_train_timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "linear_beta"
    beta_start: float = 1e-4  # the beta schedules' ends (not used by cosine)
    beta_end: float = 2e-2
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    eta: float = 0.0  # the ddim sampler's noise: 0 = deterministic DDIM, 1 = DDPM's posterior variance
    clip_sample: bool = True  # clamp each step's predicted image to [-1, 1]

    def check(self, key):
        _require(self.num_train_timesteps >= 2, key("num_train_timesteps"),
                 f"must be >= 2, got {self.num_train_timesteps}")
        _require(0 < self.beta_start < self.beta_end < 1, key("beta_start"),
                 f"and beta_end must satisfy 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")
        _require(0 <= self.eta <= 1, key("eta"), f"must be in [0, 1], got {self.eta}")


@dataclass(frozen=True)
class SpadeConfig:
    """SPADE (Park et al., CVPR 2019), the GAN baseline: MONAI's SPADENet generator fed the one-hot mask, a
    conditional MultiScalePatchDiscriminator on [image, one-hot mask], hinge adversarial loss plus
    pix2pixHD's discriminator feature matching, optional VGG-19 perceptual and VAE (KL) terms.

    train_args.lr is not used: the generator and discriminator learn at ``lr_g`` and ``lr_d`` (the paper's
    two time-scale rule: 1e-4 and 4e-4 with Adam betas (0, 0.999); NVlabs/SPADE's code uses betas (0, 0.9)).
    train_args.gradient_clip_val clips each of the two optimizers' gradients (0 = off; SPADE clips neither).
    """

    channels: tuple[int, ...] = (64, 128, 256, 512, 1024)  # SPADENet levels, finest first; the decoder reverses them
    hidden_channels: int = 128  # the SPADE blocks' hidden convolution (the paper's 128)
    is_vae: bool = False  # an image encoder gives the latent (style) in training; N(0, I) from the noise at generation
    z_dim: int = 256
    d_channels: int = 16  # the discriminators' first width, doubled per layer
    d_num: int = 2  # discriminators; the i-th (from 1) has i * d_num_layers layers
    d_num_layers: int = 3
    lr_g: float = 1.0e-4
    lr_d: float = 4.0e-4
    betas: tuple[float, ...] = (0.0, 0.999)
    adversarial_weight: float = 1.0
    feature_matching_weight: float = 10.0  # pix2pixHD's and SPADE's lambda_feat
    perceptual_weight: float = 0.0  # SPADE's 10 needs the ImageNet VGG-19 file (perceptual_weights)
    perceptual_weights: str = ""  # local torchvision vgg19-dcbb9e9d.pth; never downloaded
    kld_weight: float = 0.05  # only with is_vae

    def check(self, key):
        _require(len(self.channels) >= 1 and min(self.channels) >= 1, key("channels"),
                 f"must be one or more positive widths, got {list(self.channels)}")
        for name in ("hidden_channels", "z_dim", "d_channels", "d_num", "d_num_layers"):
            _require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr_g", "lr_d"):
            _require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), key("betas"),
                 f"must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("adversarial_weight", "feature_matching_weight", "perceptual_weight", "kld_weight"):
            _require(getattr(self, name) >= 0, key(name), f"must be >= 0, got {getattr(self, name)}")
        _require(self.perceptual_weight == 0 or bool(self.perceptual_weights), key("perceptual_weights"),
                 f"must name a local file of torchvision's ImageNet VGG-19 weights ({VGG19_FILE}, from "
                 f"{VGG19_URL}; copy it here from a machine with internet) when {key('perceptual_weight')} "
                 f"> 0 (got {self.perceptual_weight}); or set {key('perceptual_weight')} to 0")

    def check_image_size(self, size: int, key) -> None:
        depth = 2 ** len(self.channels)
        _require(size % depth == 0, "data_args.image_size",
                 f"must be divisible by {depth} for {len(self.channels)} {key('channels')} levels, got {size}")
        layers = self.d_num * self.d_num_layers
        _require(size >= 2 ** (layers + 2), "data_args.image_size",
                 f"must be >= {2 ** (layers + 2)} for a deepest discriminator of {layers} layers "
                 f"({key('d_num')} x {key('d_num_layers')}): its last instance-normalised map must stay "
                 f"larger than 1 x 1, got {size}")
        _require(not self.is_vae or self.z_dim <= size * size, key("z_dim"),
                 f"must be <= image_size^2 ({size * size}): the latent is read from one sample's noise")


@dataclass(frozen=True)
class MedDTFMConfig:
    """Med-DT-FM (shared/seeds/003 as read in shared/MED_DT_FM.md): image-space flow matching from N(0, I) on
    model_args' UNet + ControlNet with mask-conditioned bridges B_0..B_3 in the decoder, trained with
    L = L_FM + sum_i lambdas[i] * mse(P_i(B_i), Ebar_i(x_1)) + alpha * L_adv.

    E_i is stage ``levels[i]`` (1..5, s1 finest) of the frozen U-KAN encoder (``ukan_args``) on the clean image;
    the default (4, 3, 2, 1) gives B_0 (the bottleneck) the deepest target used. L_adv: a spectrally normalised
    conditional PatchGAN's hinge loss on the one-step estimate x1_hat = x_t + (1 - t) v, only where
    t >= t_adv_min, off for the first ``adv_start_fraction`` of train_args.max_epochs, then ramped linearly
    over ``adv_ramp_epochs``. train_args.lr is not used: G and D learn at ``lr_g`` and ``lr_d``.
    """

    cond_channels: int = 64  # channels of the mask pyramid C_i
    lambdas: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    levels: tuple[int, ...] = (4, 3, 2, 1)
    alpha: float = 0.05
    t_adv_min: float = 0.5
    adv_start_fraction: float = 0.25
    adv_ramp_epochs: int = 3
    d_channels: int = 64
    d_num_layers: int = 3
    lr_g: float = 1.0e-4
    lr_d: float = 1.0e-4
    betas: tuple[float, ...] = (0.5, 0.999)  # the draft's (pix2pixHD's) Adam betas
    reference_t0: float = 0.5  # inferer.py --reference starts on the path at this t unless --t0 is given

    def check(self, key):
        _require(self.cond_channels >= 1, key("cond_channels"), f"must be >= 1, got {self.cond_channels}")
        _require(len(self.lambdas) == 4 and min(self.lambdas) >= 0, key("lambdas"),
                 f"must be 4 weights >= 0 (one per bridge B_0..B_3), got {list(self.lambdas)}")
        _require(len(self.levels) == 4 and all(1 <= v <= 5 for v in self.levels), key("levels"),
                 f"must be 4 U-KAN stages in 1..5 (one per bridge B_0..B_3), got {list(self.levels)}")
        _require(self.alpha >= 0, key("alpha"), f"must be >= 0, got {self.alpha}")
        _require(0 <= self.t_adv_min < 1, key("t_adv_min"), f"must be in [0, 1), got {self.t_adv_min}")
        _require(0 <= self.adv_start_fraction <= 1, key("adv_start_fraction"),
                 f"must be in [0, 1], got {self.adv_start_fraction}")
        for name in ("adv_ramp_epochs", "d_channels", "d_num_layers"):
            _require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr_g", "lr_d"):
            _require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), key("betas"),
                 f"must be two numbers in [0, 1), got {list(self.betas)}")
        _require(0 <= self.reference_t0 <= 1, key("reference_t0"), f"must be in [0, 1], got {self.reference_t0}")


@dataclass(frozen=True)
class UKANConfig:
    """Med-DT-FM's stage 0: the U-KAN segmenter trained on the training split only (never valid or test), then
    frozen and stored in the Med-DT-FM checkpoint. Recipe after U-KAN's: Adam, ``lr`` (``kan_lr`` for the KAN
    layers), weight decay, cosine decay to ``min_lr``, MONAI's Dice + CE loss; ``steps`` optimiser steps of
    ``batch_size``. Training stops with an error when the validation foreground Dice is below ``min_val_dice``."""

    kind: Literal["ukan", "ukan_mlp", "cnn"] = "ukan"
    widths: tuple[int, ...] = (128, 160, 256)
    steps: int = 5000
    batch_size: int = 8
    lr: float = 1.0e-4
    kan_lr: float = 1.0e-2
    weight_decay: float = 1.0e-4
    min_lr: float = 1.0e-5
    min_val_dice: float = 0.5
    seed: int = 0

    def check(self, key):
        _require(len(self.widths) == 3 and self.widths[0] % 8 == 0 and min(self.widths) >= 8, key("widths"),
                 f"must be 3 widths (d0, d1, d2) >= 8 with d0 divisible by 8, got {list(self.widths)}")
        for name in ("steps", "batch_size"):
            _require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "kan_lr"):
            _require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        _require(self.weight_decay >= 0 and self.min_lr >= 0, key("weight_decay"), "and min_lr must be >= 0")
        _require(0 <= self.min_val_dice <= 1, key("min_val_dice"), f"must be in [0, 1], got {self.min_val_dice}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 4  # per device
    effective_batch_size: int = 16  # kept for any number of devices by adjusting accumulation
    max_epochs: int = 400
    max_steps: int = -1  # generator optimizer steps (a GAN's D steps not counted); -1 = run max_epochs
    lr: float = 1e-4
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "16-mixed"
    gradient_clip_val: float = 1.0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = 0  # 0 = every visible GPU (CUDA_VISIBLE_DEVICES), or 1 on CPU
    num_nodes: int = 1
    seed: int = 42
    ema_decay: float = 0.0  # 0 = no EMA; else e.g. 0.999, used for sampling
    val_every_n_epochs: int = 1
    sample_every_n_epochs: int = 10  # sample grid + quick SSIM/PSNR
    num_sample_images: int = 8
    checkpoint_every_n_epochs: int = 10
    limit_train_batches: int = 0  # 0 = all
    limit_val_batches: int = 0  # 0 = all
    log_every_n_steps: int = 10
    # "blocks": torch.compile each UNet/ControlNet down/mid/up block in place (regional compilation:
    # state_dict keys unchanged). Faster steps after a first step that compiles (minutes on the seed network).
    compile: Literal["none", "blocks"] = "none"
    # 3-D only: the memory (GiB) a training step may use; the fit is refused before it starts when the estimate
    # (utils.methods.memory) exceeds it. 0 = what the device has free (CUDA free memory, or available RAM).
    memory_limit_gb: float = 0.0

    def check(self, key):
        for name in ("batch_size", "effective_batch_size", "max_epochs", "num_nodes",
                     "val_every_n_epochs", "sample_every_n_epochs", "checkpoint_every_n_epochs",
                     "log_every_n_steps", "num_sample_images"):
            _require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("devices", "limit_train_batches", "limit_val_batches"):
            _require(getattr(self, name) >= 0, key(name), f"must be >= 0, got {getattr(self, name)}")
        _require(self.max_steps == -1 or self.max_steps >= 1, key("max_steps"),
                 f"must be -1 or >= 1, got {self.max_steps}")
        _require(self.lr > 0, key("lr"), f"must be > 0, got {self.lr}")
        _require(self.gradient_clip_val >= 0, key("gradient_clip_val"), "must be >= 0")
        _require(0.0 <= self.ema_decay < 1.0, key("ema_decay"), f"must be in [0, 1), got {self.ema_decay}")
        _require(self.memory_limit_gb >= 0, key("memory_limit_gb"), f"must be >= 0, got {self.memory_limit_gb}")


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = 10
    # The sampler, one of SAMPLERS[method]; left out, the method's default (flow matching: euler; ddpm: ddim).
    method: str | None = None
    # Autocast for the network while sampling (validation grids, inferer, evaluate); "32-true" = none.
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    # Classifier-free guidance w (flow matching): v = v_uncond + w (v_cond - v_uncond), where v_uncond drops the
    # conditions training dropped (conditioning_args). 1 = no guidance (one network call per step; 2 otherwise).
    guidance_scale: float = 1.0

    def check(self, key):
        _require(self.num_steps >= 1, key("num_steps"), f"must be >= 1, got {self.num_steps}")
        _require(self.guidance_scale >= 0, key("guidance_scale"), f"must be >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class Config:
    run_name: str
    output_dir: str = "checkpoints"
    method: str = "flow_matching"  # a key of METHOD_SECTIONS
    data_args: DataConfig = field(default_factory=DataConfig)
    # the flow-matching network (and the benchmark's MOTFM-like baseline); other methods do not read it
    model_args: ModelConfig = field(default_factory=ModelConfig)
    train_args: TrainConfig = field(default_factory=TrainConfig)
    sampling_args: SamplingConfig = field(default_factory=SamplingConfig)
    # method sections: set for the configured method (see METHOD_SECTIONS), None for every other
    prior_args: PriorConfig | None = None
    contrastive_args: ContrastiveConfig | None = None
    conditioning_args: ConditioningConfig | None = None
    ddpm_args: DDPMConfig | None = None
    spade_args: SpadeConfig | None = None
    med_dt_fm_args: MedDTFMConfig | None = None
    ukan_args: UKANConfig | None = None

    def check(self, key):
        _require(bool(self.run_name) and "/" not in self.run_name, key("run_name"),
                 f"must be a non-empty name without '/', got {self.run_name!r}")
        synthetic = self.data_args.synthetic
        if synthetic is not None and self.model_args.spatial_dims == 2:
            _require(synthetic.size >= 32, "data_args.synthetic.size",
                     f"must be >= 32 for the 2-D echo phantom (utils.data.synthetic_echo.MIN_SIZE), "
                     f"got {synthetic.size}")
        samplers = SAMPLERS[self.method]
        _require(self.sampling_args.method in samplers, "sampling_args.method",
                 f"must be one of {list(samplers)} for method {self.method}, got {self.sampling_args.method!r}")
        if self.method in UNET_METHODS:
            depth = 2 ** (len(self.model_args.channels) - 1)
            _require(self.data_args.image_size % depth == 0, "data_args.image_size",
                     f"must be divisible by {depth} for {len(self.model_args.channels)} UNet levels, "
                     f"got {self.data_args.image_size}")
        if self.method == "med_dt_fm":
            _require(len(self.model_args.channels) >= 3, "model_args.channels",
                     f"needs >= 3 UNet levels for method med_dt_fm (three up blocks carry bridges), got "
                     f"{len(self.model_args.channels)}")
            _require(self.data_args.image_size % 32 == 0, "data_args.image_size",
                     f"must be divisible by 32 for the U-KAN segmenter of method med_dt_fm, got "
                     f"{self.data_args.image_size}")
        self.check_conditioning()
        self.check_spatial_dims()
        if self.ddpm_args is not None:
            steps, train_steps = self.sampling_args.num_steps, self.ddpm_args.num_train_timesteps
            _require(steps <= train_steps, "sampling_args.num_steps",
                     f"must be <= ddpm_args.num_train_timesteps ({train_steps}), got {steps}")
        if self.spade_args is not None:
            self.spade_args.check_image_size(self.data_args.image_size, lambda name: f"spade_args.{name}")
        if self.contrastive_args is not None:
            keys, batch = self.contrastive_args.num_keys, self.train_args.batch_size
            _require(keys % batch == 0, "contrastive_args.num_keys",
                     f"must be a multiple of train_args.batch_size ({batch}), so that a group of whole "
                     f"micro-batches holds the keys, got {keys}")

    def check_conditioning(self) -> None:
        c, w = self.conditioning_args, self.sampling_args.guidance_scale
        if c is None:
            _require(w == 1.0, "sampling_args.guidance_scale",
                     f"must be 1 for method {self.method} (guidance is flow matching's), got {w}")
            return
        _require(c.uses_mask or self.prior_args.alpha == 0, "prior_args.alpha",
                 f"must be 0 for conditioning_args.mode {c.mode}: the warm-start prior is drawn from the mask, "
                 f"which this mode does not have (got {self.prior_args.alpha})")
        _require(w == 1.0 or c.mask_dropout > 0 or c.class_dropout > 0, "sampling_args.guidance_scale",
                 f"must be 1 unless training dropped a condition (conditioning_args.mask_dropout or "
                 f"class_dropout > 0): the network never learned the unconditional velocity; got {w}")

    def check_spatial_dims(self) -> None:
        dims = self.model_args.spatial_dims
        _require(dims == 2 or self.method == "flow_matching", "model_args.spatial_dims",
                 f"3 (volumes) is only supported by method flow_matching (COMET, MOTFM); method {self.method} "
                 f"is 2-D only: set model_args.spatial_dims to 2 or method to flow_matching")
        _require(dims == 2 or self.data_args.image_size >= MIN_VOLUME_SIZE, "data_args.image_size",
                 f"must be >= {MIN_VOLUME_SIZE} for volumes (the 3-D SSIM's window is 11 voxels, the brain phantom's "
                 f"smallest side 16), got {self.data_args.image_size}")
        if self.prior_args is not None:
            spacing = self.prior_args.spacing
            _require(len(spacing) in (0, dims), "prior_args.spacing",
                     f"needs one entry per spatial axis ({dims}) or none (isotropic), got {list(spacing)}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """Check ``value`` (parsed YAML) against the annotation ``tp``; return it typed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {_type_name(tp)} for {key}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _convert(values[f.name], hints[f.name], key(f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key(f.name)}")
    obj = cls(**kwargs)
    obj.check(key)
    return obj


def config_from_dict(values: dict, source: str = "<config>") -> Config:
    """Build and validate a :class:`Config`; errors are prefixed with ``source``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(values).__name__}")
    try:
        values = with_method_defaults(values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return build_dataclass(Config, values, source)


def with_method_defaults(values: dict) -> dict:
    """``values`` with the method's sections and sampler filled in; another method's section is an error."""
    method = values.get("method", Config.method)
    if method not in METHOD_SECTIONS:
        raise ConfigError(f"method must be one of {list(METHOD_SECTIONS)}, got {method!r}")
    values = dict(values)
    for owner, sections in METHOD_SECTIONS.items():
        for section in sections:
            if owner == method:
                values.setdefault(section, {})
            elif values.get(section) is not None:
                raise ConfigError(f"{section} belongs to method {owner}, not to method {method}: remove it "
                                  f"(method {method} reads {', '.join(METHOD_SECTIONS[method]) or 'no section'})")
    sampling = values.get("sampling_args")
    if sampling is None or isinstance(sampling, dict):
        values["sampling_args"] = {"method": SAMPLERS[method][0], **(sampling or {})}
    return values


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars)."""
    out = yaml.safe_load(yaml.safe_dump(values))  # deep copy of plain data
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def inference_config(config: dict, overrides: list[str], source: str) -> dict:
    """A checkpoint's ``config`` with each ``--set section.key=value`` changing exactly that key, validated.

    Keys outside :data:`INFERENCE_OVERRIDES` are refused with a :class:`ConfigError` naming the key.
    """
    for item in overrides:
        key = item.partition("=")[0]
        if key not in INFERENCE_OVERRIDES:
            raise ConfigError(f"--set {key} cannot change at inference: it changes what the trained network "
                              f"means (allowed: {', '.join(INFERENCE_OVERRIDES)})")
    where = f"{source} with --set {' '.join(overrides)}" if overrides else source
    return config_to_dict(config_from_dict(apply_overrides(config, list(overrides)), where))


def sampling_overrides(num_steps: int | None, sampler: str | None) -> list[str]:
    """``--set`` items for the CLIs' --num_steps / --method flags (given ones only), so that the checkpoint's
    method validates them like any other override."""
    items = [] if num_steps is None else [f"sampling_args.num_steps={num_steps}"]
    return items + ([] if sampler is None else [f"sampling_args.method={sampler}"])


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping at the top of a YAML file; a missing file, bad YAML or another top level is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def build_dataclass(cls, values: dict, source: str):
    """A typed, validated instance of a config dataclass ``cls``; errors are prefixed with ``source``."""
    try:
        return _build(cls, values, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a YAML config file, apply ``--set`` overrides, validate. Errors name the file and key."""
    values = read_yaml_mapping(path)
    source = f"{path}" + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return config_from_dict(apply_overrides(values, list(overrides)), source)


def config_to_dict(cfg) -> dict:
    """Plain nested dict (lists, not tuples): YAML- and checkpoint-safe. Other methods' sections are left out."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    return yaml.safe_load(yaml.safe_dump(_plain(values), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
