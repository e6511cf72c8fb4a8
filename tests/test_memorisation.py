"""Memorisation audit: planted copies of training images are flagged, real unseen images are not."""

import json

import numpy as np
import pytest
import torch

from utils.data.dataset_io import load_dataset, save_dataset
from utils.evaluation import memorisation as mem
from utils.evaluation.segmenter import split_tensors


@pytest.fixture(scope="module")
def splits(tiny_data):
    data = load_dataset(tiny_data)
    return {k: split_tensors(v)[0] for k, v in data.items()}, [r["metadata"]["patient"] for r in data["train"]]


def test_nearest_matches_brute_force_across_chunks():
    g = torch.Generator().manual_seed(0)
    queries, reference = torch.rand(11, 1, 8, 8, generator=g), torch.rand(7, 1, 8, 8, generator=g)
    dist, index = mem.nearest(queries, reference, chunk=3)
    brute = ((queries[:, None] - reference[None]) ** 2).flatten(2).mean(-1).sqrt().numpy()
    np.testing.assert_array_equal(index, brute.argmin(1))
    np.testing.assert_allclose(dist, brute.min(1), rtol=1e-5)


def test_a_planted_training_image_is_flagged_and_a_real_test_image_is_not(splits, tmp_path):
    images, patients = splits
    train, test = images["train"], images["test"]
    noise = torch.rand((6, *train.shape[1:]), generator=torch.Generator().manual_seed(1)) * 0.2 + 0.1
    generated = torch.cat([noise[:3], train[5:6], test[2:3], noise[3:]])  # sample 3: a copy; sample 4: unseen
    result = mem.audit(generated, train, test, chunk=4, progress=False)
    assert result["flagged"].tolist() == [3]
    assert result["index"][3] == 5 and result["distance"][3] < 1e-3 and result["ratio"][3] < 1e-2
    assert result["distance"][4] == pytest.approx(result["test_distance"][2])
    assert result["threshold"] == result["test_distance"].min() > 0
    s = mem.write_audit(tmp_path, result, generated, train, patients)
    assert s["n_flagged"] == 1 and s["flagged"][0]["train_patient"] == patients[5]
    assert json.loads((tmp_path / "memorisation.json").read_text())["flagged"][0]["sample"] == 3
    rows = (tmp_path / "memorisation.csv").read_text().splitlines()
    assert len(rows) == 1 + len(generated) and rows[4].endswith(",1")
    for png in ("memorisation_hist.png", "memorisation_pairs.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "flagged (closer than the real test images' 1st percentile): 1 of 8" in mem.report_section(s)


def test_cli_audits_an_exported_dataset(tiny_data, splits, tmp_path, capsys):
    images, _ = splits
    train = load_dataset(tiny_data)["train"]
    save_dataset(tmp_path / "synth.npz", {"train": [train[0], train[1]]})  # two copies of training images
    assert mem.main(["--generated", str(tmp_path / "synth.npz"), "--data_path", str(tiny_data),
                     "--output_dir", str(tmp_path / "audit")]) == 0
    assert "flagged (closer than the real test images' 1st percentile): 2 of 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"nothing.npz"):
        mem.main(["--generated", str(tmp_path / "nothing.npz"), "--data_path", str(tiny_data), "--output_dir", "x"])
