"""Conditioning modes (mask, class, mask + class, unconditional), mask input encodings, condition dropout and
classifier-free guidance, on tiny networks with answers derived independently."""

import csv

import numpy as np
import pytest
import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet

from utils.config import ConditioningConfig, ConfigError, config_to_dict
from utils.data.datamodule import class_names
from utils.data.layout import VIEW_PHASE_CLASSES, DatasetError
from utils.data.masks import MaskError, MaskSource
from utils.generation.classes import sample_classes
from utils.images import to_unit
from utils.methods import inference_config, load_config
from utils.methods.flow_matching.module import FlowMatchingModule
from utils.methods.networks import (
    TIME_SCALE,
    VelocityAdapter,
    build_model,
    class_context,
    controlnet_parameter_counts,
    mask_input,
    repeated_blocks,
)
from utils.methods.ode_sampler import sample, time_grid
from utils.seeding import SampleNoise

TINY = "configs/tiny.yaml"
LABELS = 4
NAMES = list(VIEW_PHASE_CLASSES)


def tiny(*sets: str):
    return load_config(TINY, list(sets))


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the ControlNet's zero convolutions would hide every effect of its input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def network(mode: str, mask_input_: str = "scalar", seed: int = 0):
    cfg = tiny()
    return randomise(build_model(cfg.model_args, LABELS, ConditioningConfig(mode=mode, mask_input=mask_input_),
                                 len(NAMES)), seed)


def module(*sets: str) -> FlowMatchingModule:
    cfg = tiny(*sets)
    names = NAMES if cfg.conditioning_args.uses_class else None
    m = FlowMatchingModule(cfg, [-1.0, -0.6, 0.4, -0.8], names)
    randomise(m.model)
    return m.eval()


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 1, 32, 32, generator=g)
    t = torch.rand(batch, generator=g)
    mask = torch.randint(0, LABELS, (batch, 1, 32, 32), generator=g, dtype=torch.uint8)
    return x_t, t, mask


# --- configuration ------------------------------------------------------------------------------------
def test_configs_without_the_section_keep_todays_mask_conditioning():
    cfg = tiny()
    assert cfg.conditioning_args == ConditioningConfig()
    assert (cfg.conditioning_args.mode, cfg.conditioning_args.mask_input) == ("mask", "scalar")
    assert cfg.sampling_args.guidance_scale == 1.0


@pytest.mark.parametrize("mode", ["class", "unconditional"])
def test_the_warm_start_prior_refuses_a_mode_without_a_mask(mode):
    with pytest.raises(ConfigError, match=f"prior_args.alpha must be 0 for conditioning_args.mode {mode}: the "
                                          "warm-start prior is drawn from the mask"):
        tiny(f"conditioning_args.mode={mode}")
    assert tiny(f"conditioning_args.mode={mode}", "prior_args.alpha=0").conditioning_args.mode == mode


@pytest.mark.parametrize("sets, message", [
    (["conditioning_args.mode=class", "prior_args.alpha=0", "conditioning_args.mask_dropout=0.1"],
     "conditioning_args.mask_dropout must be 0 for conditioning_args.mode class"),
    (["conditioning_args.mode=unconditional", "prior_args.alpha=0", "conditioning_args.mask_input=one_hot"],
     "conditioning_args.mask_input must be left at scalar"),
    (["conditioning_args.class_dropout=0.1"],
     "conditioning_args.class_dropout must be 0 for conditioning_args.mode mask"),
    (["conditioning_args.mask_dropout=1.0"], r"conditioning_args.mask_dropout must be in \[0, 1\)"),
    (["conditioning_args.mode=masks"], "conditioning_args.mode must be one of"),
    (["sampling_args.guidance_scale=2"], "sampling_args.guidance_scale must be 1 unless training dropped a condition"),
    (["sampling_args.guidance_scale=-1", "conditioning_args.mask_dropout=0.1"], "guidance_scale must be >= 0"),
])
def test_bad_conditioning_is_refused_naming_the_key(sets, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*sets)


def test_guidance_is_flow_matchings_alone():
    with pytest.raises(ConfigError, match="sampling_args.guidance_scale must be 1 for method ddpm"):
        load_config("configs/ddpm_quickstart.yaml", ["sampling_args.guidance_scale=2"])
    with pytest.raises(ConfigError, match="conditioning_args belongs to method flow_matching"):
        load_config("configs/ddpm_quickstart.yaml", ["conditioning_args.mode=class"])


def test_inference_may_change_the_guidance_scale_but_not_the_mode():
    trained = config_to_dict(tiny("conditioning_args.mask_dropout=0.1"))
    assert inference_config(trained, ["sampling_args.guidance_scale=2"], "ckpt").sampling_args.guidance_scale == 2
    with pytest.raises(ConfigError, match="--set conditioning_args.mode cannot change at inference"):
        inference_config(trained, ["conditioning_args.mode=mask+class"], "ckpt")
    with pytest.raises(ConfigError, match="guidance_scale must be 1 unless training dropped"):
        inference_config(config_to_dict(tiny()), ["sampling_args.guidance_scale=2"], "ckpt")


# --- the network ----------------------------------------------------------------------------------------
def test_mask_mode_is_todays_network_bit_for_bit():
    """MONAI's UNet + ControlNet built here by hand with the mask as one channel label / 3 give the same output."""
    model = network("mask")
    m = tiny().model_args
    common = dict(spatial_dims=2, in_channels=1, num_res_blocks=m.num_res_blocks, channels=m.channels,
                  attention_levels=m.attention_levels, norm_num_groups=m.norm_num_groups,
                  resblock_updown=m.resblock_updown, num_head_channels=m.num_head_channels,
                  transformer_num_layers=m.transformer_num_layers, use_flash_attention=m.use_flash_attention)
    unet = DiffusionModelUNet(out_channels=1, **common)
    control = ControlNet(conditioning_embedding_in_channels=1,
                         conditioning_embedding_num_channels=m.conditioning_embedding_num_channels, **common)
    unet.load_state_dict({k[5:]: v for k, v in model.state_dict().items() if k.startswith("unet.")})
    control.load_state_dict({k[11:]: v for k, v in model.state_dict().items() if k.startswith("controlnet.")})
    x_t, t, mask = inputs()
    with torch.no_grad():
        down, mid = control(x=x_t, timesteps=t * TIME_SCALE, controlnet_cond=mask.float() / 3)
        expected = unet(x=x_t, timesteps=t * TIME_SCALE, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)
        assert torch.equal(model(x_t, t, mask), expected)
    assert not model.unet.with_conditioning


def _controlnet_residuals(model, x_t, t, mask, classes):
    seen = {}
    hook = model.controlnet.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(context=kwargs.get("context"), out=out), with_kwargs=True)
    try:
        with torch.no_grad():
            model(x_t, t, mask, classes)
    finally:
        hook.remove()
    return seen


def test_the_class_reaches_the_controlnet():
    model = network("mask+class")
    x_t, t, mask = inputs()
    a = _controlnet_residuals(model, x_t, t, mask, torch.tensor([0, 0]))
    b = _controlnet_residuals(model, x_t, t, mask, torch.tensor([3, 3]))
    assert torch.equal(a["context"], class_context(torch.tensor([0, 0]), len(NAMES)))
    assert model.controlnet.with_conditioning and model.unet.with_conditioning
    (down_a, mid_a), (down_b, mid_b) = a["out"], b["out"]
    assert (mid_a - mid_b).abs().max() > 1e-3  # the ControlNet's own cross-attention saw the class
    assert any((da - db).abs().max() > 1e-3 for da, db in zip(down_a, down_b))


def test_class_only_network_has_no_controlnet_and_ignores_the_mask():
    model = network("class")
    x_t, t, mask = inputs()
    assert model.controlnet is None and set(controlnet_parameter_counts(model)) == {"UNet"}
    with torch.no_grad():
        a, b = model(x_t, t, mask, torch.tensor([1, 2])), model(x_t, t, torch.zeros_like(mask), torch.tensor([1, 2]))
        assert torch.equal(a, b)
        assert (a - model(x_t, t, mask, torch.tensor([2, 2]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class-conditional: give classes"):
        model(x_t, t, mask)


def test_unconditional_network_is_the_plain_unet():
    model = network("unconditional")
    x_t, t, mask = inputs()
    assert model.controlnet is None and not model.unet.with_conditioning
    unet = model.unet  # regional compilation compiles the UNet's blocks alone
    assert repeated_blocks(model) == [*unet.down_blocks, unet.middle_block, *unet.up_blocks]
    with torch.no_grad():
        assert torch.equal(model(x_t, t, mask), model.unet(x=x_t, timesteps=t * TIME_SCALE))


def test_class_context_is_one_hot_and_the_null_class_is_zero():
    expected = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]])
    assert torch.equal(class_context(torch.tensor([1, -1, 2]), 3), expected)


def test_mask_input_encodings_and_dropped_labels():
    mask = torch.tensor([[[[0, 1], [2, 3]]]], dtype=torch.uint8)
    assert torch.equal(mask_input(mask, 4, "scalar"), torch.tensor([[[[0.0, 1 / 3], [2 / 3, 1.0]]]]))
    one_hot = mask_input(mask, 4, "one_hot")
    assert one_hot.shape == (1, 4, 2, 2)
    for label in range(4):
        assert torch.equal(one_hot[0, label], (mask[0, 0] == label).float())
    kept = torch.tensor([[True, True, False, True]])  # label 2 left out: its pixel is background, as in a file
    partial = torch.tensor([[[[0, 1], [0, 3]]]], dtype=torch.uint8)
    for encoding in ("scalar", "one_hot"):
        assert torch.equal(mask_input(mask, 4, encoding, kept), mask_input(partial, 4, encoding))
    null = torch.zeros(1, 4, dtype=torch.bool)
    for encoding in ("one_hot", "scalar"):
        assert mask_input(mask, 4, encoding, null).abs().sum() == 0


def test_one_hot_controlnet_sees_one_channel_per_label():
    model = network("mask", "one_hot")
    assert model.controlnet.controlnet_cond_embedding.conv_in.in_channels == LABELS
    x_t, t, mask = inputs()
    swapped = mask.clone()
    swapped[mask == 1], swapped[mask == 2] = 2, 1
    with torch.no_grad():
        assert (model(x_t, t, mask) - model(x_t, t, swapped)).abs().max() > 1e-4


# --- condition dropout ------------------------------------------------------------------------------------
def test_no_dropout_leaves_the_conditions_and_the_training_draws_alone():
    plain, dropping = module(), module("conditioning_args.mask_dropout=0.5")
    x_1 = torch.zeros(4, 1, 32, 32)
    conditions = plain.conditions(torch.zeros(4, 1, 32, 32, dtype=torch.uint8), None)
    assert plain.dropped_conditions(conditions, plain.step_draws(x_1, 0)) is conditions
    for a, b in zip(plain.training_draws(x_1, 3), dropping.training_draws(x_1, 3)):
        assert torch.equal(a, b)  # dropout has its own stream: t and eps do not move


def test_dropout_draws_whole_masks_labels_and_classes_from_their_own_stream():
    m = module("conditioning_args.mode=mask+class", "conditioning_args.mask_dropout=0.3",
               "conditioning_args.label_dropout=0.3", "conditioning_args.class_dropout=0.3")
    b = 400
    classes = torch.arange(b) % len(NAMES)
    conditions = m.conditions(torch.zeros(b, 1, 32, 32, dtype=torch.uint8), classes)
    x_1 = torch.zeros(b, 1, 32, 32)
    out = m.dropped_conditions(conditions, m.step_draws(x_1, 0))
    kept = out["labels_kept"]
    whole = ~kept.any(1)
    assert 0.2 < whole.float().mean() < 0.4  # the whole mask: 0.3
    assert kept[~whole, 0].all()  # the background stays unless the whole mask goes
    assert 0.6 < kept[~whole, 1:].float().mean() < 0.8  # each anatomy: kept with 0.7
    null = out["classes"] == -1
    assert 0.2 < null.float().mean() < 0.4 and torch.equal(out["classes"][~null], classes[~null])
    again, other = (m.dropped_conditions(conditions, m.step_draws(x_1, i)) for i in (0, 1))
    assert torch.equal(again["labels_kept"], kept) and torch.equal(again["classes"], out["classes"])
    assert not torch.equal(other["labels_kept"], kept)


def test_null_conditions_drop_what_training_dropped():
    m = module("conditioning_args.mode=mask+class", "conditioning_args.class_dropout=0.1")
    conditions = m.conditions(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.tensor([1, 3]))
    null = m.null_conditions(conditions)
    assert torch.equal(null["classes"], torch.tensor([-1, -1])) and "labels_kept" not in null
    m = module("conditioning_args.mask_dropout=0.1")
    null = m.null_conditions(m.conditions(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), None))
    assert null["labels_kept"].shape == (2, LABELS) and not null["labels_kept"].any()


def test_a_class_model_refuses_samples_without_a_class():
    m = module("conditioning_args.mode=class", "prior_args.alpha=0")
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    for bad in (None, torch.tensor([0, -1]), torch.tensor([0, 4])):
        with pytest.raises(ValueError, match="every sample needs a class in 0..3"):
            m.conditions(mask, bad)


# --- guidance ----------------------------------------------------------------------------------------------
def _generate(m, mask, classes=None, steps=3):
    noise = SampleNoise(torch.arange(len(mask)), 0, (1, 32, 32))
    with torch.no_grad():
        return m.generate(mask, noise, steps, "euler", **({} if classes is None else {"classes": classes}))


def test_guidance_scale_one_is_the_plain_sampler_bitwise():
    guided = module("conditioning_args.mask_dropout=0.1", "sampling_args.guidance_scale=1")
    _, _, mask = inputs(3)
    noise = SampleNoise(torch.arange(3), 0, (1, 32, 32))
    x_0 = guided.prior(mask, noise.initial())
    plain = VelocityAdapter(guided.model)  # no guidance at all
    expected = to_unit(sample(plain, x_0, mask, 3, "euler"))
    assert torch.equal(_generate(guided, mask), expected)
    assert plain.nfe == 3 and guided.nfe(3, "euler") == 3


@pytest.mark.parametrize("w", [0.0, 2.0, 3.5])
def test_guided_euler_is_v_uncond_plus_w_times_the_difference(w):
    m = module("conditioning_args.mask_dropout=0.1", f"sampling_args.guidance_scale={w}")
    _, _, mask = inputs(2)
    x = m.prior(mask, SampleNoise(torch.arange(2), 0, (1, 32, 32)).initial())
    grid, null = time_grid(4), torch.zeros(2, LABELS, dtype=torch.bool)
    with torch.no_grad():
        for k in range(4):
            t = grid[k].expand(2)
            v_c, v_u = m.model(x, t, mask), m.model(x, t, mask, labels_kept=null)
            x = x + (grid[k + 1] - grid[k]) * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(_generate(m, mask, steps=4), to_unit(x), atol=1e-5, rtol=1e-5)


def test_guidance_doubles_the_network_evaluations_and_reports_it():
    m = module("conditioning_args.mode=class", "prior_args.alpha=0", "conditioning_args.class_dropout=0.2",
               "sampling_args.guidance_scale=2")
    adapter = m.sampling_adapter()
    x_0 = torch.randn(2, 1, 32, 32)
    sample(adapter, x_0, torch.zeros(2, 1, 32, 32, dtype=torch.uint8), 3, "midpoint", classes=torch.tensor([0, 1]))
    assert adapter.nfe == 12 == m.nfe(3, "midpoint")
    with torch.no_grad():  # the class guidance contrasts with the null class
        v_u = m.model(x_0, torch.zeros(2), None, torch.tensor([-1, -1]))
        v_c = m.model(x_0, torch.zeros(2), None, torch.tensor([0, 1]))
        adapter = m.sampling_adapter()
        torch.testing.assert_close(adapter(x_0, torch.tensor(0.0), mask=None, classes=torch.tensor([0, 1])),
                                   v_u + 2 * (v_c - v_u))


# --- classes from the data and for generation ------------------------------------------------------------
def test_the_synthetic_phantom_has_a_class_per_view_and_phase(tiny_data):
    from utils.data.dataset_io import load_dataset

    data = load_dataset(tiny_data)
    for r in data["train"]:
        meta = r["metadata"]
        assert r["class"] == VIEW_PHASE_CLASSES.index(f"{meta['view']}_{meta['phase']}")
        assert meta["class_name"] == f"{meta['view']}_{meta['phase']}"
    assert class_names(data, tiny_data) == NAMES
    assert sorted({r["class"] for r in data["train"]}) == [0, 1, 2, 3]


def _record(cls=None, name=None):
    record = {"image": np.zeros((1, 4, 4), np.uint8), "mask": np.zeros((1, 4, 4), np.uint8), "metadata": {}}
    if cls is not None:
        record["class"] = cls
    if name is not None:
        record["metadata"]["class_name"] = name
    return record


def test_class_names_from_records_and_their_errors():
    data = {"train": [_record(0), _record(2, "b")], "valid": [_record(1)], "test": [_record()]}
    assert class_names(data, "d.npz") == ["0", "1", "b"]
    with pytest.raises(DatasetError, match=r"d.npz: valid\[0\] has no class; a class-conditional model"):
        class_names({"train": [_record(0)], "valid": [_record()]}, "d.npz")
    with pytest.raises(DatasetError, match="class 0 is named 'y' here and 'x' elsewhere"):
        class_names({"train": [_record(0, "x")], "valid": [_record(0, "y")]}, "d.npz")


def test_a_gap_in_the_class_indices_is_warned_about(caplog):
    """One record of class 200 among classes 0..2 makes a 201-class model: a warning names the gap."""
    data = {"train": [_record(0), _record(1), _record(200)], "valid": [_record(2)]}
    with caplog.at_level("WARNING", logger="utils.data.datamodule"):
        assert len(class_names(data, "d.npz")) == 201
    assert "d.npz: classes 3..199 (197 of 201) have no record" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="utils.data.datamodule"):
        class_names({"train": [_record(0), _record(1)], "valid": [_record(1)]}, "d.npz")
    assert not caplog.text


def test_sample_classes_from_the_flag_a_file_or_the_records(tmp_path):
    source = MaskSource(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), [0, 1, 2], "split 'test' of d", [3, 0, None])
    pick = torch.tensor([0, 1, 0])
    assert sample_classes([], source, pick) is None
    assert sample_classes(NAMES, source, pick).tolist() == [3, 0, 3]
    assert sample_classes(NAMES, source, pick, "4CH_ED").tolist() == [2, 2, 2]
    path = tmp_path / "classes.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["mask", "class"], ["0", "2CH_ES"], ["1", "4CH_ES"]])
    assert sample_classes(NAMES, source, pick, class_file=str(path)).tolist() == [1, 3, 1]
    with pytest.raises(MaskError, match="no class for mask 2"):
        sample_classes(NAMES, source, torch.tensor([2]), class_file=str(path))
    with pytest.raises(MaskError, match="masks have no class and this model is conditioned on the image class"):
        sample_classes(NAMES, source, torch.tensor([2]))
    with pytest.raises(MaskError, match="--class: unknown class '3CH'; the model's classes are 2CH_ED"):
        sample_classes(NAMES, source, pick, "3CH")
    with pytest.raises(MaskError, match="this model is not class-conditional"):
        sample_classes([], source, pick, "4CH_ED")


# --- the measurements' pieces ---------------------------------------------------------------------------------
def test_the_classifier_learns_a_separable_task_and_the_scores_count_right():
    from utils.studies.conditioning import ClassifierRecipe, confusion, predict, train_classifier, view_accuracy

    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (0.2 + 0.6 * y.view(-1, 1, 1, 1) + 0.05 * torch.randn(64, 1, 16, 16, generator=g)).clamp(0, 1)
    net = train_classifier(x, y, 2, ClassifierRecipe(steps=60))
    assert torch.equal(predict(net, x), y)
    assert confusion(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    true, pred = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 3, 0])  # 2CH_ED->2CH_ES: right view, wrong phase
    assert view_accuracy(true, pred, NAMES) == 0.75 and view_accuracy(true, pred, ["a", "b", "c", "d"]) is None
