"""3-D data: NIfTI volumes in and out, 3-D records in .npz files, and their validation."""

from __future__ import annotations

import numpy as np
import pytest

from utils.data.dataset_io import DatasetError, load_dataset, save_dataset, validate_dataset
from utils.data.nifti import read_volume, voxel_spacing, write_volume

D, H, W = 5, 6, 7


def oblique_affine() -> np.ndarray:
    """An anisotropic, rotated, shifted voxel -> world map (spacing 1.5, 0.8, 2.0 mm)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 0.8, 2.0])
    affine[:3, 3] = [-12.0, 30.5, 7.25]
    return affine


def volume_record(seed: int, affine: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    rec = {"image": rng.integers(0, 256, (1, D, H, W), dtype=np.uint8),
           "mask": rng.integers(0, 4, (1, D, H, W), dtype=np.uint8),
           "class": seed % 2, "metadata": {"patient": f"p{seed}"}}
    if affine:
        rec["affine"] = oblique_affine() + seed
    return rec


def volume_dataset(affine: bool = True) -> dict:
    return {"train": [volume_record(0, affine), volume_record(1, affine)], "valid": [volume_record(2, affine)],
            "test": [volume_record(3, affine)]}


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_nifti_round_trip_keeps_array_and_affine(tmp_path, name):
    image = np.random.default_rng(0).random((D, H, W)).astype(np.float32)
    path = write_volume(tmp_path / name, image, oblique_affine())
    array, affine = read_volume(path)
    assert array.shape == (D, H, W)  # the voxel axes, not transposed
    np.testing.assert_array_equal(array, image)
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-6)
    np.testing.assert_allclose(voxel_spacing(affine), [1.5, 0.8, 2.0], atol=1e-6)


def test_labels_are_written_as_uint8(tmp_path):
    labels = np.random.default_rng(0).integers(0, 4, (D, H, W)).astype(np.int64)
    array, _ = read_volume(write_volume(tmp_path / "m.nii.gz", labels, np.eye(4), labels=True))
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, labels)
    with pytest.raises(ValueError, match="integers in 0..255"):
        write_volume(tmp_path / "bad.nii.gz", labels + 0.5, np.eye(4), labels=True)


def test_read_volume_names_the_file_it_cannot_use(tmp_path):
    import nibabel as nib

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(DatasetError, match="broken.nii.gz: cannot read as NIfTI"):
        read_volume(broken)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), flat)
    with pytest.raises(DatasetError, match=r"flat.nii.gz: NIfTI data has shape \[4, 5\], expected a 3-D"):
        read_volume(flat)
    singleton = tmp_path / "singleton.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((D, H, W, 1), np.float32), np.eye(4)), singleton)
    assert read_volume(singleton)[0].shape == (D, H, W)


def test_npz_round_trip_of_volumes_keeps_arrays_and_affines(tmp_path):
    data = volume_dataset()
    path = save_dataset(tmp_path / "v.npz", data)
    with np.load(path) as z:
        assert z["train_images"].shape == (2, 1, D, H, W) and z["train_affine"].shape == (2, 4, 4)
    loaded = load_dataset(path)
    validate_dataset(loaded, path, num_classes=4, image_size=(D, H, W), spatial_dims=3)
    for split in data:
        for a, b in zip(data[split], loaded[split], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
            np.testing.assert_array_equal(a["affine"], b["affine"])
            assert b["affine"].dtype == np.float64 and b["class"] == a["class"]


def test_npz_volumes_without_affine_have_none(tmp_path):
    loaded = load_dataset(save_dataset(tmp_path / "v.npz", volume_dataset(affine=False)))
    assert "affine" not in loaded["train"][0]
    data = volume_dataset()
    del data["train"][1]["affine"]
    with pytest.raises(DatasetError, match="1 of 2 'train' records have an affine"):
        save_dataset(tmp_path / "mixed.npz", data)


def test_pickled_volume_records_keep_their_affine(tmp_path):
    loaded = load_dataset(save_dataset(tmp_path / "v.pkl", volume_dataset()))
    np.testing.assert_array_equal(loaded["valid"][0]["affine"], oblique_affine() + 2)


def test_validation_of_volumes_names_the_record_and_what_was_expected():
    data = volume_dataset()
    validate_dataset(data, "v.npz", image_size=None, spatial_dims=3)
    with pytest.raises(DatasetError, match=r"v.npz: train\[0\]: image is 5x6x7, expected 8x8x8"):
        validate_dataset(data, "v.npz", image_size=8)
    with pytest.raises(DatasetError, match=r"train\[0\]: image has shape \[1, 5, 6, 7\] \(3-D\), but the model "
                       r"is 2-D \(model_args.spatial_dims\) and expects \[1, H, W\]"):
        validate_dataset(data, "v.npz", spatial_dims=2)
    data["valid"][0]["affine"] = np.eye(3)
    with pytest.raises(DatasetError, match=r"valid\[0\]: affine has shape \[3, 3\]"):
        validate_dataset(data, "v.npz")
    data["valid"][0]["affine"] = np.eye(4)
    data["test"][0]["mask"] = data["test"][0]["mask"][:, :, :-1]
    with pytest.raises(DatasetError, match=r"test\[0\]: mask has shape \[1, 5, 5, 7\] but image has"):
        validate_dataset(data, "v.npz")


def test_validation_refuses_a_2d_dataset_for_a_3d_model():
    rec = {"image": np.zeros((1, H, W), np.uint8), "mask": np.zeros((1, H, W), np.uint8)}
    data = {"train": [rec], "valid": [rec], "test": [rec]}
    validate_dataset(data, "d.npz", image_size=(H, W), spatial_dims=2)
    with pytest.raises(DatasetError, match=r"d.npz: train\[0\]: image has shape \[1, 6, 7\] \(2-D\), but the "
                       r"model is 3-D \(model_args.spatial_dims\) and expects \[1, D, H, W\]"):
        validate_dataset(data, "d.npz", spatial_dims=3)
