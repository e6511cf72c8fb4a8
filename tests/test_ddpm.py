"""The ddpm method: its schedule against the closed form, its samplers against oracles and MONAI's own steps,
per-sample noise, and a tiny run through trainer, checkpoint, inferer and EMA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_overrides
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

import inferer
import trainer
from utils.config import ConfigError, config_to_dict
from utils.generation.checkpoints import find_checkpoint
from utils.methods import load_config, load_module
from utils.methods.ddpm.config import DDPMConfig
from utils.methods.ddpm.module import DDPMModule
from utils.methods.ddpm.sampler import noise_schedule, sample, sampling_scheduler, step
from utils.seeding import SampleNoise, fixed_times, noise_for_indices


def tiny_ddpm_values(**ddpm_args) -> dict:
    """configs/tiny.yaml as a ddpm config: its data, network and budget, the method's defaults."""
    values = yaml.safe_load(open("configs/tiny.yaml"))
    del values["prior_args"], values["contrastive_args"], values["sampling_args"]["sampler"]
    return {**values, "method": "ddpm", "ddpm_args": ddpm_args}


def write_config(tmp_path, values: dict):
    path = tmp_path / "ddpm_tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def image_and_eps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, 1, 8, 8), generator=g) * 1.8 - 0.9, torch.randn((2, 1, 8, 8), generator=g)


def oracle(schedule: DDPMScheduler, x_1: torch.Tensor, prediction_type: str, seen: list | None = None):
    """The ideal denoiser for data that is exactly ``x_1``: the noise (or velocity) x_t was made with at t.
    Appends the noise it infers at each call to ``seen``."""

    def denoiser(x_t, timesteps, mask):
        abar = schedule.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x_1) / (1 - abar).sqrt()
        if seen is not None:
            seen.append(eps)
        return eps if prediction_type == "epsilon" else schedule.get_velocity(x_1, eps, timesteps)

    return denoiser


def test_alpha_bar_is_the_closed_form_of_the_linear_betas():
    betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
    expected = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(noise_schedule(DDPMConfig()).alphas_cumprod.numpy(), expected, rtol=2e-5)
    assert expected[-1] < 1e-4  # x_999 is noise: starting from N(0, I) throws almost nothing away


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [999, 640, 37, 1, 0])
def test_one_ddim_step_from_any_timestep_to_the_end_returns_the_image_for_the_oracle(prediction_type, t):
    cfg = DDPMConfig(prediction_type=prediction_type)
    schedule = noise_schedule(cfg)
    x_1, eps = image_and_eps()
    timesteps = torch.full((2,), t)
    x_t = schedule.add_noise(x_1, eps, timesteps)
    # a one-step DDIM from t: MONAI's scheduler on the sub-sequence [t] of the trained schedule
    ddim = DDIMScheduler(1, "respaced", betas=schedule.betas, alphas_cumprod=schedule.alphas_cumprod,
                         timesteps=torch.tensor([t]), prediction_type=prediction_type)
    ddim.set_timesteps(1)
    out = oracle(schedule, x_1, prediction_type)(x_t, timesteps, None)
    x_end = step(ddim, out, int(ddim.timesteps[0]), x_t, 0.0, noise=lambda: pytest.fail("eta 0 draws no noise"))
    torch.testing.assert_close(x_end, x_1, atol=2e-4 if t == 999 else 1e-5, rtol=0)  # 1 / sqrt(abar_999) ~ 156


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_clipped_model_output_predicts_the_clamped_image_and_keeps_an_image_inside(prediction_type):
    """x0 read back from the clipped output (the closed forms of x0 for epsilon and v) is clamp(x0); an output
    whose x0 lies in [-1, 1] is returned unchanged (so the oracle's samplers are untouched)."""
    from utils.methods.ddpm.sampler import clipped_model_output

    schedule = noise_schedule(DDPMConfig(prediction_type=prediction_type))
    t = 900
    abar = schedule.alphas_cumprod[t]
    a, s = abar.sqrt(), (1 - abar).sqrt()

    def x0_of(output, x_t):
        return (x_t - s * output) / a if prediction_type == "epsilon" else a * x_t - s * output

    x_t, output = torch.randn(2, 1, 8, 8), 3 * torch.randn(2, 1, 8, 8)
    assert x0_of(output, x_t).abs().max() > 1  # far outside the image range at t = 900
    clipped = clipped_model_output(schedule, output, t, x_t, prediction_type)
    torch.testing.assert_close(x0_of(clipped, x_t), x0_of(output, x_t).clamp(-1, 1), atol=1e-5, rtol=0)
    x_1, eps = image_and_eps()
    x_t = schedule.add_noise(x_1, eps, torch.full((2,), t))
    exact = oracle(schedule, x_1, prediction_type)(x_t, torch.full((2,), t), None)
    torch.testing.assert_close(clipped_model_output(schedule, exact, t, x_t, prediction_type), exact,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_each_sampler_lands_every_step_at_the_next_noise_level_and_ends_at_the_image(sampler, prediction_type,
                                                                                    num_steps):
    cfg = DDPMConfig(prediction_type=prediction_type)
    x_1, _ = image_and_eps()
    seen = []
    noise = SampleNoise(torch.arange(2), 0, (1, 8, 8))
    x_end = sample(oracle(noise_schedule(cfg), x_1, prediction_type, seen), None, noise, cfg, sampler, num_steps)
    torch.testing.assert_close(x_end, x_1, atol=2e-4, rtol=0)
    assert len(seen) == num_steps
    if sampler == "ddim":  # deterministic DDIM keeps x_t's noise: each step lands exactly on the next timestep
        for eps in seen[1:]:
            torch.testing.assert_close(eps, seen[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.6), ("ddpm", 0.0)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_step_is_monais_own_step_given_the_same_noise(sampler, eta, prediction_type):
    """At N = T the sampler's scheduler is the trained one; its step with noise z is MONAI's step whose
    generator drew z (the generator is replayed here to get z)."""
    cfg = DDPMConfig(prediction_type=prediction_type)
    mine, timesteps = sampling_scheduler(cfg, sampler, cfg.num_train_timesteps)
    theirs = (DDIMScheduler if sampler == "ddim" else DDPMScheduler)(prediction_type=prediction_type)
    theirs.set_timesteps(cfg.num_train_timesteps)
    assert torch.equal(timesteps, theirs.timesteps)
    x_t, model_output = image_and_eps(1)
    x_t = 3 * x_t  # so that clipping the predicted image matters
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    for k in (0, 500, 998, 999):
        t = int(timesteps[k])
        expected, _ = theirs.step(model_output, t, x_t, generator=torch.Generator().manual_seed(k), **kwargs)
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(k))
        got = step(mine, model_output, int(mine.timesteps[k]), x_t, eta, lambda z=z: z)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory):
    """The tiny ddpm network (eta 0.5), untrained; the ControlNet nudged off its no-op start so the mask matters."""
    torch.manual_seed(0)
    module = DDPMModule(load_config(write_config(tmp_path_factory.mktemp("cfg"), tiny_ddpm_values(eta=0.5))))
    for p in module.model.controlnet.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_samples_image_does_not_depend_on_the_batch_it_was_made_in(tiny_module, sampler):
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 4, (3, 1, 32, 32), generator=g, dtype=torch.uint8)
    ids = torch.tensor([4, 0, 7])

    def images(rows):
        with torch.no_grad():
            return tiny_module.generate(mask[rows], SampleNoise(ids[rows], 5, (1, 32, 32)), 4, sampler)

    together = images([0, 1, 2])
    alone = torch.cat([images([i]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(images([2, 0]), together[[2, 0]], atol=1e-5, rtol=0)
    reseeded = tiny_module.generate(mask, SampleNoise(ids, 6, (1, 32, 32)), 4, sampler)
    assert not torch.allclose(reseeded, together, atol=1e-3)


def test_the_stochastic_samplers_use_their_step_noise(tiny_module):
    mask = torch.zeros((2, 1, 32, 32), dtype=torch.uint8)
    noise = SampleNoise(torch.arange(2), 0, (1, 32, 32))

    class SameStart(SampleNoise):  # the same x_T, other noise along the way
        def step(self, k):
            return super().step(k + 100)

    other = SameStart(torch.arange(2), 0, (1, 32, 32))
    for sampler in ("ddpm", "ddim"):  # the tiny module's eta is 0.5
        a = tiny_module.generate(mask, noise, 4, sampler)
        assert not torch.allclose(a, tiny_module.generate(mask, other, 4, sampler), atol=1e-3)


def validation_batch(tiny_data) -> dict:
    from utils.data.datamodule import EchoDataModule

    cfg = load_config("configs/tiny.yaml", [f"data_args.path={tiny_data}"])
    val = EchoDataModule(cfg.data_args, 4, 0).val_set
    index = torch.arange(len(val))
    return {"x_1": val.x_1[index], "mask": val.mask[index], "index": index}


def test_val_loss_is_the_training_mse_at_fixed_timesteps_and_noise(tiny_module, tiny_data):
    batch = validation_batch(tiny_data)
    index, x_1 = batch["index"], batch["x_1"]
    timesteps = (fixed_times(index) * 1000).long()
    eps = noise_for_indices(index, (1, 32, 32), tiny_module.cfg.train_args.seed)
    abar = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 2e-2, 1000)))[timesteps].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x_1 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        expected = torch.mean((tiny_module.model.at_timesteps(x_t, timesteps, batch["mask"]) - eps) ** 2)
        loss = tiny_module.validation_loss(batch)
        assert torch.equal(tiny_module.validation_loss(batch), loss)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)


def test_config_keys_are_checked_and_named(tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_ddpm_values()))
    assert cfg.ddpm_args == DDPMConfig() and cfg.sampling_args.sampler == "ddim" and not hasattr(cfg, "prior_args")
    for change, message in [({"eta": 1.5}, "ddpm_args.eta must be in \\[0, 1\\], got 1.5"),
                            ({"beta_start": 0.1, "beta_end": 0.01}, "ddpm_args.beta_start and beta_end must"),
                            ({"prediction_type": "sample"}, "ddpm_args.prediction_type must be one of"),
                            ({"num_train_timesteps": 2}, "sampling_args.num_steps must be <= ddpm_args.num_train")]:
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, tiny_ddpm_values(**change)))
    with pytest.raises(ConfigError, match="prior_args belongs to method flow_matching, not to method ddpm"):
        load_config(write_config(tmp_path, {**tiny_ddpm_values(), "prior_args": {"alpha": 0.3}}))
    with pytest.raises(ConfigError, match="sampling_args.sampler must be one of \\['ddim', 'ddpm'\\]"):
        load_config(write_config(tmp_path, tiny_ddpm_values()), ["sampling_args.sampler=euler"])


def test_the_shipped_configs_are_comets_with_the_diffusion_model():
    for comet, ddpm in [("comet_camus", "ddpm_camus"), ("comet_synthetic", "ddpm_synthetic"),
                        ("quickstart", "ddpm_quickstart")]:
        a, b = (config_to_dict(load_config(f"configs/{n}.yaml")) for n in (comet, ddpm))
        assert b["ddpm_args"] == config_to_dict(load_config("configs/ddpm_camus.yaml"))["ddpm_args"]
        for d in (a, b):
            for key in ("run_name", "method", "prior_args", "contrastive_args", "conditioning_args", "ddpm_args"):
                d.pop(key, None)
            d["sampling_args"].pop("sampler")
        assert a == b


# --- a tiny run: trainer, checkpoint, inferer, EMA ----------------------------------------------------------
@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory, tiny_data):
    """The tiny config as a ddpm with EMA, one epoch; returns its run directory."""
    tmp = tmp_path_factory.mktemp("ddpm_run")
    args = ["--config_path", str(write_config(tmp, tiny_ddpm_values()))]
    for s in tiny_overrides(tmp, **{"data_args.path": tiny_data, "train_args.max_epochs": 1,
                                    "train_args.ema_decay": 0.5, "run_name": "ddpm_tiny"}):
        args += ["--set", s]
    assert trainer.main(args) == 0
    return tmp / "runs" / "ddpm_tiny"


@pytest.mark.slow
def test_a_trained_run_is_rebuilt_from_its_checkpoint_alone(ddpm_run):
    module = load_module(find_checkpoint(ddpm_run))
    assert isinstance(module, DDPMModule) and module.cfg.method == "ddpm"
    assert module.cfg.ddpm_args == DDPMConfig() and module.cfg.sampling_args.sampler == "ddim"
    log = (ddpm_run / "train.log").read_text()
    assert "diffusion: 1000 steps, linear_beta from 0.0001 to 0.02, predicts epsilon" in log


@pytest.mark.slow
def test_sampling_and_val_loss_use_the_ema_weights(ddpm_run, tiny_data):
    module = load_module(ddpm_run / "last.ckpt")
    assert module.sampling_network() is module.ema.module
    key = "unet.conv_in.conv.weight"
    assert not torch.equal(module.ema.module.state_dict()[key], module.model.state_dict()[key])
    batch = validation_batch(tiny_data)
    noise = SampleNoise(batch["index"], 0, (1, 32, 32))

    def outputs():
        with torch.no_grad():
            return module.generate(batch["mask"], noise, 2, "ddim"), module.validation_loss(batch)

    images, loss = outputs()
    module.model.load_state_dict(module.ema.module.state_dict())  # the trained weights do not matter...
    assert torch.equal(outputs()[0], images) and torch.equal(outputs()[1], loss)
    with torch.no_grad():
        module.ema.module.unet.conv_in.conv.weight.add_(0.1)  # ...the EMA weights do
    changed = outputs()
    assert not torch.allclose(changed[0], images, atol=1e-4) and changed[1] != loss


@pytest.mark.slow
def test_inferer_generates_with_the_checkpoints_sampler_and_refuses_flow_matchings(ddpm_run, tmp_path):
    out = tmp_path / "default"
    assert inferer.main(["--checkpoint", str(ddpm_run), "--num_samples", "3", "--output_dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["num_inference_steps"], manifest["nfe_per_image"]) == ("ddim", 3, 3)
    assert manifest["method"] == "ddpm"
    out = tmp_path / "ddpm"
    assert inferer.main(["--checkpoint", str(ddpm_run), "--num_samples", "2", "--sampler", "ddpm",
                         "--num_steps", "3", "--output_dir", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["sampler"] == "ddpm"
    with pytest.raises(SystemExit, match="sampling_args.sampler must be one of \\['ddim', 'ddpm'\\] for method ddpm"):
        inferer.main(["--checkpoint", str(ddpm_run), "--method", "euler", "--output_dir", str(tmp_path / "x")])


def test_the_samplers_settings_may_change_at_inference_and_nothing_else_of_the_method(tmp_path):
    from utils.config import config_to_dict
    from utils.methods import inference_config

    trained = config_to_dict(load_config(write_config(tmp_path, tiny_ddpm_values())))
    cfg = inference_config(trained, ["ddpm_args.use_clipped_model_output=true", "ddpm_args.eta=0.5"], "ckpt")
    assert cfg.ddpm_args.use_clipped_model_output and cfg.ddpm_args.eta == 0.5
    with pytest.raises(ConfigError, match=r"--set ddpm_args.prediction_type cannot change at inference.*"
                                          r"ddpm_args.use_clipped_model_output"):
        inference_config(trained, ["ddpm_args.prediction_type=v_prediction"], "ckpt")
    with pytest.raises(ConfigError, match=r"--set ddpm_args.eta cannot change at inference"):
        inference_config(config_to_dict(load_config("configs/tiny.yaml")), ["ddpm_args.eta=0.5"], "ckpt")


@pytest.mark.slow
def test_ten_ddim_steps_from_pure_noise_approach_a_restart_from_half_way(tmp_path, tiny_data):
    """The shipped diffusion configs' target, trained 160 steps on the tiny set: 10 DDIM steps from pure noise
    land nearly as close to the real images as a restart from each real image noised to t = 555 ~ T/2, so the
    first steps (t >= 888) are not lost. v_prediction: PSNR 14.7 from noise against 15.0 from the restart;
    epsilon: 6.9 against 14.8 (at 400 steps 7.7 against 17.2; a grey frame scores 17.3 here)."""
    from utils.data.datamodule import EchoDataModule

    shipped = yaml.safe_load(open("configs/ddpm_quickstart.yaml"))["ddpm_args"]["prediction_type"]
    args = ["--config_path", str(write_config(tmp_path, tiny_ddpm_values(prediction_type=shipped)))]
    for s in tiny_overrides(tmp_path, **{"data_args.path": tiny_data, "train_args.max_epochs": 40,
                                         "train_args.sample_every_n_epochs": 1000, "run_name": "restart"}):
        args += ["--set", s]
    assert trainer.main(args) == 0
    module = load_module(tmp_path / "runs" / "restart" / "last.ckpt")
    train = EchoDataModule(load_config("configs/tiny.yaml", [f"data_args.path={tiny_data}"]).data_args, 4, 0).train_set
    x_1, mask = train.x_1[:16], train.mask[:16]
    scheduler, timesteps = sampling_scheduler(module.cfg.ddpm_args, "ddim", 10)

    @torch.no_grad()
    def ddim_from(k0: int, x_t: torch.Tensor) -> torch.Tensor:
        for k, (own, trained) in enumerate(zip(scheduler.timesteps.tolist(), timesteps.tolist())):
            if k >= k0:
                output = module.sampling_network().at_timesteps(x_t, torch.full((len(x_t),), trained), mask)
                x_t = step(scheduler, output, own, x_t, 0.0, lambda: None)
        return x_t

    def psnr(x: torch.Tensor) -> float:  # images in [-1, 1]: peak-to-peak 2
        return float((10 * torch.log10(4 / ((x.clamp(-1, 1) - x_1) ** 2).mean((1, 2, 3)))).mean())

    eps = torch.randn(x_1.shape, generator=torch.Generator().manual_seed(0))
    k_half = int((timesteps - 500).abs().argmin())
    restart = ddim_from(k_half, module.schedule.add_noise(x_1, eps, torch.full((16,), int(timesteps[k_half]))))
    from_noise = ddim_from(0, eps)
    assert psnr(from_noise) > psnr(restart) - 2.0, (psnr(from_noise), psnr(restart))
