"""U-KAN, the segmenter whose frozen encoder gives Med-DT-FM its targets: the KAN layer's maths, the official
parameter count, shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.methods.med_dt_fm.ukan import UKAN, KANLinear


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_kan_bspline_partition_of_unity():
    torch.manual_seed(0)
    layer = KANLinear(3, 2)
    x = torch.linspace(-1, 1, 201).unsqueeze(1).expand(-1, 3)
    bases = layer.b_splines(x)
    assert bases.shape == (201, 3, 8) and bases.min() >= 0
    torch.testing.assert_close(bases.sum(-1), torch.ones(201, 3), atol=1e-6, rtol=0)
    # beyond the extended grid (+-2.2) no basis is on: the layer is its SiLU branch alone
    far = torch.tensor([[-3.0, 2.5, 10.0]])
    assert layer.b_splines(far).abs().max() == 0
    torch.testing.assert_close(layer(far), nn.functional.silu(far) @ layer.base_weight.T)
    # parameters: in * out * (grid_size + spline_order + 2)
    assert count(layer) == 3 * 2 * 10


def test_kan_spline_weights_start_as_the_fit_of_small_noise():
    torch.manual_seed(0)
    layer = KANLinear(4, 5, scale_noise=0.1)
    assert layer.spline_weight.abs().max() < 0.1  # least-squares fit of noise of amplitude 0.1 / 5 per knot
    x = torch.rand(7, 4) * 2 - 1  # inside the grid, where the bases determine the values
    # the fit reproduces values that a spline of these knots can represent exactly
    coeff = layer.fit_coefficients(x, torch.einsum("nic,oic->nio", layer.b_splines(x), layer.spline_weight.detach()))
    fitted = torch.einsum("nic,oic->nio", layer.b_splines(x), coeff)
    torch.testing.assert_close(fitted, torch.einsum("nic,oic->nio", layer.b_splines(x), layer.spline_weight.detach()),
                               atol=1e-4, rtol=1e-3)


def test_ukan_official_param_count():
    torch.manual_seed(0)
    net = UKAN(in_channels=3, num_classes=1, widths=(128, 160, 256), kind="ukan")
    assert count(net) == 6_356_689
    assert sum(p.numel() for p in net.kan_parameters()) == 3_993_600
    # U-KAN's own --no_kan ablation (KAN -> Linear), grey input and 4 classes
    assert count(UKAN(1, 4, (128, 160, 256), kind="ukan_mlp")) == 2_764_324
    assert count(UKAN(1, 4, (16, 24, 32))) == 118_944


def test_no_kan_variants_are_linear_and_convolutional():
    mlp, cnn = UKAN(1, 4, (16, 24, 32), "ukan_mlp"), UKAN(1, 4, (16, 24, 32), "cnn")
    assert not mlp.kan_parameters() and not cnn.kan_parameters()
    assert all(type(m.fc) is nn.Linear for m in mlp.modules() if hasattr(m, "kind"))
    assert all(type(m.fc) is nn.Conv2d for m in cnn.modules() if hasattr(m, "kind"))
    with pytest.raises(ValueError, match="kind must be one of"):
        UKAN(kind="kan")


@pytest.mark.parametrize(("size", "in_channels"), [(32, 1), (64, 3), (256, 1)])
def test_ukan_shapes_and_channels(size, in_channels):
    torch.manual_seed(0)
    net = UKAN(in_channels, 4, (16, 24, 32))
    x = torch.randn(2, in_channels, size, size)
    maps = net.encode(x)
    assert [m.shape[1] for m in maps] == [2, 4, 16, 24, 32] == list(net.channels)
    assert [m.shape[-1] for m in maps] == [size // 2, size // 4, size // 8, size // 16, size // 32]
    assert [m.shape[-1] for m in net.encode(x, stages=4)] == [size // 2, size // 4, size // 8, size // 16]
    assert net(x).shape == (2, 4, size, size)
