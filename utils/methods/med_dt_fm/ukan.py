"""U-KAN (Li et al., "U-KAN Makes Strong Backbone for Medical Image Segmentation and Generation", AAAI 2025,
arXiv 2406.02918): the segmentation network whose frozen encoder gives Med-DT-FM its distillation targets.

A clean-room re-implementation from the paper's and the public repository's architecture description
(Seg_UKAN/archs.py, class ``UKAN``, read, not copied). With widths (d0, d1, d2) and an H x W input:

- s1..s3: ``ConvLayer`` (2 x conv3x3-BN-ReLU), then maxpool 2 and ReLU: d0/8, d0/4, d0 channels at H/2, H/4, H/8;
- s4, s5 (tokenised KAN stages): ``PatchEmbed`` (conv3x3 stride 2 + LayerNorm), one :class:`KANBlock`,
  LayerNorm: d1 at H/16, d2 at H/32;
- decoder: ``D_ConvLayer`` (2 x conv3x3-BN-ReLU) + bilinear x2 + ReLU, *added* skips (s4, s3, s2, s1),
  KAN blocks at d1 and d0 after the first two, a 1x1 conv to ``num_classes`` logits.

A :class:`KANBlock` is ``x + KANLayer(LayerNorm(x))`` with KANLayer = 3 x [token mixer (d -> d) then depth-wise
conv3x3 + BN + ReLU]. The token mixer is, by ``kind``: ``ukan`` a :class:`KANLinear` (efficient-kan's form:
SiLU base branch plus cubic B-splines on 5 intervals of [-1, 1]), ``ukan_mlp`` an ``nn.Linear`` (U-KAN's own
``--no_kan`` ablation), ``cnn`` a 3x3 convolution on the map (no spline arithmetic at all; the cheapest on a
CPU). Two deviations from the public code, both deliberate: ``in_channels`` is honoured (the original
hard-codes RGB) and the output has ``num_classes`` channels (multi-class CE + Dice instead of BCE + Dice).
The official RGB / 1-class / [128, 160, 256] network has 6,356,689 parameters (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("ukan", "ukan_mlp", "cnn")


class KANLinear(nn.Module):
    """y = W_b silu(x) + (W_s * s) B(x): a linear map on SiLU features plus one on cubic B-spline bases.

    x (..., in_features) -> (..., out_features). The knots are ``grid_size`` equal intervals of
    ``grid_range`` extended by ``spline_order`` knots on each side, so on ``grid_range`` the
    ``grid_size + spline_order`` bases sum to one, and beyond the extended grid all are zero (only the SiLU
    branch acts). Parameters: ``in * out * (grid_size + spline_order + 2)``. The spline weights start as the
    least-squares fit of small noise (``scale_noise``), as in efficient-kan; grid updates and the spline
    regulariser are not used (U-KAN's training never calls them).
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 scale_noise: float = 0.1, grid_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        step = (grid_range[1] - grid_range[0]) / grid_size
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * step + grid_range[0]
        self.register_buffer("grid", knots.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5))
        with torch.no_grad():
            x = self.grid[:, spline_order:-spline_order].T  # (grid_size + 1, in): the knots inside the range
            y = (torch.rand(grid_size + 1, in_features, out_features) - 0.5) * scale_noise / grid_size
            self.spline_weight.copy_(self.fit_coefficients(x, y))

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, in, grid_size + spline_order): the B-spline bases of each input (Cox-de Boor)."""
        g = self.grid
        x = x.unsqueeze(-1)
        bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
        for k in range(1, self.spline_order + 1):
            left = (x - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)])
            right = (g[:, k + 1:] - x) / (g[:, k + 1:] - g[:, 1:-k])
            bases = left * bases[..., :-1] + right * bases[..., 1:]
        return bases.contiguous()

    def fit_coefficients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Spline weights (out, in, coeff) whose splines pass closest (least squares) to y (N, in, out) at x (N, in);
        the minimum-norm solution when the points do not determine it (N < coeff). Through the pseudo-inverse:
        ``torch.linalg.lstsq`` takes seconds per layer on a CPU for these many tiny problems."""
        a = self.b_splines(x).transpose(0, 1)  # (in, N, coeff)
        solution = torch.linalg.pinv(a) @ y.transpose(0, 1)  # (in, coeff, out)
        return solution.permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        base = F.linear(F.silu(x), self.base_weight)
        weight = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).reshape(self.out_features, -1)
        spline = F.linear(self.b_splines(x).reshape(x.shape[0], -1), weight)
        return (base + spline).reshape(*shape[:-1], self.out_features)


def conv_bn_relu(c_in: int, c_out: int, groups: int = 1, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups), nn.BatchNorm2d(c_out), nn.ReLU()]


def conv_layer(c_in: int, c_out: int) -> nn.Sequential:
    """The encoder's two 3x3 convolutions (c_in -> c_out -> c_out), each with BN and ReLU."""
    return nn.Sequential(*conv_bn_relu(c_in, c_out), *conv_bn_relu(c_out, c_out))


def decoder_layer(c_in: int, c_out: int) -> nn.Sequential:
    """The decoder's two 3x3 convolutions (c_in -> c_in -> c_out), each with BN and ReLU."""
    return nn.Sequential(*conv_bn_relu(c_in, c_in), *conv_bn_relu(c_in, c_out))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (the token LayerNorm of U-KAN, on maps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TokenMixer(nn.Module):
    """The per-token map of a KAN layer on a (B, C, H, W) map: KANLinear, Linear (``ukan_mlp``) or a 3x3 conv."""

    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "cnn":
            self.fc = nn.Conv2d(dim, dim, 3, padding=1)
        else:
            self.fc = KANLinear(dim, dim) if kind == "ukan" else nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "cnn":
            return self.fc(x)
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class KANBlock(nn.Module):
    """x + KANLayer(LayerNorm(x)), KANLayer = 3 x [token mixer, depth-wise conv3x3 + BN + ReLU]; (B, C, H, W)."""

    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.norm = ChannelNorm(dim)
        self.mixers = nn.ModuleList(TokenMixer(dim, kind) for _ in range(3))
        self.dwconvs = nn.ModuleList(nn.Sequential(*conv_bn_relu(dim, dim, groups=dim)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        for mixer, dwconv in zip(self.mixers, self.dwconvs):
            h = dwconv(mixer(h))
        return x + h


class TokenStage(nn.Module):
    """conv3x3 stride 2 + LayerNorm (U-KAN's PatchEmbed), one KANBlock, LayerNorm:
    (B, c_in, H, W) -> (B, dim, H/2, W/2)."""

    def __init__(self, c_in: int, dim: int, kind: str):
        super().__init__()
        self.embed = nn.Conv2d(c_in, dim, 3, stride=2, padding=1)
        self.embed_norm = ChannelNorm(dim)
        self.block = KANBlock(dim, kind)
        self.norm = ChannelNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.block(self.embed_norm(self.embed(x))))


class UKAN(nn.Module):
    """U-KAN segmenter: (B, in_channels, H, W) in [-1, 1] -> (B, num_classes, H, W) logits; H, W divisible by 32.

    ``widths`` = (d0, d1, d2); d0 divisible by 8. :meth:`encode` returns the five stage maps s1..s5.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, widths: tuple[int, int, int] = (128, 160, 256),
                 kind: str = "ukan"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"U-KAN kind must be one of {KINDS}, got {kind!r}")
        d0, d1, d2 = widths
        self.encoder = nn.ModuleList([conv_layer(in_channels, d0 // 8), conv_layer(d0 // 8, d0 // 4),
                                      conv_layer(d0 // 4, d0)])
        self.tokens = nn.ModuleList([TokenStage(d0, d1, kind), TokenStage(d1, d2, kind)])
        self.decoder = nn.ModuleList([decoder_layer(d2, d1), decoder_layer(d1, d0), decoder_layer(d0, d0 // 4),
                                      decoder_layer(d0 // 4, d0 // 8), decoder_layer(d0 // 8, d0 // 8)])
        self.decoder_blocks = nn.ModuleList([KANBlock(d1, kind), KANBlock(d0, kind)])
        self.decoder_norms = nn.ModuleList([ChannelNorm(d1), ChannelNorm(d0)])
        self.final = nn.Conv2d(d0 // 8, num_classes, 1)
        self.channels = (d0 // 8, d0 // 4, d0, d1, d2)

    def encode(self, x: torch.Tensor, stages: int = 5) -> list[torch.Tensor]:
        """The first ``stages`` of [s1..s5]: (B, d0/8, H/2, W/2), (B, d0/4, H/4, ..), (B, d0, H/8, ..),
        (B, d1, H/16, ..), (B, d2, H/32, ..)."""
        out = []
        for layer in self.encoder[:stages]:
            x = F.relu(F.max_pool2d(layer(x), 2))
            out.append(x)
        for stage in self.tokens[: max(0, stages - 3)]:
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        *skips, h = self.encode(x)
        for i, layer in enumerate(self.decoder):
            target = skips[-1 - i].shape[-2:] if i < len(skips) else size
            h = F.relu(F.interpolate(layer(h), size=target, mode="bilinear"))
            if i < len(skips):
                h = h + skips[-1 - i]
            if i < len(self.decoder_blocks):
                h = self.decoder_norms[i](self.decoder_blocks[i](h))
        return self.final(h)

    def kan_parameters(self) -> list[nn.Parameter]:
        """The KANLinear parameters (U-KAN trains them at a larger learning rate)."""
        return [p for m in self.modules() if isinstance(m, KANLinear) for p in m.parameters()]
