"""The ranking check: on the phantom, where a perfect sampler exists, FRD must rank averages, paintings and blur
behind real images."""

import json

import numpy as np
import pytest
import torch

from utils.evaluation.ranking import label_painting, verdict

ORDER = ("real", "oracle", "samples", "mean of K", "painting")


def test_verdict_needs_the_whole_order_and_a_growing_blur():
    good = {name: {"frd_v0": float(i)} for i, name in enumerate(ORDER)}
    good.update({"blur 1": {"frd_v0": 0.5}, "blur 2": {"frd_v0": 0.7}})
    assert verdict(good, "frd_v0", ["blur 1", "blur 2"]) == {"order": True, "blur": True}
    ties = {**good, "real": {"frd_v0": 1.5}}  # real and oracle are both perfect: either may come first
    assert verdict(ties, "frd_v0", [])["order"] is True
    assert verdict({**good, "real": {"frd_v0": 2.5}}, "frd_v0", [])["order"] is False  # real behind the samples
    swapped = {**good, "painting": {"frd_v0": 2.5}}  # the painting ahead of the mean of K (3.0)
    assert verdict(swapped, "frd_v0", ["blur 1", "blur 2"])["order"] is False
    assert verdict(good, "frd_v0", ["blur 2", "blur 1"])["blur"] is False
    assert verdict({**good, "samples": {"frd_v0": None}}, "frd_v0", [])["order"] is False  # unmeasured: no pass


def test_label_painting_is_each_labels_mean_intensity():
    reference = torch.tensor([[[[0.2, 0.4], [0.9, 0.7]]]])
    reference_masks = torch.tensor([[[[0, 0], [1, 1]]]], dtype=torch.uint8)
    masks = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.uint8)
    np.testing.assert_allclose(label_painting(masks, reference, reference_masks, sigma=0.0)[0, 0].numpy(),
                               [[0.8, 0.3], [0.3, 0.8]], rtol=1e-6)


@pytest.mark.slow
def test_on_the_phantom_frd_v0_ranks_averages_paintings_and_blur_behind_perfect_samples(tmp_path):
    """Samples from a perfect sampler (the phantom's redraws 10 and 11 of each test mask, K = 2): their per-mask
    mean, the label painting and the blurred real images must all score worse than real, oracle and samples."""
    from utils.data.dataset_io import load_dataset
    from utils.data.oracle import oracle_images
    from utils.data.synthetic_echo import ensure_synthetic_dataset
    from utils.evaluation.ranking import main

    data = tmp_path / "data.npz"
    synthetic = {"size": 32, "patients": [8, 1, 8], "seed": 0}  # 32 masks: FRD at 12 images was noise
    ensure_synthetic_dataset(data, 32, (8, 1, 8), 0)
    records = load_dataset(data)["test"]
    indices = np.arange(2 * len(records)) % len(records)
    images = np.concatenate([oracle_images(records, synthetic, 10 + j) for j in range(2)]) / 255.0
    samples = tmp_path / "eval" / "samples"
    samples.mkdir(parents=True)
    np.savez(samples / "samples.npz", images=images.astype(np.float32), indices=indices,
             masks=np.stack([records[i]["mask"] for i in indices]))
    config = {"data_args": {"path": str(data), "synthetic": synthetic}}
    (samples / "manifest.json").write_text(json.dumps({"config": config, "split": "test"}))

    assert main([str(tmp_path / "eval"), "--blur", "1", "3"]) == 0
    scores = json.loads((tmp_path / "eval" / "ranking.json").read_text())["scores"]
    frd = {name: s["frd_v0"] for name, s in scores.items()}
    perfect = max(frd["real"], frd["oracle"], frd["samples"])
    assert perfect < frd["mean of K"] < frd["painting"], frd
    assert frd["real"] < frd["blur 1"] < frd["blur 3"], frd
    assert "order" in (tmp_path / "eval" / "ranking.md").read_text()


def test_volumes_are_refused_with_the_reason(tmp_path):
    from utils.evaluation.ranking import main

    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "samples.npz", images=np.zeros((2, 1, 4, 4, 4), np.float32), indices=np.array([0, 0]),
             masks=np.zeros((2, 1, 4, 4, 4), np.uint8))
    (samples / "manifest.json").write_text(json.dumps({"config": {"data_args": {}}, "split": "test"}))
    with pytest.raises(SystemExit, match="2-D images only"):
        main([str(tmp_path)])
