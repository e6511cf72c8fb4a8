"""inferer.py --export: a synthetic dataset file that the dataset loader reads back, with its manifest."""

import json

import numpy as np
import pytest
import torch

import inferer
from utils.data.dataset_io import load_dataset, to_uint8, validate_dataset
from utils.generation.checkpoints import find_checkpoint
from utils.generation.generate import generate
from utils.generation.outputs import export_dataset
from utils.methods import load_module


def _export(tiny_run, path, *extra):
    return inferer.main(["--checkpoint", str(tiny_run), "--num_steps", "2", "--split", "train",
                         "--num_samples", "6", "--seed", "3", "--export", str(path), *extra])


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
def test_export_round_trips_through_the_dataset_loader(tiny_run, tiny_data, tmp_path, suffix):
    path = tmp_path / f"synth{suffix}"
    assert _export(tiny_run, path) == 0
    data = load_dataset(path)
    validate_dataset(data, path, num_classes=4, image_size=32, splits=("train",))
    assert list(data) == ["train"]
    train = load_dataset(tiny_data)["train"]  # 16 records: the 6 samples use masks 0..5
    module = load_module(find_checkpoint(tiny_run))
    masks = torch.from_numpy(np.stack([train[i]["mask"] for i in range(6)]))
    expected = generate(module, masks, torch.arange(6), 3, 2, "euler", 8, ["cpu"], progress=False).images
    for i, record in enumerate(data["train"]):
        assert record["image"].dtype == np.uint8 and record["image"].shape == (1, 32, 32)
        assert np.array_equal(record["mask"], train[i]["mask"])  # the mask that conditioned the image
        assert np.abs(record["image"].astype(int) - to_uint8(expected[i].numpy()).astype(int)).max() <= 1
        assert record["metadata"]["source_patient"] == train[i]["metadata"]["patient"]
        assert "patient" not in record["metadata"]
    manifest = json.loads((tmp_path / "synth.manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["split"] == "train" and manifest["num_records"] == 6
    assert manifest["mask_source"].startswith("split 'train'") and len(manifest["checkpoint_sha256"]) == 64


def test_export_never_overwrites_without_the_flag(tiny_run, tmp_path):
    path = tmp_path / "synth.npz"
    path.write_bytes(b"mine")
    with pytest.raises(SystemExit, match=r"synth.npz exists; pass --overwrite"):
        _export(tiny_run, path)
    assert path.read_bytes() == b"mine"
    assert _export(tiny_run, path, "--overwrite", "--export_split", "valid") == 0
    assert list(load_dataset(path)) == ["valid"]


def test_export_refuses_an_unknown_suffix_before_generating(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match=r"synth.h5: unknown export format '.h5'"):
        _export(tiny_run, tmp_path / "synth.h5")


def test_export_keeps_the_class_of_every_source(tmp_path):
    images = torch.rand(3, 1, 8, 8)
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    sources = [{"source": i, "class": i % 2, "patient": f"p{i}"} for i in range(3)]
    export_dataset(tmp_path / "s.npz", images, masks, sources, {"seed": 0})
    data = load_dataset(tmp_path / "s.npz")
    assert [r["class"] for r in data["train"]] == [0, 1, 0]
    assert [r["metadata"]["source_patient"] for r in data["train"]] == ["p0", "p1", "p2"]
