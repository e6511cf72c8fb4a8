"""Checkpoints written before the method packages (tests/fixtures/layout_v1, made by make_layout_v1.py at
292a628) still load and make the same images."""


import numpy as np
import pytest
from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
METHODS = ("flow_matching", "ddpm", "spade", "med_dt_fm")


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_of_the_previous_layout_generates_the_same_images(method):
    import make_layout_v1  # noqa: E402  (tests/fixtures is on sys.path below)

    expected = np.load(FIXTURES / "layout_v1" / "expected_images.npz")
    images = make_layout_v1.generate(FIXTURES / "layout_v1" / f"{method}.ckpt", expected["masks"])
    assert images.shape == expected[method].shape
    np.testing.assert_allclose(images, expected[method], rtol=0, atol=1e-6)


@pytest.fixture(autouse=True)
def _fixtures_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
