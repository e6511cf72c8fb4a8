"""Flow matching's config (COMET, MOTFM): the warm-start prior, the contrastive term and the conditioning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from utils.config import ConditioningConfig, RunConfig, require


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
    # The image range the flow ends at (x_1): [-1, 1], or [0, 1] (the seed's code: ToTensor images). enc(mask)
    # in image units (mean_intensity, scaled_labels) follows it; unit_labels stays label / (num_classes - 1).
    image_range: tuple[float, ...] = (-1.0, 1.0)
    # Voxel spacing (one per spatial axis, array order: [sd, sh, sw] in 3-D), empty = isotropic. sigma is then
    # in units of the finest spacing: axis a is blurred with sigma * min(spacing) / spacing[a] voxels, the
    # same physical width on every axis. The spacing of the volumes as trained on: volumes fitted to N^3 have
    # isotropic voxels (utils.data.resample), so only data already N^3 need it (checked against the data).
    spacing: tuple[float, ...] = ()

    def check(self, key):
        require(all(s > 0 for s in self.spacing), key("spacing"), f"must be > 0, got {list(self.spacing)}")
        require(0.0 <= self.alpha < 1.0, key("alpha"), f"must be in [0, 1), got {self.alpha}")
        require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, key("kernel_size"),
                f"must be a positive odd number, got {self.kernel_size}")
        require(self.sigma > 0, key("sigma"), f"must be > 0, got {self.sigma}")
        require(len(self.image_range) == 2 and self.image_range[0] < self.image_range[1], key("image_range"),
                f"must be [low, high] with low < high, e.g. [-1, 1] or [0, 1], got {list(self.image_range)}")


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
        require(self.weight >= 0, key("weight"), f"must be >= 0, got {self.weight}")
        require(self.num_keys >= 2, key("num_keys"), f"must be >= 2, got {self.num_keys}")
        require(self.temperature > 0, key("temperature"), f"must be > 0, got {self.temperature}")
        require(self.warmup_epochs >= 0, key("warmup_epochs"), f"must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class FlowMatchingRunConfig(RunConfig):
    prior_args: PriorConfig = field(default_factory=PriorConfig)
    contrastive_args: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    conditioning_args: ConditioningConfig = field(default_factory=ConditioningConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = ("prior_args", "contrastive_args", "conditioning_args")
    SAMPLERS: ClassVar[tuple[str, ...]] = ("euler", "midpoint", "heun3", "rk4")
    UNET: ClassVar[bool] = True
    VOLUMES: ClassVar[bool] = True
    GUIDANCE: ClassVar[bool] = True

    def check(self, key):
        super().check(key)
        self.check_conditioning()
        spacing, dims = self.prior_args.spacing, self.model_args.spatial_dims
        require(len(spacing) in (0, dims), "prior_args.spacing",
                f"needs one entry per spatial axis ({dims}) or none (isotropic), got {list(spacing)}")
        keys, batch = self.contrastive_args.num_keys, self.train_args.batch_size
        require(keys % batch == 0, "contrastive_args.num_keys",
                f"must be a multiple of train_args.batch_size ({batch}), so that a group of whole "
                f"micro-batches holds the keys, got {keys}")

    def check_conditioning(self) -> None:
        c, w = self.conditioning_args, self.sampling_args.guidance_scale
        require(self.model_args.attention_out_proj or not c.uses_class, "model_args.attention_out_proj",
                f"must be true for conditioning_args.mode {c.mode}: the class's cross-attention blocks keep the "
                "output projection of their self-attention, which false would remove")
        require(c.uses_mask or self.prior_args.alpha == 0, "prior_args.alpha",
                f"must be 0 for conditioning_args.mode {c.mode}: the warm-start prior is drawn from the mask, "
                f"which this mode does not have (got {self.prior_args.alpha})")
        require(w == 1.0 or c.mask_dropout > 0 or c.class_dropout > 0, "sampling_args.guidance_scale",
                f"must be 1 unless training dropped a condition (conditioning_args.mask_dropout or "
                f"class_dropout > 0): the network never learned the unconditional velocity; got {w}")
