"""MOTFM import: a tiny MOTFM-format checkpoint (monai-generative 0.2.3 key names, built here) imports, and the
imported model makes through inferer.py the images MOTFM's own forward pass and Euler loop make."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import inferer
from utils.config import ConditioningConfig
from utils.data.dataset_io import load_dataset, normalise_image
from utils.methods import load_config
from utils.methods.networks import build_model
from utils.motfm.__main__ import main as motfm_main
from utils.seeding import noise_for_indices

LABELS, CLASSES, STEPS = 4, 4, 4
FIXTURES = Path(__file__).parent / "fixtures" / "motfm"  # MOTFM's released YAMLs (MIT), see its README
GROUPS = 2  # not the tiny config's 8: one channel per group would normalise the time embedding away


def old_names(state: dict) -> dict:
    """Our (MONAI core) names -> monai-generative 0.2.3's: transformer ``out_proj`` was ``to_out.0``, a
    self-attention block's ``attn.to_q``/``attn.out_proj`` were ``to_q``/``proj_attn``, ``postconv`` was ``conv``."""
    out = {}
    for key, value in state.items():
        if "transformer_blocks" in key and ".out_proj." in key:
            key = key.replace(".out_proj.", ".to_out.0.")
        elif ".attn.to_" in key:
            key = key.replace(".attn.to_", ".to_")
        elif ".attn.out_proj." in key:
            key = key.replace(".attn.out_proj.", ".proj_attn.")
        out[key.replace("postconv", "conv")] = value
    return out


def motfm_yaml(data_path, **model) -> dict:
    return {
        "model_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "num_res_blocks": [1, 1],
                       "num_channels": [8, 8], "attention_levels": [False, True], "norm_num_groups": GROUPS,
                       "resblock_updown": False, "num_head_channels": [8, 8], "transformer_num_layers": 1,
                       "use_flash_attention": True, "with_conditioning": True, "mask_conditioning": True,
                       "cross_attention_dim": CLASSES, "conditioning_embedding_num_channels": [8], **model},
        "data_args": {"pickle_path": str(data_path), "split_train": "train", "split_val": "valid"},
        "train_args": {"num_epochs": 1, "batch_size": 2, "lr": 1e-4, "val_freq": 5, "num_val_samples": 3},
        "solver_args": {"method": "euler", "step_size": 1 / STEPS, "time_points": 10},
    }


@pytest.fixture(scope="module")
def motfm_run(tmp_path_factory, tiny_data):
    """MOTFM's network (random weights) saved as MOTFM's Lightning checkpoint with the old key names."""
    torch.manual_seed(0)
    model_args = dataclasses.replace(load_config("configs/tiny.yaml").model_args, norm_num_groups=GROUPS)
    net = build_model(model_args, LABELS, ConditioningConfig(mode="mask+class"), CLASSES).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    state = {f"model.unet.{k}": v for k, v in old_names(net.unet.state_dict()).items()}
    state |= {f"model.controlnet.{k}": v for k, v in old_names(net.controlnet.state_dict()).items()}
    assert any(".to_out.0." in k for k in state) and any(".conv.conv." in k for k in state)  # old names in use
    tmp = tmp_path_factory.mktemp("motfm")
    config = motfm_yaml(tiny_data)
    torch.save({"state_dict": state, "hyper_parameters": config, "epoch": 7, "global_step": 70}, tmp / "motfm.ckpt")
    (tmp / "motfm.yaml").write_text(yaml.safe_dump(config))
    return tmp, net


def motfm_images(net, masks, classes, lo, hi):
    """What MOTFM makes: its MergedModel forward (floor(t * 999), mask / max label, one-hot context), Euler with
    step_size 1 / STEPS from N(0, I), then its min-max units mapped back with the training split's extremes."""
    x = noise_for_indices(torch.arange(len(masks)), (1, 32, 32), 0)
    cond = torch.nn.functional.one_hot(classes, CLASSES).float().unsqueeze(1)
    with torch.no_grad():
        for k in range(STEPS):
            t = torch.full((len(x),), k / STEPS).mul(999).floor().long()
            down, mid = net.controlnet(x=x, timesteps=t, controlnet_cond=masks.float() / (LABELS - 1), context=cond)
            v = net.unet(x=x, timesteps=t, context=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)
            x = x + v / STEPS
    return (lo + x * (hi - lo)).clamp(0, 1)


def split_records(data_path, n: int):
    """The first ``n`` test masks and classes of the data, and the training split's extremes (MOTFM's range)."""
    data = load_dataset(data_path)
    train = [normalise_image(r["image"]) for r in data["train"]]
    test = data["test"][:n]
    return (torch.from_numpy(np.stack([r["mask"] for r in test])), [r["class"] for r in test],
            float(min(x.min() for x in train)), float(max(x.max() for x in train)))


def test_a_motfm_checkpoint_imports_and_makes_motfms_images(motfm_run, tiny_data, tmp_path):
    tmp, net = motfm_run
    out = tmp_path / "imported"
    assert motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp / "motfm.yaml"),
                       "--output_dir", str(out), "--image_size", "32"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["conditioning_args"]["mode"] == "mask+class" and config["model_args"]["channels"] == [8, 8]
    t = config["train_args"]
    assert (t["max_epochs"], t["batch_size"], t["sample_every_n_epochs"], t["num_sample_images"]) == (1, 2, 5, 3)
    assert config["sampling_args"] == {"num_steps": STEPS, "sampler": "euler", "precision": "32-true",
                                       "guidance_scale": 1.0, "compile": "none"}
    assert inferer.main(["--checkpoint", str(out / "imported.ckpt"), "--num_samples", "3",
                         "--output_dir", str(tmp_path / "samples")]) == 0
    got = torch.from_numpy(np.load(tmp_path / "samples" / "samples.npz")["images"])
    masks, classes, lo, hi = split_records(tiny_data, 3)
    torch.testing.assert_close(got, motfm_images(net, masks, torch.tensor(classes), lo, hi), atol=1e-5, rtol=1e-5)
    assert motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp / "motfm.yaml"),
                       "--output_dir", str(tmp_path / "continuous"), "--image_size", "32", "--continuous_time"]) == 0
    assert inferer.main(["--checkpoint", str(tmp_path / "continuous" / "imported.ckpt"), "--num_samples", "3",
                         "--output_dir", str(tmp_path / "continuous_samples")]) == 0
    continuous = torch.from_numpy(np.load(tmp_path / "continuous_samples" / "samples.npz")["images"])
    assert (continuous - got).abs().max() > 1e-4  # the floored time is what MOTFM's images need


@pytest.mark.parametrize("change, message", [
    ({"spatial_dims": 3}, "model_args.spatial_dims is 3; only 2 can be imported"),
    ({"num_channels": [16, 16], "num_head_channels": [16, 16]}, "has shape .* the YAML does not describe this"),
    ({"mask_conditioning": False}, "has ControlNet weights but .* has no mask_conditioning"),
    ({"upcast_attention": True}, "model_args.upcast_attention has no counterpart here"),
])
def test_what_cannot_be_mapped_is_refused_by_name(motfm_run, tiny_data, tmp_path, change, message):
    tmp, _ = motfm_run
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(motfm_yaml(tiny_data, **change)))
    with pytest.raises(SystemExit, match=message):
        motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp_path / "bad.yaml"),
                    "--output_dir", str(tmp_path / "out"), "--image_size", "32"])
    assert not (tmp_path / "out" / "imported.ckpt").exists()


def test_a_normalisation_other_than_a_global_min_max_is_refused(motfm_run, tiny_data, tmp_path):
    tmp, _ = motfm_run
    config = motfm_yaml(tiny_data)
    config["data_args"]["image_norm"] = "zscore"
    (tmp_path / "z.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="data_args.image_norm 'zscore' cannot be imported"):
        motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp_path / "z.yaml"),
                    "--output_dir", str(tmp_path / "out"), "--image_size", "32"])


@pytest.mark.parametrize("name, mode", [("mask_class_conditioning", "mask+class"), ("class_conditioning", "class"),
                                        ("mask_conditioning", "mask"), ("unconditional", "unconditional")])
def test_motfms_released_yamls_translate_as_they_are(name, mode, tmp_path):
    """MOTFM's own configs (tests/fixtures/motfm, unmodified) train at batch size 1, which the import once
    copied into the contrastive keys (refused: >= 2)."""
    from utils.motfm.convert import translate_config

    motfm = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    values = translate_config(motfm, tmp_path / name, LABELS, 256, name)
    assert values["conditioning_args"]["mode"] == mode and values["train_args"]["batch_size"] == 1
    assert values["contrastive_args"]["weight"] == 0 and values["prior_args"]["alpha"] == 0
    assert (values["sampling_args"]["num_steps"], values["sampling_args"]["sampler"]) == (10, "euler")


@pytest.mark.parametrize("solver, expected", [({}, (10, "midpoint")), ({"time_points": 5}, (5, "midpoint")),
                                              ({"step_size": 0.25, "time_points": 10, "method": "rk4"}, (4, "rk4"))])
def test_the_solver_defaults_are_motfms_inferers(solver, expected):
    """MOTFM's inferer.py: method midpoint unless given, step_size 1 / time_points unless given, time_points 10."""
    from utils.motfm.convert import motfm_solver

    assert motfm_solver(solver) == expected


def test_a_label_count_other_than_the_datas_is_refused(motfm_run, tiny_data, tmp_path):
    """--num_labels 5 on 4-label masks would scale the ControlNet's input by 1/4 where MOTFM used 1/3."""
    tmp, _ = motfm_run
    with pytest.raises(SystemExit, match=r"labels 0\.\.3, .*--num_labels is 5 \(give --num_labels 4\)"):
        motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp / "motfm.yaml"),
                    "--output_dir", str(tmp_path / "out"), "--image_size", "32", "--num_labels", "5",
                    "--image_range", "0", "1"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, mode", [("mask_conditioning_attention", "mask"),
                                           ("unconditional_attention", "unconditional"),
                                           ("class_conditioning_attention", "class"),
                                           ("mask_class_conditioning_attention", "mask+class")])
def test_every_motfm_setting_imports_as_monai_generative_computes_it(setting, mode, tmp_path):
    """Fixtures made with MOTFM's own network code, monai-generative 0.2.3 (make_attention_fixtures.py), one per
    MOTFM setting: its self-attention blocks never apply proj_attn, so the import builds them without it
    (attention_out_proj false), and the ControlNet's self-attention weights map too (MONAI's
    load_old_state_dict stops on them); the class settings attend to the one-hot class."""
    from utils.methods import load_module

    out = tmp_path / "imported"
    classes = ["--class_names", "a", "b", "c", "d"] if "class" in mode else []
    assert motfm_main(["import", "--checkpoint", str(FIXTURES / f"{setting}.ckpt"), "--config",
                       str(FIXTURES / f"{setting}.yaml"), "--output_dir", str(out), "--image_size", "32",
                       "--image_range", "0", "1", *classes]) == 0
    module = load_module(out / "imported.ckpt")
    assert module.cfg.conditioning_args.mode == mode
    assert module.cfg.model_args.attention_out_proj is ("class" in mode)  # cross-attention projects its output
    expected = torch.load(FIXTURES / f"{setting}_expected.pt", weights_only=True)
    with torch.no_grad():
        got = module.model(expected["x"], expected["t"], expected["masks"], expected.get("classes"))
    torch.testing.assert_close(got, expected["velocity"], atol=1e-5, rtol=1e-5)


def test_a_shuffled_class_values_order_conditions_on_motfms_class(motfm_run, tiny_data, tmp_path):
    """MOTFM's one-hot of a class c is at class_values.index(c); the imported model, given the records' classes,
    makes the images MOTFM makes with that order."""
    tmp, net = motfm_run
    order = [2, 0, 3, 1]
    config = motfm_yaml(tiny_data)
    config["data_args"]["class_values"] = order
    (tmp_path / "shuffled.yaml").write_text(yaml.safe_dump(config))
    assert motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp_path / "shuffled.yaml"),
                       "--output_dir", str(tmp_path / "imported"), "--image_size", "32"]) == 0
    assert inferer.main(["--checkpoint", str(tmp_path / "imported" / "imported.ckpt"), "--num_samples", "4",
                         "--output_dir", str(tmp_path / "samples")]) == 0
    got = torch.from_numpy(np.load(tmp_path / "samples" / "samples.npz")["images"])
    masks, classes, lo, hi = split_records(tiny_data, 4)
    assert len(set(classes)) > 1  # the order matters for these records
    motfm_classes = torch.tensor([order.index(c) for c in classes])
    torch.testing.assert_close(got, motfm_images(net, masks, motfm_classes, lo, hi), atol=1e-5, rtol=1e-5)
    config["data_args"]["class_values"] = [0, 1, 2, 5]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"class_values \[0, 1, 2, 5\] must be the classes 0..3"):
        motfm_main(["import", "--checkpoint", str(tmp / "motfm.ckpt"), "--config", str(tmp_path / "bad.yaml"),
                    "--output_dir", str(tmp_path / "bad"), "--image_size", "32"])


def test_a_left_out_model_key_takes_monai_generatives_default(tmp_path):
    """MOTFM builds monai-generative 0.2.3's networks from its YAML, so a key it leaves out has that library's
    default (read from its DiffusionModelUNet signature), not this framework's; an int applies to every level."""
    from utils.motfm.convert import MotfmError, translate_config

    motfm = {"model_args": {"num_channels": [32, 64, 64, 64], "num_head_channels": 16},
             "data_args": {"pickle_path": "data.pkl"}}
    model = translate_config(motfm, tmp_path / "run", LABELS, 64, "short.yaml")["model_args"]
    assert (model["num_res_blocks"], model["attention_levels"], model["num_head_channels"]) == (
        [2, 2, 2, 2], [False, False, True, True], [16, 16, 16, 16])
    assert (model["norm_num_groups"], model["resblock_updown"], model["transformer_num_layers"]) == (32, False, 1)
    motfm["model_args"] = {"num_channels": [32, 64, 64, 64, 64], "num_res_blocks": 1}
    with pytest.raises(MotfmError, match=r"model_args.attention_levels is not given, .* 4 entries for the 5 levels"):
        translate_config(motfm, tmp_path / "run", LABELS, 64, "short.yaml")
