"""Dataset formats: .npz, restricted pickles (numpy, torch, MOTFM), PNG folders, validation, dataset_info."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import dataset_info
from utils.data.dataset_io import DatasetError, load_dataset, save_dataset, validate_dataset

H, W = 8, 6


def record(patient: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (1, H, W), dtype=np.uint8),
        "mask": rng.integers(0, 4, (1, H, W), dtype=np.uint8),
        "class": seed % 2,
        "metadata": {"patient": patient, "view": "2CH", "phase": "ED"},
    }


def small_dataset() -> dict:
    return {"train": [record("p1", 0), record("p2", 1)], "valid": [record("p3", 2)],
            "test": [record("p4", 3)]}


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
def test_round_trip(tmp_path, suffix):
    data = small_dataset()
    path = save_dataset(tmp_path / f"d{suffix}", data)
    loaded = load_dataset(path)
    assert list(loaded) == ["train", "valid", "test"]
    for split in data:
        for a, b in zip(data[split], loaded[split], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
            assert b["class"] == a["class"] and b["metadata"] == a["metadata"]
    validate_dataset(loaded, path, num_classes=4, image_size=(H, W))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_of_torch_tensors_loads(tmp_path, protocol):
    image = torch.rand(1, H, W)
    mask = torch.randint(0, 4, (1, H, W), dtype=torch.uint8)
    data = {s: [{"image": image, "mask": mask, "class": torch.tensor(3), "metadata": {"patient": s}}]
            for s in ("train", "valid", "test")}
    path = tmp_path / "tensors.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))  # protocol 2 stores bytes via _codecs.encode
    loaded = load_dataset(path)
    rec = loaded["train"][0]
    np.testing.assert_array_equal(rec["image"], image.numpy())
    np.testing.assert_array_equal(rec["mask"], mask.numpy())
    assert rec["class"] == 3 and rec["metadata"] == {"patient": "train"}
    validate_dataset(loaded, path)


class Payload:
    """Unpickling calls ``func(*args)``, which creates the marker file."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker) -> dict:
    return {
        "posix.system": Payload(os.system, f"touch {marker}"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("name", ["posix.system", "subprocess.call", "builtins.eval"])
def test_executable_pickle_is_refused_before_running(tmp_path, name):
    marker = tmp_path / "ran"
    blob = pickle.dumps({"train": [{"image": payloads(marker)[name], "mask": np.zeros((1, 2, 2))}]})
    pickle.loads(blob)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    with pytest.raises(DatasetError, match=f"{path}: refused to unpickle global '{name}'"):
        load_dataset(path)
    assert not marker.exists()


def test_payload_hidden_in_a_torch_storage_is_refused(tmp_path):
    marker = tmp_path / "ran"
    inner = pickle.dumps(payloads(marker)["posix.system"], protocol=2)
    blob = pickle.dumps({"train": [{"image": Payload(torch.storage._load_from_bytes, inner)}]})
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    with pytest.raises(DatasetError, match=f"{path}: refused a torch tensor storage"):
        load_dataset(path)
    assert not marker.exists()


def motfm_record(i: int, cls: str) -> dict:
    """MOTFM's layout: [H, W] float image in [0, 1], float label mask, string class, top-level name."""
    rng = np.random.default_rng(i)
    return {"image": rng.random((H, W), dtype=np.float32),
            "mask": rng.integers(0, 4, (H, W)).astype(np.float32),
            "class": cls, "name": f"patient{i:04d}_{cls}"}


def test_motfm_pickle_loads_without_conversion(tmp_path):
    raw = {"train": [motfm_record(1, "4CH_ES"), motfm_record(2, "2CH_ED")],
           "valid": [motfm_record(3, "4CH_ED")], "test": [motfm_record(4, "2CH_ED")]}
    path = tmp_path / "motfm.pkl"
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    data = load_dataset(path)
    validate_dataset(data, path, num_classes=4, image_size=(H, W))
    first = data["train"][0]
    assert first["image"].shape == (1, H, W) and first["image"].dtype == np.float32
    assert first["mask"].shape == (1, H, W) and first["mask"].dtype == np.uint8
    np.testing.assert_array_equal(first["mask"][0], raw["train"][0]["mask"].astype(np.uint8))
    # classes index the sorted set of names over all splits: 2CH_ED 0, 4CH_ED 1, 4CH_ES 2
    assert [r["class"] for s in ("train", "valid", "test") for r in data[s]] == [2, 0, 1, 0]
    assert first["metadata"] == {"class_name": "4CH_ES", "name": "patient0001_4CH_ES"}


def test_float_image_outside_unit_range_is_refused(tmp_path):
    raw = {s: [motfm_record(1, "a"), motfm_record(2, "a")] for s in ("train", "valid", "test")}
    raw["valid"][1]["image"] = raw["valid"][1]["image"] * 255.0
    path = tmp_path / "scaled.pkl"
    path.write_bytes(pickle.dumps(raw))
    data = load_dataset(path)
    with pytest.raises(DatasetError, match=r"scaled.pkl: valid\[1\] \(\w+\): float image values span .* divide"):
        validate_dataset(data, path)


def test_mask_rescaled_to_unit_range_is_refused(tmp_path):
    raw = {"train": [motfm_record(1, "a")]}
    raw["train"][0]["mask"] = raw["train"][0]["mask"] / 3.0
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(DatasetError, match=r"m.pkl: train\[0\]: mask holds the non-integer value"):
        load_dataset(path)


def _set(split, i, key, value):
    def mutate(data):
        data[split][i][key] = value
    return mutate


INVALID = {
    "missing split": (lambda d: d.pop("valid"), r"missing split 'valid'"),
    "empty split": (lambda d: d.update(test=[]), r"split 'test' is empty"),
    "shape mismatch": (_set("train", 1, "mask", np.zeros((1, H, W + 1), np.uint8)),
                       r"train\[1\]: mask has shape \[1, 8, 7\] but image has \[1, 8, 6\]"),
    "label outside classes": (_set("train", 1, "mask", np.full((1, H, W), 4, np.uint8)),
                              r"train\[1\]: mask labels \[4\] outside 0..3"),
    "nan image": (_set("valid", 0, "image", np.full((1, H, W), np.nan, np.float32)),
                  r"valid\[0\]: image holds NaN or inf"),
    "wrong dimensions": (_set("train", 1, "image", np.zeros((H, W), np.uint8)),
                         r"train\[1\]: image has shape \[8, 6\], expected \[1, H, W\]"),
    "mixed sizes": (lambda d: d["train"][1].update(image=np.zeros((1, 4, 4), np.uint8),
                                                   mask=np.zeros((1, 4, 4), np.uint8)),
                    r"train\[1\]: image has shape \[1, 4, 4\], earlier records \[1, 8, 6\]"),
    "patient in two splits": (lambda d: d["test"][0]["metadata"].update(patient="p1"),
                              r"patient 'p1' appears in splits \['test', 'train'\]"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_validate_dataset_names_the_problem(case):
    mutate, message = INVALID[case]
    data = small_dataset()
    mutate(data)
    with pytest.raises(DatasetError, match=f"^data.npz: .*{message}"):
        validate_dataset(data, "data.npz", num_classes=4)


def test_validate_dataset_checks_the_image_size():
    with pytest.raises(DatasetError, match=r"data.npz: train\[0\]: image is 8x6, expected 16x16"):
        validate_dataset(small_dataset(), "data.npz", image_size=16)


def write_png(path, array, mode="L"):
    """``mode`` 'P' writes the values as palette indices (a colour label PNG), others convert."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.fromarray(array).convert("P")
        im.putpalette([v for i in range(256) for v in (i * 40 % 256, i * 90 % 256, 255 - i)])
    else:
        im = Image.fromarray(array).convert(mode)
    im.save(path)


def make_folder(root, splits=("train", "valid", "test"), names=("b", "a")):
    for s, split in enumerate(splits):
        for n, name in enumerate(names):
            rec = record(f"{split}{name}", 10 * s + n)
            write_png(root / split / "images" / f"{name}.png", rec["image"][0])
            write_png(root / split / "masks" / f"{name}.png", rec["mask"][0], mode="P" if n else "L")


def test_folder_dataset_with_splits(tmp_path):
    make_folder(tmp_path)
    data = load_dataset(tmp_path)
    assert list(data) == ["train", "valid", "test"]
    assert [r["metadata"]["name"] for r in data["train"]] == ["a", "b"]  # sorted by stem
    expected = record("", 1)  # train/a.png was written from seed 1, its mask as a palette PNG
    np.testing.assert_array_equal(data["train"][0]["image"], expected["image"])
    np.testing.assert_array_equal(data["train"][0]["mask"], expected["mask"])
    validate_dataset(data, tmp_path, image_size=(H, W))


def test_flat_folder_is_the_test_split(tmp_path):
    rec = record("x", 5)
    write_png(tmp_path / "images" / "x.png", rec["image"][0])
    write_png(tmp_path / "masks" / "x.png", rec["mask"][0])
    data = load_dataset(tmp_path)
    assert list(data) == ["test"] and len(data["test"]) == 1
    validate_dataset(data, tmp_path, splits=("test",))


def test_folder_errors_name_the_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "valid" / "masks" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"valid/images/a.png: no file of the same name in .*valid/masks"):
        load_dataset(tmp_path)
    write_png(tmp_path / "valid" / "masks" / "a.png", np.zeros((H, W), np.uint8))
    write_png(tmp_path / "test" / "images" / "b.png", np.zeros((H, W, 3), np.uint8), mode="RGB")
    with pytest.raises(DatasetError, match=r"test/images/b.png: PIL mode 'RGB', expected an 8-bit grayscale"):
        load_dataset(tmp_path)
    (tmp_path / "test" / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=r"test/images/b.png: cannot read as PNG"):
        load_dataset(tmp_path)


def test_dataset_info_reports_and_validates(tmp_path, capsys):
    path = save_dataset(tmp_path / "d.npz", small_dataset())
    assert dataset_info.main([str(path), "--image_size", "8"]) == 1  # 8x6 images
    assert "INVALID" in capsys.readouterr().out
    assert dataset_info.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "train: 2 records, 2 patients" in out and "patients shared between splits: none" in out
    assert "labels: 0:" in out and "view: {'2CH': 2}" in out and out.strip().endswith("4 classes")
    bad = small_dataset()
    bad["test"][0]["mask"][0, 0, 0] = 9
    path = save_dataset(tmp_path / "bad.pkl", bad)
    assert dataset_info.main([str(path)]) == 1
    assert r"test[0]: mask labels [9] outside 0..3" in capsys.readouterr().out


def test_saving_an_empty_split_to_npz_is_a_named_error(tmp_path):
    record = {"image": np.zeros((1, 4, 4), np.uint8), "mask": np.zeros((1, 4, 4), np.uint8)}
    with pytest.raises(DatasetError, match="split 'valid' is empty"):
        save_dataset(tmp_path / "d.npz", {"train": [record], "valid": []})
    assert not (tmp_path / "d.npz").exists()
