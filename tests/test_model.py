"""The network of the tiny config: mask conditioning, time scaling, and the ControlNet's initial copy."""

import pytest
import torch
from conftest import time_effect
from monai.networks.nets import controlnet as monai_controlnet
from monai.networks.nets import diffusion_model_unet as monai_unet

from utils.methods import load_config
from utils.methods.networks import build_model

NUM_CLASSES = 4


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml")
    assert cfg.data_args.num_classes == NUM_CLASSES
    return build_model(cfg.model_args, NUM_CLASSES).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 1, 32, 32, generator=g)
    t = torch.tensor([0.3, 0.8])
    mask_a = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    mask_a[:, :, 8:24, 8:24] = 1
    mask_b = torch.randint(0, NUM_CLASSES, (2, 1, 32, 32), generator=g, dtype=torch.uint8)
    return x_t, t, mask_a, mask_b


def _zero_initialised(model) -> list[str]:
    """ControlNet tensors that start at zero: the zero convolutions and the conditioning embedding's output."""
    return [k for k, v in model.controlnet.state_dict().items() if k.startswith(
        ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out."))]


def _perturb(module, names):
    params = dict(module.named_parameters())
    for i, name in enumerate(names):
        params[name].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(i))


def test_the_output_depends_on_the_mask_once_the_zero_convolutions_are_not_zero(model):
    x_t, t, mask_a, mask_b = _inputs()
    with torch.no_grad():
        # MONAI zero-initialises the UNet's output and residual-branch convolutions too: give them values,
        # as training would, so that the output is not zero whatever the mask
        _perturb(model.unet, [k for k, p in model.unet.named_parameters() if not p.any()])
        out_a = model(x_t, t, mask_a)
        assert out_a.abs().mean() > 1e-2
        # the ControlNet still adds exact zeros: at initialisation the mask changes nothing
        assert torch.equal(out_a, model(x_t, t, mask_b))
        _perturb(model.controlnet, _zero_initialised(model))
        out_a, out_b = model(x_t, t, mask_a), model(x_t, t, mask_b)
        assert (out_a - out_b).abs().mean() > 1e-2 * out_a.abs().mean()
        assert torch.equal(out_a, model(x_t, t, mask_a.clone()))  # and only on the mask: same mask, same output


def test_t_reaches_both_time_embeddings_as_t_times_999(model, monkeypatch):
    seen = {"unet": [], "controlnet": []}

    def recording(where, original):
        def embedding(timesteps, *args, **kwargs):
            seen[where].append(timesteps.detach().clone())
            return original(timesteps, *args, **kwargs)
        return embedding

    monkeypatch.setattr(monai_unet, "get_timestep_embedding",
                        recording("unet", monai_unet.get_timestep_embedding))
    monkeypatch.setattr(monai_controlnet, "get_timestep_embedding",
                        recording("controlnet", monai_controlnet.get_timestep_embedding))
    x_t, _, mask, _ = _inputs()
    with torch.no_grad():
        model(x_t, torch.tensor([0.5, 0.25]), mask)
    for where in ("unet", "controlnet"):
        assert len(seen[where]) == 1
        assert seen[where][0].tolist() == [499.5, 249.75]  # a float, not floored to a diffusion step


def test_the_controlnet_starts_as_an_exact_copy_of_the_unet_encoder(model):
    unet, control = model.unet.state_dict(), model.controlnet.state_dict()
    shared = sorted(set(unet) & set(control))
    assert all(unet[k].shape == control[k].shape for k in shared)
    assert len(shared) == 68  # tiny config: time embedding, conv_in, 2 down blocks, middle block
    copied = [k for k in control if k in unet and torch.equal(unet[k], control[k])]
    assert copied == [k for k in control if k in shared]  # every shared tensor, bitwise
    assert any(unet[k].abs().sum() > 0 for k in copied)  # a real copy, not two zero tensors
    only_control = set(control) - set(unet)
    assert all(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))
               for k in only_control)
    zero = set(_zero_initialised(model))
    assert zero <= only_control and len(zero) == 12  # 4 down-block convs and the mid conv (weight, bias), + conv_out
    assert all(not control[k].any() for k in zero)
    assert only_control - zero == {"controlnet_cond_embedding.conv_in.conv.weight",
                                   "controlnet_cond_embedding.conv_in.conv.bias"}


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/meddtfm_tiny.yaml"])
def test_the_tiny_networks_see_the_time(config):
    """A GroupNorm of one channel per group subtracts the time embedding added to that channel: the network
    would be blind to t, and every test of time dependence on the tiny configs vacuous."""
    assert time_effect(config) > 1e-3
    assert time_effect(config, ["model_args.norm_num_groups=8"]) < 1e-5
