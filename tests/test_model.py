"""The network of the tiny config: mask conditioning, time scaling, and the ControlNet's initial copy."""

from pathlib import Path

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


def levels_that_see_time(config_path: str) -> set[int]:
    """UNet levels whose time projections move the output (UNet and ControlNet, every residual block), measured
    by the gradient of a fixed projection of the output on the config's network at a small size, its
    zero-initialised layers woken up; a level counts as blind below 1e-4 of the largest gradient (float32
    rounding leaves ~1e-5 of it where GroupNorm removes t exactly; a level that sees t has > 1e-2)."""
    from pathlib import Path

    cfg = load_config(config_path)
    levels = len(cfg.model_args.channels)
    torch.manual_seed(0)
    model = build_model(cfg.model_args, cfg.data_args.num_classes)
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    size = 2 ** (levels - 1) * (2 if cfg.model_args.spatial_dims == 2 else 4)
    shape = (1, 1) + (size,) * cfg.model_args.spatial_dims
    out = model(torch.randn(shape), torch.tensor([0.4]), torch.randint(0, cfg.data_args.num_classes, shape))
    (out * torch.randn_like(out)).sum().backward()
    grads = {}
    for name, module in model.named_modules():
        if name.endswith("time_emb_proj"):
            parts = Path(name.replace(".", "/")).parts
            if "down_blocks" in parts:
                level = int(parts[parts.index("down_blocks") + 1])
            elif "up_blocks" in parts:
                level = levels - 1 - int(parts[parts.index("up_blocks") + 1])
            else:
                level = levels - 1  # the middle block
            grads[level] = max(grads.get(level, 0.0), float(module.weight.grad.norm()))
    top = max(grads.values())
    return {level for level, g in grads.items() if g > 1e-4 * top}


UNET_CONFIGS = [p for p in sorted(Path("configs").glob("*.yaml")) if "spade" not in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("config", UNET_CONFIGS, ids=lambda p: p.name)
def test_which_levels_see_the_time_is_what_time_blind_levels_says(config):
    """Every shipped UNet config: the levels blind to t (measured) are exactly those of time_blind_levels, which
    the trainer's log names; only level 0 of the seed-sized networks (32 channels in 32 groups) is blind."""
    from utils.methods.networks import time_blind_levels

    cfg = load_config(config)
    blind = time_blind_levels(cfg.model_args)
    assert levels_that_see_time(str(config)) == set(range(len(cfg.model_args.channels))) - set(blind)
    assert blind in ([], [0])
    assert blind == ([0] if cfg.model_args.channels[0] == 32 and cfg.model_args.norm_num_groups == 32 else [])
