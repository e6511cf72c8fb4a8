"""Med-DT-FM (shared/MED_DT_FM.md section 4): the bridged velocity field, the distillation term, the frozen
segmenter, the adversarial term under manual optimisation, reference-guided sampling, the configuration."""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import ROOT
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
from torch.utils.data import DataLoader

from losses.distillation import channel_moments, distillation_loss, standardise
from utils.config import ConfigError, ModelConfig, config_to_dict
from utils.methods import config_from_dict
from utils.methods.base import MethodSetupError
from utils.methods.med_dt_fm.bridged import BridgedVelocityField, bridge_channels
from utils.methods.med_dt_fm.module import MedDTFMModule, adversarial_weight
from utils.methods.med_dt_fm.ukan_training import encoder_statistics
from utils.methods.networks import TIME_SCALE
from utils.seeding import SampleNoise


def values(train_args: dict | None = None, **med_dt_fm_args) -> dict:
    with open(ROOT / "configs" / "meddtfm_tiny.yaml") as f:
        v = yaml.safe_load(f)
    v["train_args"].update(train_args or {})
    v["med_dt_fm_args"].update(med_dt_fm_args)
    return v


def module(train_args: dict | None = None, seed: int = 0, **med_dt_fm_args) -> MedDTFMModule:
    torch.manual_seed(seed)
    return MedDTFMModule(config_from_dict(values(train_args, **med_dt_fm_args)))


def randomise_zero_layers(net: BridgedVelocityField) -> None:
    """MONAI zero-initialises the UNet's ``out`` conv and the ControlNet's zero convolutions: v = 0 would make
    any comparison trivially exact."""
    g = torch.Generator().manual_seed(1)
    zeroed = [net.unet.out, net.controlnet.controlnet_mid_block, *net.controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for layer in zeroed:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def masks(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 4, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def batches(n: int, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x_1": torch.rand(1, size, size, generator=g) * 2 - 1,
             "mask": torch.randint(0, 4, (1, size, size), generator=g, dtype=torch.uint8),
             "index": torch.tensor(i), "patient": torch.tensor(i)} for i in range(n)]


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def fit(m, data: list[dict], batch_size: int, g_steps: int, callbacks=()):
    """``g_steps`` generator steps, set up the way trainer.py sets up a manual-optimisation method."""
    args = m.trainer_arguments(m.accumulate_grad_batches, g_steps)
    t = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=100, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks), **args)
    t.fit(m, train_dataloaders=DataLoader(data, batch_size=batch_size, shuffle=False))
    return t


# --- the bridged velocity field -------------------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "updown_and_attention"), [((8, 8, 8), False), ((8, 8, 8, 8, 8), False),
                                                                 ((8, 16, 16), True)])
def test_bridged_forward_equals_monai_at_init(channels, updown_and_attention):
    n = len(channels)
    cfg = ModelConfig(channels=channels, num_res_blocks=(1,) * n, num_head_channels=(8,) * n, norm_num_groups=8,
                      attention_levels=(False,) * (n - 1) + (updown_and_attention,),
                      resblock_updown=updown_and_attention, conditioning_embedding_num_channels=(8,))
    torch.manual_seed(0)
    net = BridgedVelocityField(cfg, 4, cond_channels=8).eval()
    randomise_zero_layers(net)
    x_t, t, mask = torch.randn(2, 1, 32, 32), torch.tensor([0.2, 0.9]), masks(2)
    with torch.no_grad():
        down, mid = net.controlnet(x=x_t, timesteps=t * TIME_SCALE, controlnet_cond=mask.float() / 3)
        monai = net.unet(x_t, t * TIME_SCALE, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        v, features = net.velocity_and_features(x_t, t, mask)
        assert monai.abs().max() > 0 and torch.equal(net(x_t, t, mask), monai) and torch.equal(v, monai)
        assert len(features) == 4
        torch.nn.init.normal_(net.bridges[2].zero.weight)  # a trained bridge changes the output
        assert not torch.equal(net(x_t, t, mask), monai)


def test_without_the_controlnet_the_bridges_alone_carry_the_mask():
    """med_dt_fm_args.use_controlnet false: no ControlNet, and the mask reaches v only through the bridges (with
    their zero convolutions still zero, v ignores the mask; woken, it does not)."""
    m = module(use_controlnet=False)
    net = m.model
    assert net.controlnet is None and "ControlNet" not in m.parameter_counts() and "without" in m.describe()
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 0.7])
    a, b = masks(2, seed=1), masks(2, seed=2)
    with torch.no_grad():
        torch.nn.init.normal_(net.unet.out[2].conv.weight, std=0.1)  # MONAI zero-initialises the output conv
        assert torch.equal(net.velocity_and_features(x, t, a)[0], net.velocity_and_features(x, t, b)[0])
        for bridge in net.bridges:
            torch.nn.init.normal_(bridge.zero.weight, std=0.1)
        assert not torch.allclose(net.velocity_and_features(x, t, a)[0], net.velocity_and_features(x, t, b)[0])
    out = m.losses({"x_1": torch.rand(4, 1, 32, 32) * 2 - 1, "mask": masks()}, 0)
    out.generator.backward()
    assert all(p.grad is not None for p in net.bridges.parameters())


def test_bridged_field_needs_three_levels():
    cfg = ModelConfig(channels=(8, 8), num_res_blocks=(1, 1), attention_levels=(False, False),
                      num_head_channels=(8, 8), norm_num_groups=8)
    with pytest.raises(ValueError, match=">= 3 UNet levels"):
        BridgedVelocityField(cfg, 4, 8)


def test_feature_shapes():
    m = module()
    x_t, t, mask = torch.randn(2, 1, 32, 32), torch.rand(2), masks(2)
    with torch.no_grad():
        _, features = m.model.velocity_and_features(x_t, t, mask)
        targets = m.distillation_targets(x_t, [0, 1, 2, 3])
        projections = m.heads(features, {i: targets[i].shape[-2:] for i in range(4)})
    # 3-level UNet at 32 px: bottleneck 8x8, then the up blocks at 16, 32, 32
    assert [tuple(f.shape) for f in features] == [(2, 8, 8, 8), (2, 8, 16, 16), (2, 8, 32, 32), (2, 8, 32, 32)]
    assert bridge_channels((32, 64, 128, 256, 512)) == [512, 512, 256, 128]
    # U-KAN [16, 24, 32] stages 4, 3, 2, 1 at 32 px: 24 x 2^2, 16 x 4^2, 4 x 8^2, 2 x 16^2 (pooled down to them)
    expected = [(2, 24, 2, 2), (2, 16, 4, 4), (2, 4, 8, 8), (2, 2, 16, 16)]
    assert [tuple(projections[i].shape) for i in range(4)] == [tuple(targets[i].shape) for i in range(4)] == expected
    # and a target larger than its bridge's map is reached by bilinear upsampling
    assert list(m.heads(features, {0: (16, 16)})) == [0] and m.heads(features, {0: (16, 16)})[0].shape == (
        2, 24, 16, 16)


# --- distillation -------------------------------------------------------------------------------------------------
def test_distillation_zero_when_match():
    torch.manual_seed(0)
    projections = {i: torch.randn(2, 3, 4, 4, requires_grad=True) for i in range(4)}
    targets = {i: p.detach().clone() for i, p in projections.items()}
    weights = (0.25, 0.5, 1.0, 2.0)
    total, terms = distillation_loss(projections, targets, weights)
    assert total.item() == 0.0 and all(term.item() == 0.0 for term in terms.values())
    targets[2] = targets[2] + 1.0  # one level off by one everywhere: only its term, weighted, moves
    total, terms = distillation_loss(projections, targets, weights)
    assert [terms[i].item() for i in range(4)] == [0.0, 0.0, 1.0, 0.0] and total.item() == 1.0
    doubled, _ = distillation_loss(projections, targets, tuple(2 * w for w in weights))
    assert doubled.item() == 2 * total.item()


def test_distillation_gradient_reaches_the_generator_and_not_the_encoder():
    m = module(alpha=0.0)
    out = m.losses({"x_1": torch.rand(4, 1, 32, 32) * 2 - 1, "mask": masks()}, 0)
    assert out.logs["train/dt_loss"] > 0
    out.generator.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.heads.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.bridges.parameters())
    assert all(p.grad is None for p in m.encoder.parameters())


def test_distillation_targets_from_clean_image(monkeypatch):
    m = module(alpha=0.0)
    seen = []
    original = m.encoder.encode
    monkeypatch.setattr(m.encoder, "encode", lambda x, stages=5: seen.append(x.clone()) or original(x, stages))
    x_1 = torch.rand(4, 1, 32, 32) * 2 - 1
    m.losses({"x_1": x_1, "mask": masks()}, 0)
    assert len(seen) == 1 and torch.equal(seen[0], x_1)


def test_feature_stats():
    torch.manual_seed(0)
    m = module()
    x_1 = torch.rand(12, 1, 32, 32) * 2 - 1
    stats = encoder_statistics(m.encoder, x_1, [4, 3, 2, 1], batch_size=5)  # batches of 5, 5, 2
    for stage, (mean, std) in stats.items():
        f = standardise(m.encoder.encode(x_1, stages=stage)[stage - 1].detach(), mean, std)
        live = std > 1e-6  # a channel constant on the set (a dead ReLU) stays constant: 0 after standardising
        assert live.sum() >= f.shape[1] // 2
        torch.testing.assert_close(f.mean(dim=(0, 2, 3)), torch.zeros(f.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(f.std(dim=(0, 2, 3), unbiased=False)[live], torch.ones(int(live.sum())),
                                   atol=1e-3, rtol=0)
    mean, std = channel_moments([torch.ones(2, 3, 4, 4)])  # a constant channel does not divide by zero
    assert torch.equal(mean, torch.ones(3)) and torch.equal(std, torch.full((3,), 1e-6))


def test_velocity_to_target_recovers_x1():
    path = AffineProbPath(scheduler=CondOTScheduler())
    g = torch.Generator().manual_seed(0)
    x_0, x_1, t = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g), torch.rand(5, generator=g)
    ps = path.sample(x_0=x_0, x_1=x_1, t=t)
    x1_hat = path.velocity_to_target(ps.dx_t, ps.x_t, t.view(-1, 1, 1, 1))
    torch.testing.assert_close(x1_hat, x_1, atol=1e-6, rtol=0)
    torch.testing.assert_close(x1_hat, ps.x_t + (1 - t.view(-1, 1, 1, 1)) * ps.dx_t, atol=1e-6, rtol=0)


# --- the frozen segmenter -------------------------------------------------------------------------------------------
def test_segmenter_frozen():
    m = module({"ema_decay": 0.5}, adv_start_fraction=0.0)
    m.train()
    assert not m.encoder.training and all(not p.requires_grad for p in m.encoder.parameters())
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    fit(m, batches(4), 4, 1)
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in before.items())  # BN statistics included
    assert all(p.grad is None for p in m.encoder.parameters())
    g_opt, d_opt = m.trainer.optimizers
    encoder = {id(p) for p in m.encoder.parameters()}
    trained = {id(p) for opt in (g_opt, d_opt) for group in opt.param_groups for p in group["params"]}
    assert not encoder & trained and {id(p) for p in m.heads.parameters()} <= trained
    assert not any(k.startswith("encoder") for k in m.ema.module.state_dict())  # the EMA holds the velocity field


# --- the adversarial term and manual optimisation ----------------------------------------------------------------
def test_patch_discriminator_layout():
    from utils.methods.adversarial import PatchDiscriminator

    d = PatchDiscriminator(1 + 4, 64, 3)  # pix2pix's NLayerDiscriminator widths on [image, one-hot of 4 labels]
    assert sum(p.numel() for p in d.parameters()) == 2_766_785
    convs = [*d.layers, d.head]
    assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)  # spectral norm everywhere
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in d.modules())
    logits, features = PatchDiscriminator(5, 8, 3)(torch.randn(2, 5, 64, 64))
    assert [tuple(x.shape) for x in logits] == [(2, 1, 6, 6)] and len(features) == 1 and len(features[0]) == 4


def test_adversarial_weight_schedule():
    assert [adversarial_weight(0.1, 2, 2, e) for e in range(5)] == [0.0, 0.0, 0.05, 0.1, 0.1]
    assert adversarial_weight(0.0, 0, 1, 9) == 0.0
    assert module({"max_epochs": 10}, adv_start_fraction=0.25).adversarial_start_epoch() == 3


@pytest.mark.parametrize("max_steps,expected", [(6, [0, 0, 0, 0.025, 0.05, 0.075, 0.1]), (-1, [0.0] * 7)])
def test_a_run_that_max_steps_ends_turns_the_adversarial_term_on(max_steps, expected):
    """10 epochs of 4 generator steps would start the term at epoch 5; a run ended by max_steps 6 (1.5 epochs)
    must start it after half of its 6 steps instead, and ramp over one epoch's worth (4) of steps."""
    from types import SimpleNamespace

    m = module({"max_epochs": 10, "max_steps": max_steps}, alpha=0.1, adv_start_fraction=0.5, adv_ramp_epochs=1)
    weights = []
    for step in range(7):
        m._trainer = SimpleNamespace(num_training_batches=4, global_step=2 * step, current_epoch=step // 4)
        now, start, ramp = m.adversarial_schedule()
        weights.append(adversarial_weight(0.1, start, ramp, now))
    assert weights == pytest.approx(expected)


class DCalls:
    def __init__(self, m):
        self.n = 0
        original = m.discriminator.forward

        def counted(x):
            self.n += 1
            return original(x)

        m.discriminator.forward = counted


def fixed_draws(t: torch.Tensor):
    return lambda batch, batch_idx: (t, torch.randn(batch["x_1"].shape, generator=torch.Generator().manual_seed(3)))


def test_adv_only_late_t_and_after_warmup(monkeypatch):
    batch = {"x_1": torch.rand(4, 1, 32, 32) * 2 - 1, "mask": masks()}
    m = module(adv_start_fraction=0.0)
    calls = DCalls(m)
    monkeypatch.setattr(m, "training_draws", fixed_draws(torch.tensor([0.1, 0.2, 0.3, 0.49])))
    out = m.losses(batch, 0)
    assert calls.n == 0 and out.discriminator.item() == 0 and "train/g_adv" not in out.logs
    monkeypatch.setattr(m, "training_draws", fixed_draws(torch.tensor([0.1, 0.7, 0.3, 0.9])))
    seen = []
    original = m.adversarial_terms
    monkeypatch.setattr(m, "adversarial_terms",
                        lambda real, fake, cond: seen.append(real) or original(real, fake, cond))
    out = m.losses(batch, 0)
    assert calls.n == 3 and out.discriminator.item() > 0 and out.logs["train/adv_weight"] == 0.05
    assert torch.equal(seen[0], batch["x_1"][[1, 3]])  # the t >= 0.5 samples only
    late = module({"max_epochs": 4}, adv_start_fraction=0.5)  # epoch 0 < start epoch 2
    calls = DCalls(late)
    monkeypatch.setattr(late, "training_draws", fixed_draws(torch.tensor([0.6, 0.7, 0.8, 0.9])))
    assert late.losses(batch, 0).logs["train/adv_weight"] == 0 and calls.n == 0


def test_no_dt_no_adv_is_plain_flow_matching(monkeypatch):
    from utils.methods.flow_matching.module import FlowMatchingModule

    m = module(alpha=0.0, lambdas=[0.0, 0.0, 0.0, 0.0])
    randomise_zero_layers(m.model)
    fm_values = values()
    for section in ("med_dt_fm_args", "ukan_args"):
        fm_values.pop(section)
    fm_values.update(method="flow_matching", prior_args={"alpha": 0.0}, contrastive_args={"weight": 0.0})
    plain = FlowMatchingModule(config_from_dict(fm_values), [0.0] * 4)
    plain.model.load_state_dict(m.model.state_dict(), strict=False)  # the UNet and ControlNet
    x_1, mask = torch.rand(4, 1, 32, 32) * 2 - 1, masks()
    t, x_0 = fixed_draws(torch.rand(4, generator=torch.Generator().manual_seed(2)))({"x_1": x_1}, 0)
    monkeypatch.setattr(m, "training_draws", lambda batch, batch_idx: (t, x_0))
    out = m.losses({"x_1": x_1, "mask": mask}, 0)
    expected, *_ = plain.flow_matching_loss(plain.model, x_1, mask, x_0, t)
    assert expected > 0 and torch.equal(out.generator, expected) and set(out.logs) == {
        "train/fm_loss", "train/adv_weight", "train/loss"}


class Recorder(pl.Callback):
    def __init__(self):
        self.calls = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        g, d = pl_module.model, pl_module.discriminator
        which = "G" if optimizer is trainer.optimizers[0] else "D"
        self.calls.append((which, params(g), params(d), params(pl_module.heads)))


def test_d_step_changes_only_d_and_g_step_only_g():
    m, rec = module(adv_start_fraction=0.0), Recorder()
    start_g, start_d, start_h = params(m.model), params(m.discriminator), params(m.heads)
    fit(m, batches(4), 4, 1, callbacks=[rec])
    (w1, g1, d1, h1), (w2, g2, d2, h2) = rec.calls
    assert (w1, w2) == ("G", "D") and same(g1, start_g) and same(d1, start_d)
    assert not same(g2, start_g) and not same(h2, start_h) and same(d2, start_d)  # the G step left D alone
    assert same(params(m.model), g2) and not same(params(m.discriminator), start_d)  # the D step left G alone


def test_manual_optimization_accumulation(monkeypatch):
    """alpha = 0 (the t >= 0.5 selection and spectral norm's power iterations make the adversarial part
    batch-dependent): k micro-batches give the G update of one k-times-larger batch, the same draws per image."""
    g = torch.Generator().manual_seed(5)
    draws_t, draws_x0 = torch.rand(4, generator=g), torch.randn(4, 1, 32, 32, generator=g)
    runs = {}
    for name, batch, k in (("large", 4, 1), ("accumulated", 2, 2)):
        m = module({"gradient_clip_val": 1e-3}, alpha=0.0)
        assert m.trainer_arguments(k, 1) == {"accumulate_grad_batches": 1, "gradient_clip_val": None, "max_steps": 2}
        monkeypatch.setattr(m, "training_draws", lambda b, i: (draws_t[b["index"]], draws_x0[b["index"]]))
        clips = []
        original = m.clip_gradients
        monkeypatch.setattr(m, "clip_gradients",
                            lambda opt, clips=clips, original=original, **kw: clips.append(kw) or original(opt, **kw))
        fit(m, batches(4), batch, 1)
        runs[name] = (params(m.model) + params(m.heads), clips)
    (a, clips_a), (b, clips_b) = runs["large"], runs["accumulated"]
    assert len(clips_a) == len(clips_b) == 2  # once per optimizer step (G, D), not per micro-batch
    assert not same(a, params(module(alpha=0.0).model) + params(module(alpha=0.0).heads))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_generator_step_counter():
    m = module({"ema_decay": 0.5}, adv_start_fraction=0.0)
    fit(m, batches(8), 2, 3)
    assert m.global_step == 6 and m.generator_steps() == 3  # D steps count in Lightning's global_step
    assert int(m.ema.n_averaged) == 3 and m.trainer_max_steps(3) == 6


# --- stage 0 ---------------------------------------------------------------------------------------------------------
class Split:
    def __init__(self, x_1, mask):
        self.x_1, self.mask = x_1, mask


def phantom(n: int, seed: int) -> Split:
    """Discs of label 1 (bright) with a label 2 ring (dark) on noise: a segmenter learns them in a few steps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    masks_, images = [], []
    for _ in range(n):
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([12, 12, 4]) + torch.tensor([10, 10, 4])).tolist()
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        mask = torch.zeros(32, 32, dtype=torch.uint8)
        mask[d < r + 3] = 2
        mask[d < r] = 1
        image = torch.randn(32, 32, generator=g) * 0.1 + torch.tensor([-0.5, 0.8, -0.9, 0.0])[mask.long()]
        masks_.append(mask[None])
        images.append(image[None])
    return Split(torch.stack(images), torch.stack(masks_))


def with_ukan_args(m: MedDTFMModule, **changes) -> MedDTFMModule:
    plain = config_to_dict(m.cfg)
    m.cfg = config_from_dict({**plain, "ukan_args": {**plain["ukan_args"], **changes}})
    return m


def test_segmenter_pretrain_learns_and_uses_the_train_split(monkeypatch):
    import utils.methods.med_dt_fm.module as med

    m = with_ukan_args(module(), steps=60, lr=1e-2)
    train, val = phantom(16, 0), phantom(8, 1)
    seen, original = [], med.train_ukan
    monkeypatch.setattr(med, "train_ukan", lambda x_1, mask, *a, **k: seen.append((x_1, mask)) or
                        original(x_1, mask, *a, **k))
    dice = m.pretrain_segmenter(train, val, progress=False)
    assert len(seen) == 1 and seen[0][0] is train.x_1 and seen[0][1] is train.mask  # the training split only
    assert dice > 0.5 and float(m.segmenter_val_dice) == pytest.approx(dice)  # all-background scores 0
    assert not torch.equal(m.feature_std_1, torch.ones_like(m.feature_std_1))  # statistics measured


def test_segmenter_below_threshold_stops_the_run():
    m = with_ukan_args(module(), steps=1, min_val_dice=0.99)
    with pytest.raises(MethodSetupError, match=r"validation foreground Dice of .* below ukan_args.min_val_dice"):
        m.pretrain_segmenter(phantom(8, 0), phantom(4, 1), progress=False)


def test_stage_0_runs_for_a_new_run_only(monkeypatch, tmp_path):
    class Data:
        train_set, val_set = phantom(4, 0), phantom(2, 1)

    ran = []
    monkeypatch.setattr(MedDTFMModule, "pretrain_segmenter", lambda self, train, val: ran.append(train))
    config = config_from_dict({**values(), "output_dir": str(tmp_path)})
    MedDTFMModule.for_data(config, Data())
    assert ran == [Data.train_set]
    (tmp_path / "meddtfm_tiny").mkdir()
    (tmp_path / "meddtfm_tiny" / "last.ckpt").touch()  # a resumed run: its checkpoint holds the segmenter
    MedDTFMModule.for_data(config, Data())
    no_dt = config_from_dict({**values(lambdas=[0, 0, 0, 0]), "run_name": "no_dt", "output_dir": str(tmp_path)})
    MedDTFMModule.for_data(no_dt, Data())  # nothing reads the segmenter's features
    assert len(ran) == 1


# Runs trainer.main as Lightning's launcher re-runs it in each process, recording which ranks trained stage 0 and
# each rank's segmenter and feature statistics at the end of training.
STAGE0_DRIVER = """
import sys
import torch
sys.path.insert(0, {root!r})
import trainer
from utils.distributed import launch_rank
from utils.methods.med_dt_fm import module

out, original_train, original_end = {out!r}, module.train_ukan, module.MedDTFMModule.on_train_end


def train_ukan(*args, **kwargs):
    open(f"{{out}}/stage0_rank{{launch_rank()}}", "w").close()
    return original_train(*args, **kwargs)


def on_train_end(self):
    original_end(self)
    state = {{k: v for k, v in self.state_dict().items() if k.startswith(("encoder.", "feature_", "segmenter_"))}}
    torch.save(state, f"{{out}}/state_rank{{self.global_rank}}.pt")


module.train_ukan, module.MedDTFMModule.on_train_end = train_ukan, on_train_end
sys.exit(trainer.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_train_stage_0_once_and_end_with_rank_0s_segmenter(tmp_path, tiny_data):
    driver = tmp_path / "driver.py"
    driver.write_text(STAGE0_DRIVER.format(root=str(ROOT), out=str(tmp_path)))
    sets = {"data_args.path": tiny_data, "output_dir": tmp_path / "runs", "train_args.devices": 2,
            "train_args.accelerator": "cpu", "train_args.max_epochs": 1, "train_args.effective_batch_size": 8}
    cmd = [sys.executable, str(driver), "--config_path", str(ROOT / "configs" / "meddtfm_tiny.yaml")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("stage0_rank*")) == ["stage0_rank0"]
    rank_0, rank_1 = (torch.load(tmp_path / f"state_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank_0.keys() == rank_1.keys() and any(k.startswith("feature_mean") for k in rank_0)
    for key in rank_0:
        torch.testing.assert_close(rank_0[key], rank_1[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert float(rank_1["segmenter_val_dice"]) == float(rank_1["segmenter_val_dice"])  # measured (not NaN)


# --- reference-guided sampling ------------------------------------------------------------------------------------
def test_reference_endpoints():
    m = module().eval()
    randomise_zero_layers(m.model)
    mask, noise = masks(2), SampleNoise(torch.arange(2), 0, (1, 32, 32))
    reference = torch.rand(2, 1, 32, 32) * 2 - 1
    calls = []
    m.model.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        plain = m.generate(mask, noise, 10, "euler")
        assert len(calls) == 10 and m.nfe(10, "euler") == 10
        calls.clear()
        assert torch.equal(m.generate_from_reference(mask, reference, noise, 10, "euler", 0.0), plain)
        calls.clear()
        out = m.generate_from_reference(mask, reference, noise, 10, "euler", 1.0)
        assert torch.equal(out, ((reference + 1) / 2).clamp(0, 1)) and not calls and m.nfe(10, "euler", 1.0) == 0
        for t0, steps in ((0.3, 7), (0.5, 5), (0.75, 2), (0.96, 0)):
            calls.clear()
            m.generate_from_reference(mask, reference, noise, 10, "midpoint", t0)
            assert len(calls) == 2 * steps == m.nfe(10, "midpoint", t0)


def test_feature_guidance_mechanics():
    """Experimental and off by default. Not asserted: that it brings samples closer to the reference (in the
    design note's prototype it did the opposite)."""
    m = module().eval()
    randomise_zero_layers(m.model)
    mask, noise = masks(2), SampleNoise(torch.arange(2), 0, (1, 32, 32))
    reference = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.inference_mode():
        plain = m.generate_from_reference(mask, reference, noise, 4, "euler", 0.5)
        zero = m.generate_from_reference(mask, reference, noise, 4, "euler", 0.5, feature_guidance=0.0)
        guided = m.generate_from_reference(mask, reference, noise, 4, "euler", 0.5, feature_guidance=0.5)
        again = m.generate_from_reference(mask, reference, noise, 4, "euler", 0.5, feature_guidance=0.5)
    assert torch.equal(zero, plain) and torch.equal(guided, again) and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-4


def test_bf16_weights_and_low_precision_norms_reach_the_bridges_and_feature_guidance():
    """sampling_args.precision bf16-true samples Med-DT-FM (feature guidance included: its gradient goes through
    the cast) within 1e-2 of fp32; model_args.low_precision_norm swaps the bridges' GroupNorms too."""
    from utils.generation.generate import sampling_copy
    from utils.methods.networks import InputDtypeGroupNorm

    v = values()
    v["model_args"]["low_precision_norm"] = True
    v["train_args"]["precision"] = "bf16-mixed"
    norms = [type(n) for n in MedDTFMModule(config_from_dict(v)).model.bridges.modules()
             if isinstance(n, torch.nn.GroupNorm)]
    assert norms and set(norms) == {InputDtypeGroupNorm}
    m = module().eval()
    randomise_zero_layers(m.model)
    v = values()
    v["sampling_args"]["precision"] = "bf16-true"
    fast = MedDTFMModule(config_from_dict(v)).eval()
    fast.load_state_dict(m.state_dict())
    copy = sampling_copy(fast, "cpu")
    assert next(copy.model.parameters()).dtype is torch.bfloat16
    mask, noise = masks(2), SampleNoise(torch.arange(2), 0, (1, 32, 32))
    reference = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        ref = m.generate_from_reference(mask, reference, noise, 4, "euler", 0.5, feature_guidance=0.5)
        got = copy.generate_from_reference(mask, reference, noise, 4, "euler", 0.5, feature_guidance=0.5)
    assert got.dtype == torch.float32 and 0 < (got - ref).abs().max() <= 1e-2


# --- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "message"), [
    ("med_dt_fm_args.lambdas", [1, 1, 1], r"med_dt_fm_args.lambdas must be 4 weights >= 0"),
    ("med_dt_fm_args.lambdas", [1, 1, 1, -1], r"med_dt_fm_args.lambdas must be 4 weights >= 0"),
    ("med_dt_fm_args.levels", [4, 3, 2, 6], r"med_dt_fm_args.levels must be 4 U-KAN stages in 1..5"),
    ("med_dt_fm_args.alpha", -0.1, r"med_dt_fm_args.alpha must be >= 0"),
    ("med_dt_fm_args.t_adv_min", 1.0, r"med_dt_fm_args.t_adv_min must be in \[0, 1\)"),
    ("med_dt_fm_args.reference_t0", 1.5, r"med_dt_fm_args.reference_t0 must be in \[0, 1\]"),
    ("ukan_args.kind", "kan", r"ukan_args.kind must be one of \['ukan', 'ukan_mlp', 'cnn'\]"),
    ("ukan_args.widths", [12, 16, 32], r"ukan_args.widths must be 3 widths"),
    ("ukan_args.min_val_dice", 2, r"ukan_args.min_val_dice must be in \[0, 1\]"),
    ("med_dt_fm_args.lamdas", [1, 1, 1, 1], r"unknown key med_dt_fm_args.lamdas"),
])
def test_config_validation(key, value, message):
    v = values()
    section, name = key.split(".")
    v[section][name] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(v)


def test_config_validation_of_the_network_and_sections():
    v = values()
    v["model_args"].update(channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False],
                           num_head_channels=[8, 8])
    with pytest.raises(ConfigError, match=r"model_args.channels needs >= 3 UNet levels for method med_dt_fm"):
        config_from_dict(v)
    v = values()
    v["data_args"].update(image_size=48, synthetic={"size": 48, "patients": [4, 2, 2], "seed": 0})
    with pytest.raises(ConfigError, match=r"data_args.image_size must be divisible by 32 for the U-KAN"):
        config_from_dict(v)
    with pytest.raises(ConfigError, match=r"med_dt_fm_args belongs to method med_dt_fm"):
        config_from_dict({**values(), "method": "flow_matching"})
    cfg = config_from_dict({k: v for k, v in values().items() if k not in ("med_dt_fm_args", "ukan_args")})
    assert cfg.med_dt_fm_args.lambdas == (0.25,) * 4 and cfg.ukan_args.widths == (128, 160, 256)
    assert cfg.sampling_args.sampler == "euler"
