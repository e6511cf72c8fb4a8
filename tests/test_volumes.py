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


# --- NIfTI folders --------------------------------------------------------------------------------------------


def write_pair(root, split: str, name: str, image, mask, affine, mask_affine=None):
    write_volume(root / split / "images" / f"{name}.nii.gz", image, affine)
    write_volume(root / split / "masks" / f"{name}.nii.gz", mask, oblique_affine() if mask_affine is None
                 else mask_affine, labels=True)


def nifti_folder(root, shapes=((D, H, W),) * 3):
    """train/valid/test NIfTI pairs; a train image is int16 with an outlier, its mask has labels 0..3."""
    rng = np.random.default_rng(0)
    for split, shape in zip(("train", "valid", "test"), shapes):
        for name in ("b_case", "a_case"):
            image = rng.integers(-100, 900, shape).astype(np.int16)
            write_pair(root, split, name, image, rng.integers(0, 4, shape), oblique_affine(), oblique_affine())
    return root


def test_nifti_folder_pairs_files_by_name_and_keeps_the_affine(tmp_path):
    root = nifti_folder(tmp_path / "ds")
    (root / "train" / "images" / "notes.txt").write_text("ignored: neither PNG nor NIfTI")
    data = load_dataset(root)
    assert list(data) == ["train", "valid", "test"]
    names = [r["metadata"]["name"] for r in data["train"]]
    assert names == ["a_case", "b_case"]
    mask, _ = read_volume(root / "train" / "masks" / "b_case.nii.gz")
    rec = data["train"][1]
    np.testing.assert_array_equal(rec["mask"][0], mask)
    np.testing.assert_allclose(rec["affine"], oblique_affine(), atol=1e-6)
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (1, D, H, W)
    assert rec["image"].min() == 0 and rec["image"].max() == 255  # the per-volume percentile window
    validate_dataset(data, root, image_size=(D, H, W), spatial_dims=3)


def test_percentile_window_ignores_a_few_outliers():
    from utils.data.nifti_folder import volume_to_uint8

    volume = np.linspace(0.0, 1.0, 1000).reshape(10, 10, 10)
    volume[0, 0, 0] = 1e6  # one hot voxel would make every other voxel 0 under a min-max rule
    out = volume_to_uint8(volume, "v.nii")
    assert out[5, 5, 5] == np.rint((volume[5, 5, 5] - np.percentile(volume, 0.5))
                                   / (np.percentile(volume, 99.5) - np.percentile(volume, 0.5)) * 255)
    assert 120 <= out[5, 0, 0] <= 135 and out[0, 0, 0] == 255
    assert not volume_to_uint8(np.full((2, 2, 2), 7.0), "c.nii").any()


def test_a_folder_mixing_png_and_nifti_is_refused(tmp_path):
    from PIL import Image

    root = nifti_folder(tmp_path / "ds")
    for sub in ("images", "masks"):
        Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "valid" / sub / "c_case.png")
    with pytest.raises(DatasetError, match=r"ds/valid: holds both PNG .* and NIfTI .* files; use one format"):
        load_dataset(root)
    for sub in ("images", "masks"):
        for p in (root / "valid" / sub).glob("*.nii.gz"):
            p.unlink()
    with pytest.raises(DatasetError, match=r"ds: splits hold different file formats .*'valid': 'png'"):
        load_dataset(root)


def bad_pair_message(tmp_path, **change) -> str:
    """The DatasetError of a folder whose train/x pair is ``nifti_folder``'s but for ``change``."""
    root = nifti_folder(tmp_path / "ds")
    rng = np.random.default_rng(1)
    pair = {"image": rng.random((D, H, W)), "mask": rng.integers(0, 4, (D, H, W)), "affine": oblique_affine(),
            "mask_affine": oblique_affine(), **change}
    write_volume(root / "train" / "images" / "x.nii.gz", pair["image"], pair["affine"])
    write_volume(root / "train" / "masks" / "x.nii.gz", pair["mask"], pair["mask_affine"],
                 labels=pair["mask"].dtype.kind in "iu" and pair["mask"].min() >= 0 and pair["mask"].max() < 256)
    with pytest.raises(DatasetError) as info:
        validate_dataset(load_dataset(root), root, num_classes=4)
    return str(info.value)


def test_nifti_pair_errors_name_the_file_and_what_was_expected(tmp_path):
    mask_file = str(tmp_path / "ds" / "train" / "masks" / "x.nii.gz")
    image_file = str(tmp_path / "ds" / "train" / "images" / "x.nii.gz")
    msg = bad_pair_message(tmp_path / "shape", mask=np.zeros((D, H, W + 1), np.uint8))
    assert msg.startswith(mask_file.replace(str(tmp_path), str(tmp_path / "shape")))
    assert "mask has shape [5, 6, 8] but its image" in msg and "has [5, 6, 7]" in msg
    stretched = oblique_affine() @ np.diag([1.0, 1.0, 1.01, 1.0])
    msg = bad_pair_message(tmp_path / "spacing", mask_affine=stretched)
    assert "masks/x.nii.gz: voxel spacing 1.5 x 0.8 x 2.02 mm differs from its image" in msg
    assert "images/x.nii.gz (1.5 x 0.8 x 2 mm)" in msg
    shifted = oblique_affine() + np.pad(np.ones((3, 1)) * 0.01, ((0, 1), (3, 0)))
    msg = bad_pair_message(tmp_path / "origin", mask_affine=shifted)
    assert "masks/x.nii.gz: affine differs from its image" in msg and "by up to 0.01" in msg
    assert "masks/x.nii.gz: mask holds the non-integer value 0.5" in bad_pair_message(
        tmp_path / "float", mask=np.full((D, H, W), 0.5, np.float32))
    assert "masks/x.nii.gz: mask labels span [-1, -1]" in bad_pair_message(
        tmp_path / "negative", mask=np.full((D, H, W), -1, np.int16))
    msg = bad_pair_message(tmp_path / "range", mask=np.full((D, H, W), 7, np.uint8))
    assert msg.startswith(f"{tmp_path / 'range' / 'ds'}: train[2] (x): mask labels [7] outside 0..3")
    assert image_file.endswith("images/x.nii.gz")


def test_a_2d_nifti_file_and_an_unpaired_file_are_named(tmp_path):
    import nibabel as nib

    root = nifti_folder(tmp_path / "ds")
    flat = root / "test" / "images" / "a_case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((H, W), np.float32), np.eye(4)), flat)
    with pytest.raises(DatasetError, match=r"test/images/a_case.nii.gz: NIfTI data has shape \[6, 7\]"):
        load_dataset(root)
    (root / "valid" / "masks" / "b_case.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"valid/images/b_case.nii.gz: no file of the same name in .*masks"):
        load_dataset(root)


# --- resampling to the configured cube ------------------------------------------------------------------------


def world(affine, index) -> np.ndarray:
    """World coordinates ``[..., 3]`` of voxel indices ``[..., 3]``."""
    return np.asarray(index, np.float64) @ affine[:3, :3].T + affine[:3, 3]


def test_cube_padding_makes_a_physical_cube():
    from utils.data.resample import cube_padding

    # 10 x 2 mm = 20 mm, 12 x 1 mm, 4 x 4 mm: the cube is 20 mm, i.e. 10, 20 and 5 voxels
    assert cube_padding((10, 12, 4), (2.0, 1.0, 4.0)) == [(0, 0), (4, 4), (0, 1)]


def test_resampling_keeps_every_voxel_at_its_world_position():
    """An image equal to its voxels' world x stays so after resampling: trilinear interpolation is exact on a
    linear function (2:1 down-sampling reads only interior points, and the cube needs no padding)."""
    from utils.data.resample import fit_volume

    affine = oblique_affine() @ np.diag([2 / 1.5, 2 / 0.8, 1.0, 1.0])  # isotropic 2 mm, rotated, shifted
    grid = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"), axis=-1)
    image = world(affine, grid)[..., 0][None].astype(np.float32)
    out, _, new_affine = fit_volume(image, np.zeros(image.shape, np.uint8), affine, 6)
    out_grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), axis=-1)
    np.testing.assert_allclose(out[0], world(new_affine, out_grid)[..., 0], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [4.0, 4.0, 4.0])


def test_resampled_masks_stay_labels_at_the_same_world_place():
    from utils.data.resample import fit_mask, fit_volume

    shape = (10, 24, 6)  # with spacing (1.5, 0.8, 2.0) mm: 15 x 19.2 x 12 mm, padded to a 19.2 mm cube
    mask = np.zeros((1, *shape), np.uint8)
    mask[0, 3:7, 12:20, 2:4] = 2
    mask[0, 4:6, 14:18, 2:4] = 3
    image = (mask * 60).astype(np.uint8)
    out_image, out_mask, new_affine = fit_volume(image, mask, oblique_affine(), 16)
    assert out_mask.shape == out_image.shape == (1, 16, 16, 16)
    assert out_mask.dtype == np.uint8 and out_image.dtype == np.uint8
    assert set(np.unique(out_mask)) == {0, 2, 3}
    before = world(oblique_affine(), np.argwhere(mask[0] > 0).mean(axis=0))
    after = world(new_affine, np.argwhere(out_mask[0] > 0).mean(axis=0))
    assert np.linalg.norm(after - before) < 0.6  # well under one output voxel (1.2 mm)
    # padded to 13, 24 and 10 voxels (19.5, 19.2, 20 mm: isotropic up to the rounding), each resized to 16
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), np.array([19.5, 19.2, 20.0]) / 16)
    mask_only, mask_affine = fit_mask(mask, oblique_affine(), 16)  # a mask alone fits the same way
    np.testing.assert_array_equal(mask_only, out_mask)
    np.testing.assert_array_equal(mask_affine, new_affine)


def test_a_volume_of_the_configured_size_is_untouched():
    from utils.data.resample import fit_records

    rec = volume_record(0)
    rec["image"] = np.zeros((1, 4, 4, 4), np.uint8)
    out, changed = fit_records([rec], 4)
    assert changed == 0 and out[0] is rec


# --- the synthetic brain phantom ------------------------------------------------------------------------------


def test_brain_phantom_is_deterministic_labelled_and_varied():
    from utils.data.synthetic_brain import build_brain_dataset, render_brain

    data = build_brain_dataset(16, (3, 1, 1), seed=5, progress=False)
    again = build_brain_dataset(16, (1, 1, 3), seed=5, progress=False)
    first = data["train"][0]
    np.testing.assert_array_equal(first["image"], again["train"][0]["image"])  # patient 0 whatever the splits
    np.testing.assert_array_equal(first["mask"], again["train"][0]["mask"])
    assert first["image"].shape == first["mask"].shape == (1, 16, 16, 16)
    assert first["metadata"] == {"patient": "brain0001", "split": "train",
                                 "class_name": ("left", "right")[first["class"]]}
    for rec in (r for recs in data.values() for r in recs):  # every label in every volume, even at 16^3
        assert set(np.unique(rec["mask"])) == {0, 1, 2, 3}
    images = [r["image"] for r in data["train"]]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(data["train"][0]["mask"],
                                                                             data["train"][1]["mask"])
    assert not np.array_equal(render_brain(16, 6, 0)[0], first["image"][0])  # the seed matters
    validate_dataset(data, "brain", num_classes=4, image_size=16, spatial_dims=3)


def test_brain_tumour_lies_in_its_hemisphere():
    from utils.data.synthetic_brain import render_brain

    hemispheres = set()
    for index in range(8):
        _, mask, hemisphere = render_brain(24, 0, index)
        core = np.argwhere(mask == 1).mean(axis=0)
        assert (core[0] > 11.5) == bool(hemisphere)  # axis d runs left -> right; 11.5 is the middle
        hemispheres.add(hemisphere)
    assert hemispheres == {0, 1}


def test_ensure_synthetic_dataset_builds_the_brain_for_3d(tmp_path):
    from utils.data.synthetic_echo import ensure_synthetic_dataset

    path = ensure_synthetic_dataset(tmp_path / "brain.npz", 16, (2, 1, 1), seed=0, dims=3)
    data = load_dataset(path)
    assert data["train"][0]["image"].shape == (1, 16, 16, 16) and data["train"][0]["affine"].shape == (4, 4)
    assert ensure_synthetic_dataset(path, 16, (2, 1, 1), seed=0, dims=3) == path  # reused
    with pytest.raises(DatasetError, match=r"brain.npz: existing synthetic dataset has images \(1, 16, 16, 16\).*"
                       r"expected \(1, 16, 16\)"):
        ensure_synthetic_dataset(path, 16, (2, 1, 1), seed=0, dims=2)


def test_cli_writes_the_brain_as_a_nifti_folder_and_a_png(tmp_path):
    from PIL import Image

    from utils.data import synthetic_echo

    out, png = tmp_path / "brain_nifti", tmp_path / "examples.png"
    synthetic_echo.main(["--dims", "3", "--output", str(out), "--size", "16", "--patients", "2", "1", "1",
                         "--examples", str(png)])
    data = load_dataset(out)
    assert [r["metadata"]["name"] for r in data["train"]] == ["brain0001", "brain0002"]
    np.testing.assert_allclose(data["valid"][0]["affine"], np.diag([12.5, 12.5, 12.5, 1.0]) +
                               np.pad([[-93.75], [-93.75], [-93.75]], ((0, 1), (3, 0))))
    validate_dataset(data, out, image_size=16, spatial_dims=3)
    with Image.open(png) as im:
        assert im.size == (3 * 16, 2 * 2 * 16)  # 3 orthogonal slices; a grey and an overlay row per patient
    with pytest.raises(SystemExit):
        synthetic_echo.main(["--output", str(tmp_path / "folder")])  # 2-D has no NIfTI output


# --- training data of a 3-D model -----------------------------------------------------------------------------


def test_training_data_of_a_3d_model_are_fitted_cubes(tmp_path):
    from utils.config import DataConfig
    from utils.data.datamodule import EchoDataModule

    root = nifti_folder(tmp_path / "ds", shapes=((D, H, W), (7, 5, 4), (6, 6, 6)))
    dm = EchoDataModule(DataConfig(path=str(root), image_size=8, num_workers=0), 2, 0, spatial_dims=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["x_1"].shape == batch["mask"].shape == (2, 1, 8, 8, 8)
    assert batch["x_1"].min() >= -1 and batch["x_1"].max() <= 1 and batch["x_1"].dtype.is_floating_point
    assert len(dm.label_values("mean_intensity")) == 4
    assert all(r["image"].shape == (1, 8, 8, 8) for r in dm.data["test"])


def test_a_dataset_of_the_other_dimensionality_is_refused(tmp_path, tiny_data):
    from utils.config import DataConfig
    from utils.data.datamodule import load_training_data

    with pytest.raises(DatasetError, match=rf"{tiny_data}: train\[0\]: image has shape \[1, 32, 32\] \(2-D\), but "
                       r"the model is 3-D \(model_args.spatial_dims\) and expects \[1, 32, 32, 32\]"):
        load_training_data(DataConfig(path=str(tiny_data), image_size=32), spatial_dims=3)
    volumes = save_dataset(tmp_path / "v.npz", volume_dataset())
    with pytest.raises(DatasetError, match=r"v.npz: train\[0\]: image has shape \[1, 5, 6, 7\] \(3-D\), but the "
                       r"model is 2-D \(model_args.spatial_dims\) and expects \[1, 8, 8\]"):
        load_training_data(DataConfig(path=str(volumes), image_size=8))


def test_a_3d_config_builds_the_brain_phantom_when_the_file_is_missing(tmp_path):
    from utils.data.datamodule import load_training_data
    from utils.methods import load_config

    cfg = load_config("configs/tiny.yaml", ["model_args.spatial_dims=3", "data_args.image_size=16",
                                            "data_args.synthetic.size=16", f"data_args.path={tmp_path / 'b.npz'}"])
    data = load_training_data(cfg.data_args, spatial_dims=cfg.model_args.spatial_dims)
    assert len(data["train"]) == 4 and data["train"][0]["mask"].shape == (1, 16, 16, 16)


def test_spatial_dims_and_the_phantom_size_are_checked():
    from utils.config import ConfigError
    from utils.methods import load_config

    with pytest.raises(ConfigError, match="model_args.spatial_dims must be 2 or 3, got 4"):
        load_config("configs/tiny.yaml", ["model_args.spatial_dims=4"])
    with pytest.raises(ConfigError, match="data_args.synthetic.size must be >= 32 for the 2-D echo phantom"):
        load_config("configs/tiny.yaml", ["data_args.image_size=16", "data_args.synthetic.size=16"])


def test_a_singular_affine_is_refused_naming_the_record_or_file(tmp_path):
    """A voxel axis of size 0 would divide by zero when the volume is fitted; it is refused where it is read
    (naming the split and record) or written (naming the file), not deep inside the resampling."""
    from utils.data.dataset_io import DatasetError, load_dataset, save_dataset
    from utils.data.nifti import write_volume

    rec = volume_record(0)
    singular = np.diag([1.0, 1.0, 0.0, 1.0])
    save_dataset(tmp_path / "d.npz", {"train": [{**rec, "affine": singular}]})
    with pytest.raises(DatasetError, match=r"d.npz: train\[0\]: affine is singular"):
        load_dataset(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"v.nii.gz: the affine is not finite or is singular"):
        write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 4), np.uint8), singular)
