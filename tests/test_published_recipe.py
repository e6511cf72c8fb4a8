"""COMET's published recipe (configs/*_published.yaml) and the flow's image range it needs."""

import dataclasses

import pytest
import torch

from utils.data.datamodule import EchoDataModule
from utils.methods import load_config
from utils.methods.flow_matching import module as fm_module
from utils.methods.flow_matching.module import FlowMatchingModule

RECIPE = {"prior_args.mask_encoding", "prior_args.padding", "prior_args.image_range",
          "contrastive_args.exclude_same_patient"}
# published config -> (the framework config it twins, the keys it changes beside run_name)
TWINS = {
    "configs/comet_camus_published.yaml": ("configs/comet_camus.yaml", RECIPE | {"contrastive_args.num_keys"}),
    "configs/motfm_camus_published.yaml": ("configs/motfm_camus.yaml", RECIPE | {"contrastive_args.num_keys"}),
    "configs/quickstart_published.yaml": ("configs/quickstart.yaml", RECIPE | {"model_args.attention_out_proj"}),
}


def _flat(cfg) -> dict:
    out = {}
    for section, values in dataclasses.asdict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


@pytest.mark.parametrize("published", sorted(TWINS))
def test_a_published_config_is_its_twin_with_the_published_codes_recipe(published):
    twin, changed = TWINS[published]
    ours, theirs = _flat(load_config(published)), _flat(load_config(twin))
    assert {k for k in ours if ours[k] != theirs[k]} == changed | {"run_name"}
    assert ours["prior_args.mask_encoding"] == "unit_labels" and ours["prior_args.padding"] == "zeros"
    assert ours["prior_args.image_range"] == (0.0, 1.0)
    assert ours["contrastive_args.exclude_same_patient"] is False
    assert ours["contrastive_args.num_keys"] == ours["train_args.batch_size"]  # the local micro-batch only
    assert ours["model_args.attention_out_proj"] is False  # monai-generative's self-attention


def _module(tiny_data, *overrides):
    cfg = load_config("configs/tiny.yaml", [f"data_args.path={tiny_data}", *overrides])
    dm = EchoDataModule(cfg.data_args, 4, 0)
    return FlowMatchingModule.for_data(cfg, dm), dm


def test_unit_image_range_trains_on_images_in_zero_one(tiny_data):
    module, dm = _module(tiny_data, "prior_args.image_range=[0, 1]", "prior_args.mask_encoding=mean_intensity")
    signed = dm.label_values("mean_intensity")
    assert module.hparams.label_values == pytest.approx([(v + 1) / 2 for v in signed], abs=1e-6)
    seen = []
    loss = module.flow_matching_loss
    module.flow_matching_loss = lambda network, x_1, *a, **k: seen.append(x_1) or loss(network, x_1, *a, **k)
    batch = {k: v.unsqueeze(0) if torch.is_tensor(v) else torch.tensor([v])
             for k, v in dm.val_set[0].items()}
    module.validation_loss(batch)
    torch.testing.assert_close(seen[0], (batch["x_1"] + 1) / 2)
    scaled = seen[0] * 255  # ToTensor's uint8 / 255, the published code's images
    assert seen[0].min() >= 0.0 and torch.allclose(scaled, scaled.round(), atol=1e-4)


@pytest.mark.parametrize("image_range, image", [("[-1, 1]", 0.625), ("[0, 1]", 0.25), ("[0, 2]", 0.125)])
def test_generated_images_map_back_from_the_flows_image_range(tiny_data, monkeypatch, image_range, image):
    module, dm = _module(tiny_data, f"prior_args.image_range={image_range}")
    monkeypatch.setattr(fm_module, "sample", lambda adapter, x_0, *a, **k: torch.full_like(x_0, 0.25))
    mask = dm.val_set.mask[:2]
    out = module.generate(mask, _Noise(mask.shape), 2, "euler")
    assert torch.all(out == image)


class _Noise:
    def __init__(self, shape):
        self.shape = shape

    def initial(self):
        return torch.zeros(self.shape)


def test_image_range_must_be_increasing(tiny_data):
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match="prior_args.image_range"):
        load_config("configs/tiny.yaml", ["prior_args.image_range=[1, 0]"])
