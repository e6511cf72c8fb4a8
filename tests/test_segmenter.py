"""The segmenter (fixed recipe, MONAI UNet) and mask fidelity: known answers on the tiny synthetic echo set."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import evaluate
import inferer
from utils.data.dataset_io import load_dataset
from utils.evaluation import segmenter as seg

RECIPE = seg.Recipe(steps=80)  # the default network, a short run: enough for the tiny set's big structures


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A segmenter trained on the tiny set's train split, saved; (directory, network, test images, masks)."""
    net, described, scores = seg.train_on_dataset(tiny_data, RECIPE)
    directory = tmp_path_factory.mktemp("segmenter")
    seg.save_segmenter(directory, net, RECIPE, 4, described, scores)
    images, masks = seg.split_tensors(load_dataset(tiny_data)["test"])
    return directory, net, images, masks


def test_label_scores_known_answers():
    ref = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    ref[:, :, 4:14, 4:14], ref[:, :, 16:26, 4:14], ref[:, :, 16:26, 16:26] = 1, 2, 3
    same = seg.label_scores(ref, ref, 4)
    np.testing.assert_array_equal(same["dice"], 1.0)
    np.testing.assert_array_equal(same["hd95"], 0.0)
    np.testing.assert_array_equal(same["surface_dice"], 1.0)
    moved = torch.roll(ref, 1, dims=-1)
    moved[1][moved[1] == 3] = 0  # image 1: label 3 missing from the prediction
    s = seg.label_scores(moved, ref, 4)
    np.testing.assert_allclose(s["dice"][0], 2 * 90 / 200)  # 10x10 squares overlapping in 10x9 pixels
    np.testing.assert_array_equal(s["hd95"][0], 1.0)
    np.testing.assert_array_equal(s["surface_dice"][0], 1.0)  # 1 px is within the 2-px tolerance
    assert s["dice"][1, 2] == 0.0 and s["surface_dice"][1, 2] == 0.0
    assert s["hd95"][1, 2] == pytest.approx(np.hypot(32, 32))


def test_segmenter_scores_real_images_far_above_noise(trained):
    _, net, images, masks = trained
    real = seg.label_scores(seg.segment(net, images), masks, 4)["dice"].mean(0)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    blurred = torch.from_numpy(ndimage.gaussian_filter(noise.numpy(), (0, 0, 1, 1)))
    for fake in (noise, blurred):
        dice = seg.label_scores(seg.segment(net, fake), masks, 4)["dice"].mean(0)
        assert (real > dice + 0.3).all(), (real, dice)
    assert (real > 0.6).all(), real


def test_checkpoint_round_trip_with_weights_only(trained):
    directory, net, images, _ = trained
    loaded, ckpt = seg.load_segmenter(directory)
    assert ckpt["recipe"]["steps"] == 80 and ckpt["num_classes"] == 4 and len(ckpt["data"]["sha256"]) == 64
    torch.testing.assert_close(loaded(images * 2 - 1), net(images * 2 - 1))
    info = json.loads((directory / "segmenter.json").read_text())
    assert set(info["real_test"]) == {"LV cavity", "myocardium", "LA cavity"}


def test_a_bad_checkpoint_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "segmenter.pt"
    torch.save({"state_dict": {}, "recipe": {"steps": 1}, "num_classes": 4}, bad)
    with pytest.raises(seg.SegmenterError, match=r"segmenter.pt: not a segmenter checkpoint"):
        seg.load_segmenter(tmp_path)
    with pytest.raises(seg.SegmenterError, match=r"nothing.pt: no such segmenter checkpoint"):
        seg.load_segmenter(tmp_path / "nothing.pt")


def test_mask_fidelity_of_real_images_equals_the_segmenters_real_scores(tiny_run, tiny_data, trained, tmp_path,
                                                                        monkeypatch):
    """evaluate.py on 'generated' images that are the real test images: fidelity == the ceiling."""
    monkeypatch.setenv("COMET_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "gen"
    assert inferer.main(["--checkpoint", str(tiny_run), "--num_samples", "8", "--num_steps", "1",
                         "--output_dir", str(out)]) == 0
    z = dict(np.load(out / "samples.npz"))
    directory, net, images, masks = trained
    z["images"] = images[z["indices"]].numpy()
    np.savez(out / "samples.npz", **z)
    assert evaluate.main(["--samples", str(out / "samples.npz"), "--skip_missing_metrics", "--n_boot", "20",
                          "--segmenter", str(directory), "--no-comparison", "--output_dir", str(tmp_path / "ev")]) == 0
    fidelity = json.loads((tmp_path / "ev" / "metrics.json").read_text())["mask_fidelity"]
    direct = seg.label_scores(seg.segment(net, images), masks, 4)
    for k, name in enumerate(seg.label_names(4)):
        for score in seg.SCORES:
            assert fidelity["generated"][name][score]["value"] == pytest.approx(fidelity["real"][name][score]["value"])
            assert fidelity["real"][name][score]["value"] == pytest.approx(direct[score][:, k].mean())
    assert "## Mask fidelity" in (tmp_path / "ev" / "report.md").read_text()


def test_cli_trains_saves_and_refuses_to_overwrite(tiny_data, tmp_path, capsys):
    assert seg.main(["train", "--data_path", str(tiny_data), "--output_dir", str(tmp_path), "--train_steps", "2"]) == 0
    assert "| LV cavity |" in capsys.readouterr().out and (tmp_path / "segmenter.pt").is_file()
    with pytest.raises(SystemExit, match="segmenter.pt exists; pass --overwrite"):
        seg.main(["train", "--data_path", str(tiny_data), "--output_dir", str(tmp_path), "--train_steps", "2"])


def test_cached_segmenter_trains_once_per_data_file(tiny_data, tmp_path, monkeypatch):
    recipe = seg.Recipe
    monkeypatch.setattr(seg, "Recipe", lambda: recipe(steps=2))
    first = seg.cached_segmenter(tiny_data, tmp_path, 4)
    stamp = (first / seg.CHECKPOINT).stat().st_mtime_ns
    assert seg.cached_segmenter(tiny_data, tmp_path, 4) == first
    assert (first / seg.CHECKPOINT).stat().st_mtime_ns == stamp
