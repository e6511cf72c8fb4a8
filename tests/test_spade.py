"""The SPADE baseline and the adversarial machinery (manual optimisation) it shares with later methods."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.utils.parametrize as parametrize
import yaml
from conftest import ROOT, tiny_overrides
from torch.utils.data import DataLoader

import trainer
from losses.adversarial import feature_matching_loss, hinge_discriminator_loss, hinge_generator_loss, kl_divergence
from utils.config import ConfigError
from utils.methods import config_from_dict
from utils.methods.adversarial import one_hot
from utils.methods.spade.module import SpadeModule
from utils.seeding import SampleNoise

SPADE_ARGS = {"channels": [8, 16], "hidden_channels": 8, "d_channels": 8, "d_num": 1, "d_num_layers": 3}


def spade_values(train_args: dict | None = None, **spade_args) -> dict:
    """configs/tiny.yaml's data and budget with method spade and a tiny generator and discriminator."""
    with open(ROOT / "configs" / "tiny.yaml") as f:
        values = yaml.safe_load(f)
    for section in ("prior_args", "contrastive_args"):
        values.pop(section)
    values["sampling_args"].pop("sampler")
    values["train_args"].update(train_args or {})
    values.update(method="spade", spade_args={**SPADE_ARGS, **spade_args})
    return values


def spade_module(train_args: dict | None = None, **spade_args) -> SpadeModule:
    return SpadeModule(config_from_dict(spade_values(train_args, **spade_args)))


def spade_yaml(tmp_path, **spade_args):
    path = tmp_path / "spade_tiny.yaml"
    path.write_text(yaml.safe_dump(spade_values(**spade_args)))
    return path


def masks(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 4, (n, 1, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def batches(n: int, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x_1": torch.rand(1, size, size, generator=g) * 2 - 1,
             "mask": torch.randint(0, 4, (1, size, size), generator=g, dtype=torch.uint8),
             "index": torch.tensor(i), "patient": torch.tensor(i)} for i in range(n)]


def fit(module, data: list[dict], batch_size: int, g_steps: int, precision="32-true", callbacks=()):
    """Train ``g_steps`` generator steps the way trainer.py sets up a manual-optimisation method."""
    t = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=module.trainer_max_steps(g_steps),
                   accumulate_grad_batches=1, gradient_clip_val=None, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   num_sanity_val_steps=0, callbacks=list(callbacks))
    t.fit(module, train_dataloaders=DataLoader(data, batch_size=batch_size, shuffle=False))
    return t


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --- losses ---------------------------------------------------------------------------------------------------
def normalised_convs(net: torch.nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if parametrize.is_parametrized(m, "weight")]


def convs(net: torch.nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("discriminator,d_num,d_num_layers", [("spade", 1, 3), ("spade", 2, 4), ("monai", 1, 3),
                                                               ("monai", 2, 1)])
def test_spectral_norm_sits_where_spades_code_puts_it(discriminator, d_num, d_num_layers):
    """NVlabs/SPADE: G normalises every residual-block conv but not the SPADE modulation convs, the first layer
    or the output conv; each D every conv but its first and its last. Counted here from the networks' structure."""
    module = spade_module(discriminator=discriminator, d_num=d_num, d_num_layers=d_num_layers)
    g, d = module.model, module.discriminator
    modulation = [n for n in convs(g) if ".norm_" in n]  # SPADE's mlp_shared, mlp_gamma, mlp_beta
    blocks = g.decoder.blocks
    block_convs = 2 * len(blocks) + sum(hasattr(b, "conv_s") for b in blocks)  # a shortcut conv where widths change
    assert len(blocks) == len(SPADE_ARGS["channels"]) and block_convs == 2 * len(blocks) + 1  # the last keeps 8
    assert len(modulation) == 3 * block_convs  # a SPADE layer of 3 convs before each block conv
    assert len(normalised_convs(g)) == len(convs(g)) - len(modulation) - 2 == block_convs
    assert not any(".norm_" in n for n in normalised_convs(g))
    layers = d_num_layers * d_num if discriminator == "spade" else d_num_layers * d_num * (d_num + 1) // 2
    assert len(normalised_convs(d)) == len(convs(d)) - 2 * d_num == layers - d_num * (discriminator == "spade")
    plain = spade_module(spectral_norm=False)
    assert not normalised_convs(plain.model) and not normalised_convs(plain.discriminator)


def test_a_normalised_convolution_has_largest_singular_value_one():
    module = spade_module().train()
    x = torch.randn(2, 1, 32, 32)
    cond = one_hot(masks(2), 4)
    for _ in range(200):  # each training forward is one power iteration
        module.discriminator(torch.cat([x, cond], 1))
        module.model.decode(cond, None)
    for net in (module.model, module.discriminator):
        assert normalised_convs(net)
        for name in normalised_convs(net):
            weight = net.get_submodule(name).weight
            sigma = torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2)
            assert abs(float(sigma) - 1) < 1e-3, name


def test_an_averaged_copy_normalises_with_the_trained_networks_power_iteration():
    """The EMA copy makes images in eval mode, where spectral norm does not iterate: without the trained network's
    (u, v), which the EMA update copies with the other buffers, it would divide its weights by a sigma estimated for
    the weights it was copied from."""
    from torch.nn.utils.parametrizations import spectral_norm
    from torch.optim.swa_utils import AveragedModel

    from utils.methods.base import update_ema

    torch.manual_seed(0)
    live = spectral_norm(torch.nn.Conv2d(8, 16, 3))
    average = AveragedModel(live)
    update_ema(average, live, 0.0)  # the first update copies
    with torch.no_grad():
        live.parametrizations.weight.original.copy_(torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 3, 16)[:, None,
                                                                                                     None, None])
    live.train()
    for _ in range(100):
        live(torch.randn(1, 8, 5, 5))
    average.module.eval()

    def sigma():
        return float(torch.linalg.matrix_norm(average.module.weight.detach().flatten(1), ord=2))

    with torch.no_grad():
        average.module.parametrizations.weight.original.copy_(live.parametrizations.weight.original)
    assert abs(sigma() - 1) > 0.05  # the vectors it was copied with are stale
    update_ema(average, live, 0.0)
    assert abs(sigma() - 1) < 1e-3


def test_hinge_losses_at_known_logits():
    real, fake = [torch.tensor([2.0, 0.5]), torch.tensor([-3.0])], [torch.tensor([-2.0, 0.5]), torch.tensor([1.0])]
    # D: scale 0: relu(1-2), relu(1-0.5) -> 0.25; relu(1-2), relu(1.5) -> 0.75; scale 1: 4 + 2; mean of 1 and 6
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(3.5)
    assert hinge_generator_loss(fake).item() == pytest.approx(((2.0 - 0.5) / 2 - 1.0) / 2)  # mean_d(-mean D)


def test_feature_matching_and_kl():
    feats = [[torch.ones(2, 3), torch.zeros(2, 2)], [torch.ones(2, 1)]]
    assert feature_matching_loss(feats, feats).item() == 0
    shifted = [[f + 1 for f in fd] for fd in feats]
    assert feature_matching_loss(shifted, feats).item() == pytest.approx((2 + 1) / 2)  # mean_d sum_l L1
    assert kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0
    assert kl_divergence(torch.ones(3, 5), torch.zeros(3, 5)).item() == pytest.approx(0.5 * 5)


# --- the generator ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_vae", [False, True])
def test_generated_images_depend_on_the_mask_and_are_in_unit_range(is_vae):
    torch.manual_seed(0)
    module = spade_module(is_vae=is_vae, z_dim=16).eval()
    noise = SampleNoise(torch.arange(2), 0, (1, 32, 32))
    m = masks()
    with torch.inference_mode():
        a = module.generate(m, noise, 10, "generator")
        b = module.generate(torch.flip(m, dims=[0]), noise, 10, "generator")
        again = module.generate(m, noise, 1, "generator")
    assert a.shape == (2, 1, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # each sample changes with its mask
    assert torch.equal(a, again) and module.nfe(10, "generator") == 1
    with torch.inference_mode():  # tanh output: [-1, 1] before to_unit's clamp, nothing lost to clamping
        raw = module.synthesise(module.model, m, noise.initial())
    assert raw.abs().max() < 1


def test_vae_latent_comes_from_the_sample_noise():
    torch.manual_seed(0)
    module = spade_module(is_vae=True, z_dim=16).eval()
    m = masks()
    with torch.inference_mode():
        a = module.generate(m, SampleNoise(torch.arange(2), 0, (1, 32, 32)), 1, "generator")
        b = module.generate(m, SampleNoise(torch.arange(2), 1, (1, 32, 32)), 1, "generator")
    assert not torch.equal(a, b)


# --- the adversarial step ---------------------------------------------------------------------------------------
def test_each_loss_reaches_only_its_own_network():
    torch.manual_seed(0)
    module = spade_module()
    x_1, cond = torch.rand(2, 1, 32, 32) * 2 - 1, torch.nn.functional.one_hot(masks()[:, 0].long(), 4)
    cond = cond.permute(0, 3, 1, 2).float()
    terms = module.adversarial_terms(x_1, module.model.decode(cond), cond)
    (terms.generator + terms.feature_matching).backward(retain_graph=True)
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    module.model.zero_grad(set_to_none=True)
    terms.discriminator.backward()
    assert all(p.grad is None for p in module.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.discriminator.parameters())


class Recorder(pl.Callback):
    """At each optimizer step (after clipping, before the update): which optimizer, both networks' gradients
    and parameters."""

    def __init__(self):
        self.calls = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        g, d = pl_module.model, pl_module.discriminator
        which = "G" if optimizer.param_groups[0]["params"][0] is next(g.parameters()) else "D"
        norm = lambda net: sum(p.grad.norm() ** 2 for p in net.parameters() if p.grad is not None) ** 0.5  # noqa: E731
        self.calls.append((which, norm(g), norm(d), params(g), params(d)))


def test_one_step_trains_both_networks_and_each_step_moves_only_its_own():
    torch.manual_seed(0)
    module, rec = spade_module(alternating=False), Recorder()
    start_g, start_d = params(module.model), params(module.discriminator)
    fit(module, batches(4), 4, 1, callbacks=[rec])
    (w1, g1, d1, g_at_1, d_at_1), (w2, _, _, g_at_2, d_at_2) = rec.calls
    assert (w1, w2) == ("G", "D") and g1 > 0 and d1 > 0  # one backward gave both their gradients
    assert same(g_at_1, start_g) and same(d_at_1, start_d)
    assert not same(g_at_2, start_g) and same(d_at_2, start_d)  # the G step left D alone
    assert same(params(module.model), g_at_2) and not same(params(module.discriminator), start_d)  # and vice versa
    assert module.global_step == 2 and module.generator_steps() == 1


@pytest.mark.parametrize("alternating", [False, True])
def test_k_micro_batches_give_the_update_of_one_k_times_larger_batch(monkeypatch, alternating):
    """Instance norm everywhere and batch-mean losses: the G and D updates agree to float, clipping included
    (a tight clip, so that clipping the summed gradient once differs from clipping each micro-batch's). Without
    spectral norm, whose power iteration runs once per forward: k micro-batches iterate k times, one batch once."""
    runs = {}
    for name, batch, k in (("large", 4, 1), ("accumulated", 2, 2)):
        torch.manual_seed(0)
        module = spade_module({"gradient_clip_val": 1e-3}, spectral_norm=False, alternating=alternating)
        module.accumulate_grad_batches = k
        clips = []

        def counted(opt, original=module.clip_gradients, clips=clips, **kw):
            clips.append(kw)
            original(opt, **kw)

        monkeypatch.setattr(module, "clip_gradients", counted)
        fit(module, batches(4), batch, 1)
        runs[name] = (params(module.model), params(module.discriminator), clips)
    (g_a, d_a, clips_a), (g_b, d_b, clips_b) = runs["large"], runs["accumulated"]
    assert len(clips_a) == len(clips_b) == 2  # once per optimizer step: G and D
    assert clips_b[0] == {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "norm"}
    for a, b in zip(g_a + d_a, g_b + d_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_alternating_steps_g_then_d_on_the_updated_generators_images():
    """NVlabs/SPADE's trainer: G steps through the current D, then D's gradient is that of the hinge loss on
    images of the updated G (computed here from its recorded weights, independently of the module)."""
    torch.manual_seed(0)
    module, rec = spade_module(spectral_norm=False), Recorder()
    start_g, start_d = params(module.model), params(module.discriminator)
    data = batches(4)
    fit(module, data, 4, 1, callbacks=[rec])
    (w1, g1, d1, g_at_1, d_at_1), (w2, g2, d2, g_at_2, d_at_2) = rec.calls
    assert (w1, w2) == ("G", "D") and g1 > 0 and d1 == 0 and g2 == 0 and d2 > 0  # each backward reaches one
    assert same(g_at_1, start_g) and same(d_at_1, start_d) and not same(g_at_2, start_g) and same(d_at_2, start_d)

    reference = spade_module(spectral_norm=False)
    for net, values in ((reference.model, g_at_2), (reference.discriminator, start_d)):
        for p, v in zip(net.parameters(), values):
            p.data.copy_(v)
    x_1 = torch.stack([b["x_1"] for b in data])
    cond = one_hot(torch.stack([b["mask"] for b in data]), 4)
    with torch.no_grad():
        fake = reference.model.decode(cond)
    real_logits, _ = reference.discriminator(torch.cat([x_1, cond], 1))
    fake_logits, _ = reference.discriminator(torch.cat([fake, cond], 1))
    hinge_discriminator_loss(real_logits, fake_logits).backward()
    expected = sum(p.grad.norm() ** 2 for p in reference.discriminator.parameters()) ** 0.5
    torch.testing.assert_close(d2, expected, rtol=1e-5, atol=1e-7)


def test_bf16_mixed_precision_trains_on_the_cpu():
    torch.manual_seed(0)
    module = spade_module()
    start = params(module.model)
    t = fit(module, batches(4), 4, 2, precision="bf16-mixed")
    assert t.precision == "bf16-mixed" and module.generator_steps() == 2
    assert all(torch.isfinite(p).all() for p in module.parameters()) and not same(params(module.model), start)


# --- perceptual loss --------------------------------------------------------------------------------------------
def vgg_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}, path)
    return path


def test_perceptual_loss_is_off_by_default_and_needs_a_file():
    module = SpadeModule.for_data(config_from_dict(spade_values()), None)
    assert module.perceptual is None and module.cfg.spade_args.perceptual_weight == 0
    with pytest.raises(ConfigError, match=r"spade_args.perceptual_weights must name a local file .*vgg19-dcbb9e9d"):
        config_from_dict(spade_values(perceptual_weight=10.0))


def test_perceptual_weights_file_missing_is_named(tmp_path):
    values = config_from_dict(spade_values(perceptual_weight=10.0, perceptual_weights=str(tmp_path / "none.pth")))
    with pytest.raises(FileNotFoundError, match=r"spade_args.perceptual_weights: .*none.pth not found"):
        SpadeModule.for_data(values, None)


def test_perceptual_loss_from_a_local_file_loads_and_gives_a_gradient(tmp_path):
    values = config_from_dict(spade_values(perceptual_weight=10.0, perceptual_weights=str(vgg_file(tmp_path))))
    module = SpadeModule.for_data(values, None)
    fake = (torch.rand(2, 1, 32, 32) * 2 - 1).requires_grad_()
    loss = module.perceptual(fake, torch.rand(2, 1, 32, 32) * 2 - 1)
    loss.backward()
    assert loss > 0 and fake.grad.abs().sum() > 0
    assert not any(k.startswith("perceptual") for k in module.state_dict())  # not in the checkpoint
    torch.manual_seed(0)
    out = module.losses({"x_1": torch.rand(2, 1, 32, 32) * 2 - 1, "mask": masks()}, 0)
    assert out.logs["train/g_perceptual"] > 0


# --- config -----------------------------------------------------------------------------------------------------
def test_unet_checks_do_not_fire_for_spade_and_spade_checks_name_their_keys():
    values = spade_values()
    values["model_args"]["channels"] = [8] * 7  # a UNet of 7 levels would need image_size % 64 == 0
    for k in ("num_res_blocks", "num_head_channels"):
        values["model_args"][k] = [values["model_args"][k][0]] * 7
    values["model_args"]["attention_levels"] = [False] * 7
    assert config_from_dict(values).data_args.image_size == 32
    with pytest.raises(ConfigError, match=r"data_args.image_size must be divisible by 64 for 6 spade_args.channels"):
        config_from_dict(spade_values(channels=[8] * 6))
    with pytest.raises(ConfigError, match=r"image_size must be >= 64 for a deepest discriminator of 4 layers"):
        config_from_dict(spade_values(discriminator="monai", d_num=2, d_num_layers=2))
    with pytest.raises(ConfigError, match=r"sampling_args.sampler must be one of \['generator'\]"):
        config_from_dict({**spade_values(), "sampling_args": {"sampler": "euler"}})
    with pytest.raises(ConfigError, match="spade_args belongs to method spade"):
        config_from_dict({**spade_values(), "method": "flow_matching"})


# --- through the command lines ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spade_run(tmp_path_factory, tiny_data):
    """trainer.main on the tiny spade config: max_steps 3 generator steps, accumulation 4, EMA on.

    The 16 training images make 4 micro-batches of 4, one generator step per epoch: the run stops at an epoch's
    end, where last.ckpt is written."""
    tmp = tmp_path_factory.mktemp("spade")
    seen = {}

    class Recording(pl.Trainer):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(**kwargs)

    overrides = tiny_overrides(tmp, **{"data_args.path": tiny_data, "train_args.max_steps": 3,
                                       "train_args.max_epochs": 10, "train_args.effective_batch_size": 16,
                                       "train_args.ema_decay": 0.5})
    args = ["--config_path", str(spade_yaml(tmp))] + [a for s in overrides for a in ("--set", s)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pl, "Trainer", Recording)
        assert trainer.main(args) == 0
    return tmp / "runs" / "tiny", seen


@pytest.mark.slow
def test_trainer_steps_the_generator_max_steps_times_and_accumulates_itself(spade_run):
    run, seen = spade_run
    assert seen["accumulate_grad_batches"] == 1 and seen["gradient_clip_val"] is None and seen["max_steps"] == 6
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    g_state, d_state = (s["state"] for s in ckpt["optimizer_states"])
    assert [int(g_state[0]["step"]), int(d_state[0]["step"])] == [3, 3]  # 3 generator and 3 discriminator steps
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == 3 and ckpt["global_step"] == 6
    assert "x 4 accumulation = 16" in (run / "train.log").read_text()
    assert ckpt["epoch"] == 2


@pytest.mark.slow
def test_checkpoint_alone_rebuilds_it_and_the_inferer_generates_one_pass(spade_run, tmp_path):
    import inferer
    from utils.methods import load_module

    run, _ = spade_run
    module = load_module(run / "last.ckpt")
    assert isinstance(module, SpadeModule) and module.sampling_network() is module.ema.module
    out = tmp_path / "out"
    assert inferer.main(["--checkpoint", str(run), "--output_dir", str(out), "--num_samples", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["nfe_per_image"] == 1 and manifest["sampler"] == "generator"


@pytest.mark.slow
def test_evaluate_runs_on_a_spade_checkpoint(spade_run, tmp_path, no_metric_weights):
    import evaluate

    run, _ = spade_run
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(run), "--skip_missing_metrics", "--num_samples", "16",
                          "--n_boot", "20", "--no-comparison", "--output_dir", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"]["ssim"]["n"] == 16


@pytest.mark.slow
def test_tiny_benchmark_runs_a_spade_config(tmp_path, capsys):
    from bench import throughput

    assert throughput.main(["--tiny", "--config_path", str(spade_yaml(tmp_path)), "--settings", "comet-fp32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"record": "result"')]
    assert [(r["setting"], r["task"]) for r in rows][2:] == [("comet-fp32", "train"), ("comet-fp32", "sample")]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, tiny_data):
    config = spade_yaml(tmp_path)
    sets = tiny_overrides(tmp_path, **{"data_args.path": tiny_data, "train_args.devices": 2,
                                       "train_args.max_epochs": 1, "train_args.effective_batch_size": 16})
    cmd = [sys.executable, "trainer.py", "--config_path", str(config)] + [a for s in sets for a in ("--set", s)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "tiny" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # 16 images = 4 per process x 2 processes x 2 micro-batches: one G, one D step


def test_a_config_written_before_spectral_norm_reads_as_what_it_trained():
    """A checkpoint's or run directory's config holds every key it knew: one without spade_args.spectral_norm and
    discriminator was trained without spectral norm on MONAI's discriminator. A config a person writes gets
    today's defaults."""
    from utils.config import config_to_dict
    from utils.methods import as_written

    written = config_to_dict(config_from_dict(spade_values()))
    for key in ("spectral_norm", "discriminator", "alternating", "spade_output"):
        del written["spade_args"][key]
    old = config_from_dict(as_written(written)).spade_args
    assert (old.spectral_norm, old.discriminator, old.alternating, old.spade_output) == (False, "monai", False, False)
    new = config_from_dict(written).spade_args
    assert (new.spectral_norm, new.discriminator, new.alternating, new.spade_output) == (True, "spade", True, True)


def test_the_generator_ends_as_spades_and_monais_layout_stays_loadable():
    """SPADE's end: the last residual block keeps channels[0] features, LeakyReLU(0.2), a 3x3 conv to one channel,
    tanh. MONAI's (older checkpoints): the last block narrows to one channel, a 3x3 conv from one to one."""
    ours, monai = spade_module(), spade_module(spade_output=False)
    width = SPADE_ARGS["channels"][0]
    assert ours.model.decoder.blocks[-1].conv_1.conv.out_channels == width
    relu, conv = ours.model.decoder.last_conv
    assert isinstance(relu, torch.nn.LeakyReLU) and relu.negative_slope == 0.2
    assert (conv.conv.in_channels, conv.conv.out_channels, conv.conv.kernel_size) == (width, 1, (3, 3))
    assert isinstance(conv.adn.A, torch.nn.Tanh)
    assert monai.model.decoder.blocks[-1].conv_1.conv.out_channels == 1
    assert monai.model.decoder.last_conv.conv.weight.shape == (1, 1, 3, 3)
    with torch.no_grad():
        x = ours.model.decode(one_hot(masks(2), 4), None)
    assert x.shape == (2, 1, 32, 32) and x.abs().max() <= 1
