"""Med-DT-FM's config: the bridges, the adversarial term and the U-KAN segmenter of stage 0."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from utils.config import RunConfig, require


@dataclass(frozen=True)
class MedDTFMConfig:
    """Med-DT-FM (the draft paper the project was specified from; README "Methods"): image-space flow matching
    from N(0, I) on model_args' UNet + ControlNet with mask-conditioned bridges B_0..B_3 in the decoder, trained with
    L = L_FM + sum_i lambdas[i] * mse(P_i(B_i), Ebar_i(x_1)) + alpha * L_adv.

    E_i is stage ``levels[i]`` (1..5, s1 finest) of the frozen U-KAN encoder (``ukan_args``) on the clean image;
    the default (4, 3, 2, 1) gives B_0 (the bottleneck) the deepest target used. L_adv: a spectrally normalised
    conditional PatchGAN's hinge loss on the one-step estimate x1_hat = x_t + (1 - t) v, only where
    t >= t_adv_min, off for the first ``adv_start_fraction`` of train_args.max_epochs (of max_steps when that
    ends the run first), then ramped linearly over ``adv_ramp_epochs``. train_args.lr is not used: G and D learn
    at ``lr_g`` and ``lr_d``.
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
    # The ControlNet beside the bridges; false: the bridges are the mask's only way in (the paper's claim that they
    # fuse the condition, tested on its own)
    use_controlnet: bool = True

    def check(self, key):
        require(self.cond_channels >= 1, key("cond_channels"), f"must be >= 1, got {self.cond_channels}")
        require(len(self.lambdas) == 4 and min(self.lambdas) >= 0, key("lambdas"),
                f"must be 4 weights >= 0 (one per bridge B_0..B_3), got {list(self.lambdas)}")
        require(len(self.levels) == 4 and all(1 <= v <= 5 for v in self.levels), key("levels"),
                f"must be 4 U-KAN stages in 1..5 (one per bridge B_0..B_3), got {list(self.levels)}")
        require(self.alpha >= 0, key("alpha"), f"must be >= 0, got {self.alpha}")
        require(0 <= self.t_adv_min < 1, key("t_adv_min"), f"must be in [0, 1), got {self.t_adv_min}")
        require(0 <= self.adv_start_fraction <= 1, key("adv_start_fraction"),
                f"must be in [0, 1], got {self.adv_start_fraction}")
        for name in ("adv_ramp_epochs", "d_channels", "d_num_layers"):
            require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr_g", "lr_d"):
            require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), key("betas"),
                f"must be two numbers in [0, 1), got {list(self.betas)}")
        require(0 <= self.reference_t0 <= 1, key("reference_t0"), f"must be in [0, 1], got {self.reference_t0}")


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
        require(len(self.widths) == 3 and self.widths[0] % 8 == 0 and min(self.widths) >= 8, key("widths"),
                f"must be 3 widths (d0, d1, d2) >= 8 with d0 divisible by 8, got {list(self.widths)}")
        for name in ("steps", "batch_size"):
            require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "kan_lr"):
            require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        require(self.weight_decay >= 0 and self.min_lr >= 0, key("weight_decay"), "and min_lr must be >= 0")
        require(0 <= self.min_val_dice <= 1, key("min_val_dice"), f"must be in [0, 1], got {self.min_val_dice}")


@dataclass(frozen=True)
class MedDTFMRunConfig(RunConfig):
    med_dt_fm_args: MedDTFMConfig = field(default_factory=MedDTFMConfig)
    ukan_args: UKANConfig = field(default_factory=UKANConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = ("med_dt_fm_args", "ukan_args")
    SAMPLERS: ClassVar[tuple[str, ...]] = ("euler", "midpoint", "heun3", "rk4")
    UNET: ClassVar[bool] = True

    def check(self, key):
        super().check(key)
        require(len(self.model_args.channels) >= 3, "model_args.channels",
                f"needs >= 3 UNet levels for method med_dt_fm (three up blocks carry bridges), got "
                f"{len(self.model_args.channels)}")
        require(self.data_args.image_size % 32 == 0, "data_args.image_size",
                f"must be divisible by 32 for the U-KAN segmenter of method med_dt_fm, got "
                f"{self.data_args.image_size}")
