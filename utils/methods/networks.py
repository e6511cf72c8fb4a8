"""The one model factory (MONAI DiffusionModelUNet + ControlNet) and the one adapter for the ODE solver."""

from __future__ import annotations

import torch
from flow_matching.utils import ModelWrapper
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn

from utils.config import ModelConfig

# The UNet's sinusoidal time embedding was designed for integer diffusion steps 0..999; continuous t in
# [0, 1] is scaled to that range as a float (MOTFM floored it, which quantises time).
TIME_SCALE = 999.0


class ConditionalVelocityField(nn.Module):
    """v_theta(x_t, t, mask): a UNet whose residuals are steered by a ControlNet that sees the mask.

    ``x_t`` (B, 1, H, W) in image units; ``t`` (B,) in [0, 1]; ``mask`` (B, 1, H, W) integer labels,
    fed to the ControlNet as one channel ``mask / (num_classes - 1)`` in [0, 1]. Returns (B, 1, H, W).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, in_channels: int = 1):
        super().__init__()
        common = dict(
            spatial_dims=2,
            in_channels=in_channels,
            num_res_blocks=cfg.num_res_blocks,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            resblock_updown=cfg.resblock_updown,
            num_head_channels=cfg.num_head_channels,
            transformer_num_layers=cfg.transformer_num_layers,
            use_flash_attention=cfg.use_flash_attention,
        )
        self.unet = DiffusionModelUNet(out_channels=in_channels, **common)
        self.controlnet = ControlNet(
            conditioning_embedding_in_channels=1,
            conditioning_embedding_num_channels=cfg.conditioning_embedding_num_channels,
            **common,
        )
        # The ControlNet starts as a copy of the UNet's encoder; its zero convolutions make it a no-op.
        self.controlnet.load_state_dict(self.unet.state_dict(), strict=False)
        self.num_classes = num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.at_timesteps(x_t, t * TIME_SCALE, mask)

    def at_timesteps(self, x_t: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same network given the UNet's own ``timesteps`` (B,) in [0, TIME_SCALE], e.g. a diffusion
        model's integer steps, instead of t in [0, 1]."""
        cond = mask.to(x_t.dtype) / (self.num_classes - 1)
        down, mid = self.controlnet(x=x_t, timesteps=timesteps, controlnet_cond=cond)
        return self.unet(
            x=x_t, timesteps=timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )


def build_model(cfg: ModelConfig, num_classes: int) -> ConditionalVelocityField:
    return ConditionalVelocityField(cfg, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def controlnet_parameter_counts(model: ConditionalVelocityField) -> dict[str, int]:
    """Parameters of the UNet and of the ControlNet, for the log."""
    return {"UNet": count_parameters(model.unet), "ControlNet": count_parameters(model.controlnet)}


def repeated_blocks(model: ConditionalVelocityField) -> list[nn.Module]:
    """The UNet's and the ControlNet's down, mid and up blocks (17 in the seed network)."""
    unet, control = model.unet, model.controlnet
    return [*unet.down_blocks, unet.middle_block, *unet.up_blocks, *control.down_blocks, control.middle_block]


def compile_blocks(model: ConditionalVelocityField, **compile_kwargs) -> int:
    """Regional compilation: ``nn.Module.compile`` on each of :func:`repeated_blocks`, in place.

    Compiling the blocks rather than the whole training step keeps the first (compiling) step to minutes
    instead of far longer, and leaves parameter names and the state dict unchanged. Compilation happens
    lazily at the first call; inductor caches its kernels on disk (``TORCHINDUCTOR_CACHE_DIR``), so a
    second run compiles faster. ``compile_kwargs`` go to ``torch.compile`` (tests pass a cheap backend).
    Returns the number of blocks compiled.
    """
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


class VelocityAdapter(ModelWrapper):
    """The only adapter between the network and ``flow_matching``'s ODESolver.

    The solver calls ``forward(x, t, mask=...)`` with a scalar ``t``; this broadcasts it to (B,) and
    counts network evaluations in ``nfe`` (reset it before a solve).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.nfe = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, **extras) -> torch.Tensor:
        self.nfe += 1
        t = t.to(x.dtype).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        return self.model(x, t, extras["mask"])
