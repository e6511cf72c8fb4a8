"""CAMUS converter on small fake releases written the way the real ones store their files.

NIfTI (public release, read with nibabel): the 2D array is stored ``[x, y]`` = ``[cols, rows]``,
i.e. the displayed image transposed. MetaImage (2019 challenge, read with SimpleITK): written
from a ``[rows, cols]`` array. Both must come out identical, with the apex at the top.
"""

from __future__ import annotations

import numpy as np
import pytest

from utils.data.camus import (
    CamusFileError,
    build_parser,
    convert_camus,
    main,
    resize_image,
    resize_mask,
    split_counts,
)
from utils.data.dataset_io import load_dataset, validate_dataset

ROWS, COLS, SIZE = 48, 40, 32  # original image [rows, cols]; converted to SIZE x SIZE
ROW_MM, COL_MM = 0.5, 0.25
QUALITIES = ("Good", "Medium", "Poor")
LV_CENTRE, LA_CENTRE = (0.38, 0.38), (0.78, 0.5)  # (row, col) as fractions of the image


def phantom(patient: int, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` uint8 ``[ROWS, COLS]``, displayed orientation: LV upper left, LA below it.

    The background brightens from left to right (60 + 2 * col), so a flipped or transposed image
    is visible in the intensities too.
    """
    r, c = np.mgrid[0:ROWS, 0:COLS].astype(float)

    def inside(centre, half_rows, half_cols):
        return ((r - centre[0] * ROWS) / half_rows) ** 2 + ((c - centre[1] * COLS) / half_cols) ** 2 <= 1

    lv_rows = 0.2 * ROWS * (1.0 if phase == "ED" else 0.85)
    mask = np.zeros((ROWS, COLS), np.uint8)
    mask[inside(LV_CENTRE, lv_rows + 3, 0.12 * COLS + 3)] = 2
    mask[inside(LV_CENTRE, lv_rows, 0.12 * COLS)] = 1
    mask[inside(LA_CENTRE, 0.1 * ROWS, 0.12 * COLS)] = 3
    image = (60 + 2 * c + patient).astype(np.uint8)
    image[mask == 1], image[mask == 2], image[mask == 3] = 20, 200, 25
    return image, mask


def info_text(patient: int) -> str:
    return (f"ED: 1\nES: 12\nNbFrame: 20\nSex: F\nAge: {50 + patient}\n"
            f"ImageQuality: {QUALITIES[patient % 3]}\nLVedv: 90.1\nLVesv: 40.2\nLVef: 55.4\n")


def write_nifti(path, array_rows_cols: np.ndarray, transpose: bool = True) -> None:
    import nibabel as nib

    stored = array_rows_cols.T if transpose else array_rows_cols  # the release stores [x=cols, y=rows]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), np.diag([COL_MM, ROW_MM, 1.0, 1.0])), str(path))


def write_mhd(path, array_rows_cols: np.ndarray) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_rows_cols)
    image.SetSpacing((COL_MM, ROW_MM))
    sitk.WriteImage(image, str(path))  # path.mhd + path.raw


def make_release(root, n: int, layout: str, split_files: dict[str, list[int]] | None = None):
    """A fake release: ``layout`` 'nifti' (database_nifti/ [+ database_split/]) or 'mhd' (training/)."""
    folder = root / ("database_nifti" if layout == "nifti" else "training")
    for p in range(1, n + 1):
        pid = f"patient{p:04d}"
        (folder / pid).mkdir(parents=True)
        for view in ("2CH", "4CH"):
            (folder / pid / f"Info_{view}.cfg").write_text(info_text(p))
            for phase in ("ED", "ES"):
                image, mask = phantom(p, phase)
                for suffix, array in (("", image), ("_gt", mask)):
                    stem = folder / pid / f"{pid}_{view}_{phase}{suffix}"
                    if layout == "nifti":
                        write_nifti(f"{stem}.nii.gz", array)
                    else:
                        write_mhd(f"{stem}.mhd", array)
    if split_files:
        (root / "database_split").mkdir()
        for name, ids in split_files.items():
            (root / "database_split" / f"subgroup_{name}.txt").write_text(
                "".join(f"patient{p:04d}\n" for p in ids))
    return folder


OFFICIAL = {"training": [1, 2, 3], "validation": [4], "testing": [5]}


@pytest.fixture(scope="module")
def nifti_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("camus_nifti")
    make_release(root, 5, "nifti", OFFICIAL)
    return root


@pytest.fixture(scope="module")
def mhd_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("camus_mhd")
    make_release(root, 9, "mhd")
    return root


def patients_of(records) -> set[str]:
    return {r["metadata"]["patient"] for r in records}


def assert_records_well_formed(data):
    for split, records in data.items():
        for r in records:
            assert r["image"].shape == (1, SIZE, SIZE) and r["image"].dtype == np.uint8
            assert r["mask"].shape == (1, SIZE, SIZE) and r["mask"].dtype == np.uint8
            meta = r["metadata"]
            assert meta["view"] in ("2CH", "4CH") and meta["phase"] in ("ED", "ES")
            assert meta["image_quality"] == QUALITIES[int(meta["patient"][-4:]) % 3]
            assert (meta["orig_rows"], meta["orig_cols"]) == (ROWS, COLS)
            assert meta["spacing_row_mm"] == pytest.approx(ROW_MM)
            assert meta["spacing_col_mm"] == pytest.approx(COL_MM)
            # orientation: apex on top, LV upper left, LA below it; background brighter to the right
            mask, image = r["mask"][0], r["image"][0]
            lv_r, lv_c = round(LV_CENTRE[0] * SIZE), round(LV_CENTRE[1] * SIZE)
            assert mask[lv_r, lv_c] == 1, (split, meta)
            assert mask[lv_r, SIZE - 1 - lv_c] != 1  # a left-right flip would put LV here
            assert mask[round(LA_CENTRE[0] * SIZE), round(LA_CENTRE[1] * SIZE)] == 3
            assert int(image[1, 2]) < int(image[1, SIZE - 3])
        assert set(np.unique(np.stack([r["mask"] for r in records]))) == {0, 1, 2, 3}
    for a in data:
        for b in data:
            assert a == b or not patients_of(data[a]) & patients_of(data[b])


def test_nifti_release_with_official_split(nifti_release, tmp_path, capsys):
    out = tmp_path / "camus.pkl"
    assert main(["--root", str(nifti_release), "--output", str(out), "--size", str(SIZE)]) == 0
    summary = capsys.readouterr().out
    assert "train: 12 records, 3 patients" in summary and "test: 4 records, 1 patients" in summary
    assert "labels: 0:" in summary and "patients shared between splits: none" in summary
    data = load_dataset(out)
    assert {s: len(r) for s, r in data.items()} == {"train": 12, "valid": 4, "test": 4}
    assert patients_of(data["train"]) == {"patient0001", "patient0002", "patient0003"}
    assert patients_of(data["valid"]) == {"patient0004"} and patients_of(data["test"]) == {"patient0005"}
    assert_records_well_formed(data)
    validate_dataset(data, out, num_classes=4, image_size=SIZE)

    before = out.read_bytes()
    assert main(["--root", str(nifti_release), "--output", str(out), "--size", "16"]) == 1  # no --overwrite
    assert out.read_bytes() == before
    assert main(["--root", str(nifti_release), "--output", str(out), "--size", "16", "--overwrite"]) == 0
    assert load_dataset(out)["train"][0]["image"].shape == (1, 16, 16)


def test_mhd_release_seeded_split_matches_nifti(mhd_release, nifti_release):
    data, skipped = convert_camus(mhd_release, size=SIZE, seed=3)
    assert skipped == []
    assert {s: len(patients_of(r)) for s, r in data.items()} == {"train": 7, "valid": 1, "test": 1}
    assert {s: len(r) for s, r in data.items()} == {"train": 28, "valid": 4, "test": 4}
    assert_records_well_formed(data)
    again, _ = convert_camus(mhd_release, size=SIZE, seed=3)
    assert {s: patients_of(r) for s, r in again.items()} == {s: patients_of(r) for s, r in data.items()}
    # the same phantoms through nibabel (transposed storage) and SimpleITK give identical records
    nifti, _ = convert_camus(nifti_release, size=SIZE)
    by_key = {(r["metadata"]["patient"], r["metadata"]["view"], r["metadata"]["phase"]): r
              for records in data.values() for r in records}
    for r in nifti["train"]:
        m = r["metadata"]
        twin = by_key[(m["patient"], m["view"], m["phase"])]
        np.testing.assert_array_equal(r["image"], twin["image"])
        np.testing.assert_array_equal(r["mask"], twin["mask"])


def test_split_counts():
    assert split_counts(450) == (350, 50, 50)  # 1,400 / 200 / 200 images
    assert split_counts(500) == (388, 56, 56)
    assert split_counts(9) == (7, 1, 1)
    assert split_counts(3) == (1, 1, 1)
    with pytest.raises(ValueError, match="at least 3"):
        split_counts(2)


@pytest.mark.parametrize("keep", [0.5, 0.9])  # cut in the header / in the pixel data
def test_truncated_nifti_is_named_and_skippable(tmp_path, capsys, caplog, keep):
    make_release(tmp_path, 5, "nifti", OFFICIAL)
    bad = tmp_path / "database_nifti" / "patient0002" / "patient0002_4CH_ES.nii.gz"
    bad.write_bytes(bad.read_bytes()[: int(bad.stat().st_size * keep)])
    with pytest.raises(CamusFileError, match="patient0002_4CH_ES.nii.gz: cannot read"):
        convert_camus(tmp_path, size=SIZE)
    out = tmp_path / "out.npz"
    assert main(["--root", str(tmp_path), "--output", str(out), "--size", str(SIZE)]) == 1
    assert "patient0002_4CH_ES.nii.gz" in caplog.text and "--skip_bad" in caplog.text
    assert not out.exists()
    assert main(["--root", str(tmp_path), "--output", str(out), "--size", str(SIZE), "--skip_bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 patient(s):" in printed and "patient0002_4CH_ES.nii.gz" in printed
    data = load_dataset(out)
    assert patients_of(data["train"]) == {"patient0001", "patient0003"}
    assert len(data["train"]) == 8


def test_missing_gt_is_named(tmp_path):
    make_release(tmp_path, 3, "mhd")
    (tmp_path / "training" / "patient0003" / "patient0003_2CH_ED_gt.mhd").unlink()
    with pytest.raises(CamusFileError, match="patient0003_2CH_ED_gt.mhd: missing"):
        convert_camus(tmp_path, size=SIZE)
    with pytest.raises(ValueError, match="no readable patient left in the (train|valid|test) split"):
        convert_camus(tmp_path, size=SIZE, skip_bad=True)  # 3 patients split 1/1/1: one split empties


@pytest.mark.parametrize("damage", ["stored untransposed", "upside down"])
def test_wrong_orientation_is_refused(tmp_path, damage):
    folder = make_release(tmp_path, 3, "nifti")
    image, mask = phantom(2, "ES")
    if damage == "upside down":
        image, mask = image[::-1], mask[::-1]
    stem = folder / "patient0002" / "patient0002_2CH_ES"
    write_nifti(f"{stem}.nii.gz", image, transpose=damage == "upside down")
    write_nifti(f"{stem}_gt.nii.gz", mask, transpose=damage == "upside down")
    with pytest.raises(CamusFileError, match="patient0002_2CH_ES_gt.nii.gz: wrong orientation"):
        convert_camus(tmp_path, size=SIZE)


def test_resize_antialiases_images_and_keeps_labels():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = resize_image(checker, 32)
    assert small.shape == (32, 32)
    assert np.all(np.abs(small[2:-2, 2:-2].astype(int) - 128) <= 8)  # nearest would give 0 or 255
    labels = (np.indices((50, 30))[1] // 10).astype(np.uint8)  # columns of 0, 1, 2
    resized = resize_mask(labels, 20)
    assert set(np.unique(resized)) == {0, 1, 2}
    assert resized[:, 0].tolist() == [0] * 20 and resized[:, -1].tolist() == [2] * 20


def test_help_has_an_example():
    assert "example: python -m utils.data.camus" in build_parser().format_help()


@pytest.mark.slow
def test_the_paper_config_trains_on_a_converted_fake_camus(nifti_release, tmp_path):
    import trainer

    out = tmp_path / "camus_dataset.pkl"
    assert main(["--root", str(nifti_release), "--output", str(out), "--size", str(SIZE)]) == 0
    small = {"data_args.path": out, "data_args.image_size": SIZE, "data_args.num_workers": 0,
             "output_dir": tmp_path / "runs", "model_args.channels": "[8, 8]", "model_args.num_res_blocks": "[1, 1]",
             "model_args.attention_levels": "[false, true]", "model_args.num_head_channels": "[8, 8]",
             "model_args.norm_num_groups": 8, "train_args.max_epochs": 1, "train_args.accelerator": "cpu",
             "train_args.effective_batch_size": 4, "contrastive_args.warmup_epochs": 0}
    args = ["--config_path", "configs/comet_camus.yaml"]
    for k, v in small.items():
        args += ["--set", f"{k}={v}"]
    assert trainer.main(args) == 0
    run = tmp_path / "runs" / "comet_camus"
    assert (run / "last.ckpt").exists() and list(run.glob("best-*.ckpt"))
