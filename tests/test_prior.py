import math

import torch

from utils.data.datamodule import scaled_label_values
from utils.methods.flow_matching.prior import gaussian_blur, gaussian_kernel1d, warm_start_prior
from utils.seeding import noise_for_indices

VALUES = torch.tensor([0.1, -0.8, 0.6, -0.7])


def _mask(b=2, h=16, w=16):
    m = torch.zeros(b, 1, h, w, dtype=torch.uint8)
    m[:, :, 4:12, 4:8] = 1
    m[:, :, 4:12, 8:10] = 2
    m[:, :, 12:15, 4:10] = 3
    return m


def test_alpha_zero_is_exactly_randn_for_the_same_generator():
    eps = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    x_0 = warm_start_prior(_mask(), eps, 0.0, 15, 5.0, VALUES)
    expected = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x_0, expected)


def test_prior_formula_matches_an_independent_derivation():
    mask, eps, alpha = _mask(), torch.randn(2, 1, 16, 16), 0.3
    x_0 = warm_start_prior(mask, eps, alpha, 5, 1.5, VALUES)
    enc = VALUES[mask.long()]
    # independent blur: 2-D kernel as the outer product, reflect padding, direct convolution
    k1 = torch.exp(-((torch.arange(5) - 2.0) ** 2) / (2 * 1.5**2))
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    padded = torch.nn.functional.pad(enc, (2, 2, 2, 2), mode="reflect")
    blurred = torch.nn.functional.conv2d(padded, k2.view(1, 1, 5, 5))
    torch.testing.assert_close(x_0, alpha * blurred + math.sqrt(1 - alpha**2) * eps, atol=1e-5, rtol=1e-5)


def test_blur_is_deterministic_normalised_and_keeps_constants():
    x = torch.randn(1, 1, 20, 20)
    assert torch.equal(gaussian_blur(x, 15, 5.0), gaussian_blur(x, 15, 5.0))
    assert abs(gaussian_kernel1d(15, 5.0).sum().item() - 1.0) < 1e-6
    const = torch.full((1, 1, 20, 20), 0.4)
    torch.testing.assert_close(gaussian_blur(const, 15, 5.0), const)


def test_mask_is_resized_with_nearest_neighbour():
    small = _mask(1, 8, 8)
    big = torch.nn.functional.interpolate(small.float(), size=(16, 16), mode="nearest").to(torch.uint8)
    eps = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(warm_start_prior(small, eps, 0.3, 5, 1.5, VALUES),
                               warm_start_prior(big, eps, 0.3, 5, 1.5, VALUES))


def test_noise_for_indices_depends_only_on_seed_and_index():
    a = noise_for_indices(torch.tensor([0, 1, 2, 3]), (1, 4, 4), seed=5)
    b = noise_for_indices(torch.tensor([2, 3]), (1, 4, 4), seed=5)
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, noise_for_indices(torch.tensor([0, 1, 2, 3]), (1, 4, 4), seed=6))


def test_scaled_label_values_span_the_image_range():
    torch.testing.assert_close(scaled_label_values(4), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_the_prior_is_float32_under_autocast_as_without_it():
    mask, eps = _mask(), torch.randn(2, 1, 16, 16)
    plain = warm_start_prior(mask, eps, 0.3, 5, 1.5, VALUES)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training runs under autocast, sampling does not
        under = warm_start_prior(mask, eps, 0.3, 5, 1.5, VALUES)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_zero_padding_is_torch_conv2d_with_zero_padding_as_in_the_seed_code():
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur  # reflect padding

    x = torch.rand(2, 1, 20, 24)
    k = gaussian_kernel1d(7, 2.0)
    kernel2d = torch.outer(k, k).view(1, 1, 7, 7)
    expected = torch.nn.functional.conv2d(x, kernel2d, padding=3)  # the seed's F.conv2d(padding=k // 2)
    torch.testing.assert_close(gaussian_blur(x, 7, 2.0, padding="zeros"), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gaussian_blur(x, 7, 2.0), tv_blur(x, [7, 7], [2.0, 2.0]), atol=1e-6, rtol=1e-5)


def test_unit_labels_encode_the_seeds_min_max_masks(tiny_data):
    from utils.data.datamodule import EchoDataModule
    from utils.methods import load_config

    cfg = load_config("configs/tiny.yaml", [f"data_args.path={tiny_data}"])
    dm = EchoDataModule(cfg.data_args, 4, 0)
    assert dm.label_values("unit_labels") == [0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0]
