"""SPADE's config: generator, discriminators and their losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from utils.config import RunConfig, require


@dataclass(frozen=True)
class SpadeConfig:
    """SPADE (Park et al., CVPR 2019), the GAN baseline: MONAI's SPADENet generator fed the one-hot mask, a
    conditional MultiScalePatchDiscriminator on [image, one-hot mask], hinge adversarial loss plus
    pix2pixHD's discriminator feature matching, optional VGG-19 perceptual and VAE (KL) terms.

    train_args.lr is not used: the generator and discriminator learn at ``lr_g`` and ``lr_d`` (the paper's
    two time-scale rule: 1e-4 and 4e-4; Adam betas (0, 0.9) as NVlabs/SPADE's code, the paper says (0, 0.999)).
    train_args.gradient_clip_val clips each of the two optimizers' gradients (0 = off; SPADE clips neither).

    ``alternating`` (default) steps as NVlabs/SPADE's trainer: G's step through the current D, then D's step
    on the updated generator's images of the same batch. Off, one backward gives both their gradients from
    the same generator pass and both step (checkpoints from before 2026-12 trained so; it can accumulate
    micro-batches, alternating cannot).

    ``spectral_norm`` spectrally normalises the convolutions NVlabs/SPADE's released code normalises
    (``norm_G``/``norm_D`` "spectral..."): each residual block's conv_0, conv_1 and learned shortcut in the
    generator (not the SPADE modulation convolutions, the first or the last layer), and every discriminator
    convolution but its first and last. The paper says "all layers"; the code is what its results came from.

    ``spade_output`` (default) ends the generator as SPADE does: the last residual block keeps ``channels[0]``
    features, then LeakyReLU(0.2), a 3x3 convolution to one channel and tanh (NVlabs/SPADE's ``conv_img``).
    Off, MONAI's layout (checkpoints from before 2026-12-07): the last block narrows to one channel and a 3x3
    convolution from one channel to one makes the image, a filter of 9 random weights that trains little; on
    the quickstart data training seeds 2 and 42 drew difference-like filters and made stripes instead of echo.
    """

    channels: tuple[int, ...] = (64, 128, 256, 512, 1024)  # SPADENet levels, finest first; the decoder reverses them
    hidden_channels: int = 128  # the SPADE blocks' hidden convolution (the paper's 128)
    is_vae: bool = False  # an image encoder gives the latent (style) in training; N(0, I) from the noise at generation
    z_dim: int = 256
    # SPADE's discriminator (NVlabs/SPADE's MultiscaleDiscriminator of NLayerDiscriminators), or MONAI's
    # MultiScalePatchDiscriminator (the i-th of d_num has i * d_num_layers layers, all on the full-size input)
    discriminator: Literal["spade", "monai"] = "spade"
    d_channels: int = 64  # the discriminators' first width, doubled per layer (SPADE's ndf 64; up to 512 in "spade")
    d_num: int = 2  # discriminators (SPADE's num_D 2)
    d_num_layers: int = 4  # layers of each (SPADE's n_layers_D 4)
    lr_g: float = 1.0e-4
    lr_d: float = 4.0e-4
    betas: tuple[float, ...] = (0.0, 0.9)
    adversarial_weight: float = 1.0
    feature_matching_weight: float = 10.0  # pix2pixHD's and SPADE's lambda_feat
    perceptual_weight: float = 0.0  # SPADE's 10 needs the ImageNet VGG-19 file (perceptual_weights)
    perceptual_weights: str = ""  # local torchvision vgg19-dcbb9e9d.pth; never downloaded
    kld_weight: float = 0.05  # only with is_vae
    spectral_norm: bool = True  # as NVlabs/SPADE's code (above); checkpoints from before 2026-12 have none
    alternating: bool = True  # G's step, then D's on the updated G's images (above)
    spade_output: bool = True  # SPADE's output layer (above); MONAI's 1-channel one before 2026-12-07

    def check(self, key):
        require(len(self.channels) >= 1 and min(self.channels) >= 1, key("channels"),
                f"must be one or more positive widths, got {list(self.channels)}")
        for name in ("hidden_channels", "z_dim", "d_channels", "d_num", "d_num_layers"):
            require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr_g", "lr_d"):
            require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), key("betas"),
                f"must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("adversarial_weight", "feature_matching_weight", "perceptual_weight", "kld_weight"):
            require(getattr(self, name) >= 0, key(name), f"must be >= 0, got {getattr(self, name)}")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            from losses.perceptual import VGG19_FILE, VGG19_URL  # torch: only on the way to this error

            require(False, key("perceptual_weights"),
                    f"must name a local file of torchvision's ImageNet VGG-19 weights ({VGG19_FILE}, from "
                    f"{VGG19_URL}; copy it here from a machine with internet) when {key('perceptual_weight')} "
                    f"> 0 (got {self.perceptual_weight}); or set {key('perceptual_weight')} to 0")

    def check_image_size(self, size: int, key) -> None:
        depth = 2 ** len(self.channels)
        require(size % depth == 0, "data_args.image_size",
                f"must be divisible by {depth} for {len(self.channels)} {key('channels')} levels, got {size}")
        layers = self.d_num * self.d_num_layers
        require(self.discriminator == "spade" or size >= 2 ** (layers + 2), "data_args.image_size",
                f"must be >= {2 ** (layers + 2)} for a deepest discriminator of {layers} layers "
                f"({key('d_num')} x {key('d_num_layers')}): its last instance-normalised map must stay "
                f"larger than 1 x 1, got {size}")
        require(not self.is_vae or self.z_dim <= size * size, key("z_dim"),
                f"must be <= image_size^2 ({size * size}): the latent is read from one sample's noise")


@dataclass(frozen=True)
class SpadeRunConfig(RunConfig):
    spade_args: SpadeConfig = field(default_factory=SpadeConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = ("spade_args",)
    SAMPLERS: ClassVar[tuple[str, ...]] = ("generator",)  # one generator pass, whatever sampling_args.num_steps
    WRITTEN_BEFORE: ClassVar[dict[str, object]] = {"spade_args.spectral_norm": False,
                                                   "spade_args.discriminator": "monai",
                                                   "spade_args.alternating": False,
                                                   "spade_args.spade_output": False}

    def check(self, key):
        super().check(key)
        self.spade_args.check_image_size(self.data_args.image_size, lambda name: f"spade_args.{name}")
