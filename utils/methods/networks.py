"""The one model factory (MONAI DiffusionModelUNet + ControlNet) and the one adapter for the ODE sampler."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from flow_matching.utils import ModelWrapper
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn

from utils.config import ConditioningConfig, ModelConfig

# The UNet's sinusoidal time embedding was designed for integer diffusion steps 0..999; continuous t in
# [0, 1] is scaled to that range as a float (MOTFM floored it, which quantises time).
TIME_SCALE = 999.0


class ConditionalVelocityField(nn.Module):
    """v_theta(x_t, t, mask, classes): a UNet, steered by a ControlNet that sees the mask and/or attending to the
    image class through cross-attention (``conditioning.mode``; MOTFM's four settings).

    ``x_t`` (B, 1, *spatial) in image units, spatial (H, W) or (D, H, W) by ``model_args.spatial_dims``; ``t``
    (B,) in [0, 1]; ``mask`` (B, 1, *spatial) integer labels, fed to the ControlNet by :func:`mask_input`
    (unused without a ControlNet); ``classes`` (B,) int64 class indices, -1 for the null class (a zero
    context), required with class conditioning; ``labels_kept`` (B, num_classes) bool, the mask labels the
    ControlNet sees (None: all; none kept: the null mask). Returns (B, 1, *spatial).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, in_channels: int = 1,
                 conditioning: ConditioningConfig = ConditioningConfig(), num_image_classes: int = 0,
                 time_floor: bool = False):
        super().__init__()
        self.time_floor = time_floor  # MOTFM's floor(t * 999), for networks imported from it (utils.motfm)
        if conditioning.uses_class and num_image_classes < 1:
            raise ValueError(f"conditioning mode {conditioning.mode} needs the number of image classes, got "
                             f"{num_image_classes}")
        self.num_classes, self.mask_encoding = num_classes, conditioning.mask_input
        self.num_image_classes = num_image_classes if conditioning.uses_class else 0
        common = dict(
            spatial_dims=cfg.spatial_dims,
            in_channels=in_channels,
            num_res_blocks=cfg.num_res_blocks,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            resblock_updown=cfg.resblock_updown,
            num_head_channels=cfg.num_head_channels,
            transformer_num_layers=cfg.transformer_num_layers,
            use_flash_attention=cfg.use_flash_attention,
            include_fc=cfg.attention_out_proj,
            with_conditioning=self.num_image_classes > 0,
            cross_attention_dim=self.num_image_classes or None,
        )
        self.unet = DiffusionModelUNet(out_channels=in_channels, **common)
        self.controlnet = None
        if conditioning.uses_mask:
            self.controlnet = ControlNet(
                conditioning_embedding_in_channels=num_classes if self.mask_encoding == "one_hot" else 1,
                conditioning_embedding_num_channels=cfg.conditioning_embedding_num_channels,
                **common,
            )
            # The ControlNet starts as a copy of the UNet's encoder; its zero convolutions make it a no-op.
            self.controlnet.load_state_dict(self.unet.state_dict(), strict=False)
        if cfg.low_precision_norm:
            low_precision_norms(self)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, classes: torch.Tensor | None = None,
                labels_kept: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = t * TIME_SCALE
        return self.at_timesteps(x_t, timesteps.floor() if self.time_floor else timesteps, mask, classes, labels_kept)

    def at_timesteps(self, x_t: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor,
                     classes: torch.Tensor | None = None, labels_kept: torch.Tensor | None = None) -> torch.Tensor:
        """The same network given the UNet's own ``timesteps`` (B,) in [0, TIME_SCALE], e.g. a diffusion
        model's integer steps, instead of t in [0, 1]."""
        context = None
        if self.num_image_classes:
            if classes is None:
                raise ValueError("this network is class-conditional: give classes (B,), -1 for the null class")
            context = class_context(classes, self.num_image_classes).to(x_t.dtype)
        if self.controlnet is None:
            return self.unet(x=x_t, timesteps=timesteps, context=context)
        cond = mask_input(mask, self.num_classes, self.mask_encoding, labels_kept).to(x_t.dtype)
        down, mid = self.controlnet(x=x_t, timesteps=timesteps, controlnet_cond=cond, context=context)
        return self.unet(
            x=x_t, timesteps=timesteps, context=context, down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


def class_context(classes: torch.Tensor, num_image_classes: int) -> torch.Tensor:
    """The cross-attention context (B, 1, K) of class indices (B,): one-hot (MOTFM's), zeros for -1 (null)."""
    classes = classes.long()
    onehot = F.one_hot(classes.clamp(min=0), num_image_classes).float()
    return (onehot * (classes >= 0).unsqueeze(1)).unsqueeze(1)


def mask_input(mask: torch.Tensor, num_classes: int, encoding: str,
               labels_kept: torch.Tensor | None = None) -> torch.Tensor:
    """The ControlNet's input for integer ``mask`` (B, 1, *spatial), float32.

    ``scalar``: one channel label / (num_classes - 1) in [0, 1]; ``one_hot``: (B, num_classes, *spatial).
    ``labels_kept`` (B, num_classes) bool: the pixels of a label not kept become background (0), as in a mask
    file that leaves that anatomy out; a sample with no label kept gets the null mask, all zeros in every
    channel (in ``one_hot`` unlike any real mask).
    """
    labels = mask.long()
    if labels_kept is not None:
        labels_kept = labels_kept.to(labels.device)
        labels = labels * torch.gather(labels_kept, 1, labels.flatten(1)).view_as(labels)
    if encoding == "one_hot":
        cond = F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()
    else:
        cond = labels.float() / (num_classes - 1)
    if labels_kept is not None:
        cond = cond * labels_kept.any(1).view(-1, *[1] * (cond.ndim - 1))
    return cond


class InputDtypeGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps its input's dtype under autocast (``model_args.low_precision_norm``).

    CUDA's autocast runs group_norm in float32, so the residual stream turns float32 and every following
    convolution casts back to bfloat16; here a bfloat16 input is normalised in bfloat16 (the kernel still
    accumulates its statistics in float32) and the stream stays bfloat16. Same parameters; without autocast, or
    with an input of the weights' dtype, it is ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def low_precision_norms(model: nn.Module) -> int:
    """Every affine ``nn.GroupNorm`` of ``model`` made an :class:`InputDtypeGroupNorm` in place; returns how many."""
    norms = [m for m in model.modules() if type(m) is nn.GroupNorm and m.affine]
    for m in norms:
        m.__class__ = InputDtypeGroupNorm
    return len(norms)


def build_model(cfg: ModelConfig, num_classes: int, conditioning: ConditioningConfig = ConditioningConfig(),
                num_image_classes: int = 0, time_floor: bool = False) -> ConditionalVelocityField:
    return ConditionalVelocityField(cfg, num_classes, conditioning=conditioning,
                                    num_image_classes=num_image_classes, time_floor=time_floor)


def time_blind_levels(cfg: ModelConfig) -> list[int]:
    """The UNet (and ControlNet) levels whose residual blocks cannot see t: MONAI adds the time embedding to each
    channel just before a GroupNorm, which removes it exactly when each group holds one channel
    (channels == norm_num_groups), as at level 0 of the seed's and MOTFM's network (32 channels, 32 groups)."""
    return [level for level, c in enumerate(cfg.channels) if c == cfg.norm_num_groups]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def controlnet_parameter_counts(model: ConditionalVelocityField) -> dict[str, int]:
    """Parameters of the UNet and of the ControlNet (when there is one), for the log."""
    counts = {"UNet": count_parameters(model.unet)}
    return counts if model.controlnet is None else {**counts, "ControlNet": count_parameters(model.controlnet)}


def repeated_blocks(model: ConditionalVelocityField) -> list[nn.Module]:
    """The UNet's and the ControlNet's down, mid and up blocks (17 in the seed network)."""
    unet, control = model.unet, model.controlnet
    blocks = [*unet.down_blocks, unet.middle_block, *unet.up_blocks]
    return blocks if control is None else [*blocks, *control.down_blocks, control.middle_block]


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


def compile_network(model: nn.Module, **compile_kwargs) -> int:
    """Whole-network compilation in place (``nn.Module.compile``: the state dict keeps its names), as one graph
    (``fullgraph``: a graph break is an error, not a silent fall-back to Python) for fixed shapes
    (``dynamic=False``), which is what a CUDA graph can later capture. Returns 1, the one graph."""
    model.compile(fullgraph=True, dynamic=False, **compile_kwargs)
    return 1


def to_channels_last(model: nn.Module, spatial_dims: int) -> int:
    """``model``'s convolution weights stored channels-last in place (``channels_last`` for 2-D, ``_3d`` for
    volumes); values and names unchanged. Returns how many weights it converted."""
    fmt, rank = (torch.channels_last, 4) if spatial_dims == 2 else (torch.channels_last_3d, 5)
    model.to(memory_format=fmt)
    return sum(p.dim() == rank for p in model.parameters())


class VelocityAdapter(ModelWrapper):
    """The only adapter between the network and the sampler (:mod:`utils.methods.ode_sampler`), a
    ``flow_matching`` ModelWrapper.

    The sampler calls ``forward(x=x, t=t, mask=..., [classes=...])`` with ``t`` (B,); a scalar ``t`` (as
    ``flow_matching``'s ODESolver passes) is broadcast to (B,). It applies classifier-free guidance,
    v = v_u + w (v_c - v_u) with v_u the network given ``null(conditions)`` (two calls; w = 1 makes the one
    conditional call), and counts network evaluations in ``nfe`` (reset it before a solve). A network with
    low-precision weights (``sampling_args.precision: bf16-true``) gets ``x`` in its dtype and ``t`` as given (the
    time embedding is computed from float32 values); its velocity comes back in ``x``'s dtype, so the ODE state
    and guidance's combination stay float32.
    """

    def __init__(self, model: nn.Module, guidance_scale: float = 1.0, null: Callable[[dict], dict] | None = None):
        super().__init__(model)
        self.guidance_scale, self.null = guidance_scale, null
        self.nfe = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, **conditions) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        x_in = self.network_input(x)
        self.nfe += 1
        v_c = self.model(x_in, t, **conditions).to(x.dtype)
        if self.guidance_scale == 1.0:
            return v_c
        self.nfe += 1
        v_u = self.model(x_in, t, **self.null(conditions)).to(x.dtype)
        return v_u + self.guidance_scale * (v_c - v_u)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype of the network's weights (a bf16-true copy's), else ``x`` itself."""
        weights = next((p.dtype for p in self.model.parameters()), x.dtype)
        return x.to(weights) if weights.is_floating_point else x
