"""Checkpoints written before the method packages (tests/fixtures/layout_v1, made by make_layout_v1.py at
292a628, when the sampler was ``sampling_args.method``) still load and make the same images."""

import numpy as np
import pytest
import torch
from conftest import ROOT

from utils.methods import load_module
from utils.seeding import SampleNoise

FIXTURES = ROOT / "tests" / "fixtures" / "layout_v1"
NOISE_SEED, NUM_STEPS = 7, 3  # as make_layout_v1.py made them


@pytest.mark.parametrize("method", ["flow_matching", "ddpm", "spade", "med_dt_fm"])
def test_a_checkpoint_of_the_previous_layout_generates_the_same_images(method):
    expected = np.load(FIXTURES / "expected_images.npz")
    module = load_module(FIXTURES / f"{method}.ckpt")
    assert module.cfg.method == method and module.cfg.sampling_args.sampler == module.cfg.SAMPLERS[0]
    mask = torch.from_numpy(expected["masks"]).long()
    noise = SampleNoise(torch.arange(len(mask)), NOISE_SEED, tuple(mask.shape[1:]))
    with torch.no_grad():
        images = module.generate(mask, noise, NUM_STEPS, module.cfg.sampling_args.sampler).numpy()
    np.testing.assert_allclose(images, expected[method], rtol=0, atol=1e-6)
