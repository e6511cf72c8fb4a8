from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, config_to_dict
from utils.methods import load_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.run_name
    assert load_config(path, []) == cfg


def test_shipped_config_set_is_complete():
    names = {p.name for p in CONFIGS}
    assert {"comet_camus.yaml", "motfm_camus.yaml", "comet_synthetic.yaml", "quickstart.yaml", "tiny.yaml",
            "ddpm_camus.yaml", "ddpm_synthetic.yaml", "ddpm_quickstart.yaml"} <= names


def test_seed_recipe_values():
    c = load_config("configs/comet_camus.yaml")
    t = c.train_args
    assert (t.batch_size, t.effective_batch_size, t.max_epochs, t.lr, t.precision, t.gradient_clip_val) == (
        4, 16, 400, 1e-4, "16-mixed", 1.0)
    assert (c.prior_args.alpha, c.prior_args.kernel_size, c.prior_args.sigma) == (0.3, 15, 5.0)
    k = c.contrastive_args
    assert (k.temperature, k.weight, k.warmup_epochs, k.target) == (0.07, 0.01, 5, "velocity")
    assert (c.sampling_args.num_steps, c.sampling_args.sampler) == (10, "euler")
    assert c.data_args.path == "data/camus_dataset.pkl"


def test_motfm_differs_from_comet_only_in_the_two_ideas():
    comet = config_to_dict(load_config("configs/comet_camus.yaml"))
    motfm = config_to_dict(load_config("configs/motfm_camus.yaml"))
    assert motfm["prior_args"]["alpha"] == 0.0 and motfm["contrastive_args"]["weight"] == 0.0
    for d in (comet, motfm):
        d.pop("run_name"), d["prior_args"].pop("alpha"), d["contrastive_args"].pop("weight")
    assert comet == motfm


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_key(tmp_path):
    p = _write(tmp_path, "run_name: x\ntrain_args:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml.*unknown key train_args.learning_rate"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key trian_args"):
        load_config(_write(tmp_path, "run_name: x\ntrian_args: {}\n"))


@pytest.mark.parametrize("text, match", [
    ("run_name: x\ntrain_args:\n  lr: -1\n", r"train_args.lr must be > 0, got -1"),
    ("run_name: x\ntrain_args:\n  batch_size: 2.5\n", r"train_args.batch_size must be an integer"),
    ("run_name: x\ntrain_args:\n  batch_size: true\n", r"train_args.batch_size must be an integer"),
    ("run_name: x\nprior_args:\n  alpha: 1.5\n", r"prior_args.alpha must be in \[0, 1\)"),
    ("run_name: x\nprior_args:\n  kernel_size: 4\n", r"prior_args.kernel_size must be a positive odd"),
    ("run_name: x\ncontrastive_args:\n  target: velocityy\n", r"contrastive_args.target must be one of"),
    ("run_name: x\nmodel_args:\n  channels: [32, 64]\n", r"model_args.num_res_blocks needs one entry per level"),
    ("run_name: x\nsampling_args:\n  method: dopri5\n", r"sampling_args.sampler must be one of"),
    ("train_args: {}\n", r"missing required key run_name"),
    ("run_name: x\nresblock_updown: 1\n", r"unknown key resblock_updown"),
])
def test_bad_values_are_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(_write(tmp_path, text))
    assert "cfg.yaml" in str(e.value)


def test_set_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train_args.lr=2e-4", "prior_args.alpha=0", "run_name=other",
                                           "model_args.channels=[8, 16]"])
    assert cfg.train_args.lr == 2e-4 and isinstance(cfg.train_args.lr, float)
    assert cfg.prior_args.alpha == 0.0 and cfg.run_name == "other"
    assert cfg.model_args.channels == (8, 16)


def test_set_override_errors_mention_the_override():
    with pytest.raises(ConfigError, match=r"--set train_args.max_epochs=ten.*must be an integer"):
        load_config("configs/tiny.yaml", ["train_args.max_epochs=ten"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("configs/tiny.yaml", ["train_args.lr"])


def test_round_trip_through_plain_dict(tmp_path):
    cfg = load_config("configs/comet_camus.yaml")
    p = tmp_path / "dump.yaml"
    p.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(p) == cfg


def test_an_unknown_method_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: method must be one of \['flow_matching'.*got 'gan'"):
        load_config(_write(tmp_path, "run_name: x\nmethod: gan\n"))


def test_the_method_sections_and_sampler_default_to_the_methods():
    cfg = load_config("configs/tiny.yaml", ["sampling_args.num_steps=3"])
    assert cfg.method == "flow_matching" and cfg.prior_args is not None and cfg.contrastive_args is not None
    values = config_to_dict(cfg)
    del values["prior_args"], values["sampling_args"]["sampler"], values["method"]
    from utils.methods import config_from_dict

    again = config_from_dict(values)  # a config (or checkpoint) from before `method` existed
    assert again.method == "flow_matching" and again.sampling_args.sampler == "euler"
    assert again.prior_args == type(cfg.prior_args)()


def test_the_samplers_old_name_still_loads_with_one_line_and_both_names_are_refused(tmp_path, caplog):
    path = _write(tmp_path, "run_name: x\nsampling_args:\n  method: midpoint\n")
    with caplog.at_level("WARNING"):
        assert load_config(path).sampling_args.sampler == "midpoint"
    assert caplog.text.count("sampling_args.method is now called sampling_args.sampler") == 1
    with pytest.raises(ConfigError, match="sampling_args.method is the old name of sampling_args.sampler"):
        load_config(_write(tmp_path, "run_name: x\nsampling_args:\n  method: midpoint\n  sampler: euler\n"))


def test_a_sampler_of_another_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling_args.sampler must be one of \['euler'.*for method flow_matching"):
        load_config("configs/tiny.yaml", ["sampling_args.sampler=ddim"])
