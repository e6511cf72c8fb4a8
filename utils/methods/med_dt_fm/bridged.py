"""Med-DT-FM's velocity field: the UNet + ControlNet of :mod:`utils.methods.networks` with its decoder cut into
the paper's chain FM_0 -> BM_0 -> FM_1 -> BM_1 -> FM_2 -> BM_2 -> FM_3 -> BM_3 -> head (the reading
in which each bridge B_i, not FM_i, feeds the next decoder block).

- FM_0 = conv_in + down blocks + middle block (+ ControlNet residuals); FM_1..FM_3 = the first three up blocks;
  the remaining up blocks and ``out`` are the head, whose output is the velocity v.
- BM_i (:class:`Bridge`): B_i = FM_i + Z(SiLU(GN(conv3x3([FM_i, C_i])))), Z a zero-initialised 1x1 conv, so the
  network is exactly MONAI's UNet(+ControlNet) at initialisation (tested bit for bit); B_i feeds FM_{i+1}.
- C_i (:class:`MaskPyramid`): a pure function of the mask (the paper's Cond Enc), one map per bridge.
- P_i (:class:`ProjectionHeads`): 1x1 conv -> SiLU -> 1x1 conv from B_i into the segmentation encoder's
  feature space, resized to that feature's resolution (training only: not part of the sampling network).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from utils.config import ConditioningConfig, ModelConfig
from utils.methods.networks import TIME_SCALE, ConditionalVelocityField, low_precision_norms

NUM_BRIDGES = 4


def bridge_channels(unet_channels: tuple[int, ...]) -> list[int]:
    """Widths of B_0..B_3: the middle block's, then the first three up blocks' (MONAI's up block i outputs
    the i-th level from the deepest)."""
    deepest_first = list(reversed(unet_channels))
    return [deepest_first[0], *deepest_first[:3]]


def match_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) to (B, C, *size): area pooling to shrink, bilinear to enlarge, as is when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MaskPyramid(nn.Module):
    """C_i = f(mask): one-hot (B, K, H, W) -> conv3x3-SiLU-conv3x3 at full resolution -> per bridge: average
    pooled to the bridge's size, SiLU, conv3x3 -> (B, cond_channels, h_i, w_i)."""

    def __init__(self, num_classes: int, cond_channels: int, levels: int = NUM_BRIDGES):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(num_classes, cond_channels, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(cond_channels, cond_channels, 3, padding=1))
        self.levels = nn.ModuleList(nn.Conv2d(cond_channels, cond_channels, 3, padding=1) for _ in range(levels))

    def embed(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        one_hot = F.one_hot(mask[:, 0].long(), self.num_classes).permute(0, 3, 1, 2).to(dtype)
        return self.stem(one_hot)

    def level(self, i: int, stem: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.levels[i](F.silu(F.adaptive_avg_pool2d(stem, size)))


class Bridge(nn.Module):
    """B = h + Z(SiLU(GN(conv3x3([h, c])))), Z zero-initialised: the identity until trained."""

    def __init__(self, channels: int, cond_channels: int, norm_num_groups: int):
        super().__init__()
        self.fuse = nn.Conv2d(channels + cond_channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.zero = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.zero(F.silu(self.norm(self.fuse(torch.cat([h, c.to(h.dtype)], 1)))))


class BridgedVelocityField(ConditionalVelocityField):
    """v_theta(x_t, t, mask) with mask-conditioned bridges in the decoder; :meth:`velocity_and_features` also
    returns B_0..B_3. ``x_t`` (B, 1, H, W), ``t`` (B,) in [0, 1], ``mask`` (B, 1, H, W) integer labels.
    Needs >= 3 UNet levels (three up blocks before the head)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, cond_channels: int, use_controlnet: bool = True):
        super().__init__(cfg, num_classes, conditioning=ConditioningConfig("mask" if use_controlnet else
                                                                           "unconditional"))
        if len(cfg.channels) < 3:
            raise ValueError(f"the bridged velocity field needs >= 3 UNet levels, got {len(cfg.channels)}")
        self.cond = MaskPyramid(num_classes, cond_channels)
        self.bridges = nn.ModuleList(Bridge(c, cond_channels, cfg.norm_num_groups)
                                     for c in bridge_channels(cfg.channels))
        if cfg.low_precision_norm:  # the bridges' norms too (the UNet's were swapped by the parent)
            low_precision_norms(self.bridges)

    def at_timesteps(self, x_t: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor,
                     classes: torch.Tensor | None = None, labels_kept: torch.Tensor | None = None) -> torch.Tensor:
        if classes is not None or labels_kept is not None:
            raise ValueError("the bridged velocity field is conditioned on the whole mask alone (no classes, no "
                             "label dropout)")
        return self._forward(x_t, timesteps, mask)[0]

    def velocity_and_features(self, x_t: torch.Tensor, t: torch.Tensor,
                              mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v (B, 1, H, W), [B_0, ..., B_3]) for t in [0, 1]."""
        return self._forward(x_t, t * TIME_SCALE, mask)

    def _forward(self, x_t, timesteps, mask):
        # MONAI's DiffusionModelUNet.forward (time embedding, conv_in, down blocks, ControlNet residuals, middle
        # block, up blocks each taking len(resnets) skips, out) through its public submodules, with the bridges
        # after the middle block and the first three up blocks.
        unet = self.unet
        emb = unet.time_embed(get_timestep_embedding(timesteps, unet.block_out_channels[0]).to(dtype=x_t.dtype))
        h = unet.conv_in(x_t)
        skips = [h]
        for block in unet.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        h = unet.middle_block(hidden_states=h, temb=emb, context=None)
        if self.controlnet is not None:  # without it the bridges are the mask's only way in
            cond = mask.to(x_t.dtype) / (self.num_classes - 1)
            down_res, mid_res = self.controlnet(x=x_t, timesteps=timesteps, controlnet_cond=cond)
            skips = [s + d for s, d in zip(skips, down_res)]
            h = h + mid_res
        stem = self.cond.embed(mask, h.dtype)
        h = self.bridges[0](h, self.cond.level(0, stem, h.shape[-2:]))
        features = [h]
        for i, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            h = block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb, context=None)
            skips = skips[:-n]
            if i + 1 < NUM_BRIDGES:
                h = self.bridges[i + 1](h, self.cond.level(i + 1, stem, h.shape[-2:]))
                features.append(h)
        return unet.out(h), features


class ProjectionHeads(nn.Module):
    """P_i: B_i (B, c_i, h, w) -> 1x1 conv -> SiLU -> 1x1 conv -> (B, e_i, h, w), resized to the target's size."""

    def __init__(self, in_channels: list[int], out_channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU(), nn.Conv2d(c, e, 1))
                                   for c, e in zip(in_channels, out_channels))

    def forward(self, features: list[torch.Tensor], sizes: dict[int, tuple[int, int]]) -> dict[int, torch.Tensor]:
        """{i: P_i(B_i) resized to sizes[i]} for each level i in ``sizes``."""
        return {i: match_size(self.heads[i](features[i]), tuple(size)) for i, size in sizes.items()}
