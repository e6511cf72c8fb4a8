"""The synthetic echo phantom: layout, anatomy, determinism, CLI (48 px, a handful of patients)."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from utils.data.dataset_io import DatasetError, load_dataset
from utils.data.synthetic_echo import (
    build_synthetic_dataset,
    ensure_synthetic_dataset,
    main,
    render_patient,
    save_examples_png,
)

SIZE = 48
PATIENTS = (3, 2, 2)


@pytest.fixture(scope="module")
def data():
    return build_synthetic_dataset(SIZE, PATIENTS, seed=0, progress=False)


def _records(data):
    return [r for split in ("train", "valid", "test") for r in data[split]]


def _polar(size):
    """Depth, beam angle and x of each pixel centre (units of the side; sector apex at the top centre)."""
    c = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.hypot(x - 0.5, y), np.arctan2(x - 0.5, y), x


def test_same_seed_same_arrays_other_seed_different(data):
    again = build_synthetic_dataset(SIZE, PATIENTS, seed=0, progress=False)
    other = build_synthetic_dataset(SIZE, PATIENTS, seed=1, progress=False)
    for a, b, c in zip(_records(data), _records(again), _records(other)):
        assert a["metadata"] == b["metadata"] == c["metadata"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        assert not np.array_equal(a["image"], c["image"])
        assert not np.array_equal(a["mask"], c["mask"])


def test_a_patient_does_not_depend_on_the_others(data):
    # patient index 3 is the first valid patient of (3, 2, 2) and the last train patient of (4, 1, 1):
    # its arrays come from (seed, index) alone, whatever else is built
    small = build_synthetic_dataset(SIZE, (4, 1, 1), seed=0, progress=False)
    for a, b in zip(data["valid"][:4], small["train"][12:16]):
        assert a["metadata"]["patient"] == b["metadata"]["patient"] == "synth0004"
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    frames = render_patient(SIZE, 0, 3)
    np.testing.assert_array_equal(frames[0][2], data["valid"][0]["image"][0])
    ed_2ch = [r["mask"].tobytes() for r in _records(data) if r["metadata"]["view"] == "2CH"][::2]
    assert len(set(ed_2ch)) == sum(PATIENTS)  # and every patient has its own heart


def test_split_sizes_metadata_and_patients_disjoint(data):
    patients = {}
    for split, n in zip(("train", "valid", "test"), PATIENTS):
        assert len(data[split]) == 4 * n
        for r in data[split]:
            assert r["metadata"]["split"] == split
            patients.setdefault(r["metadata"]["patient"], set()).add(
                (split, r["metadata"]["view"], r["metadata"]["phase"])
            )
    assert len(patients) == sum(PATIENTS)
    for frames in patients.values():
        assert len({split for split, _, _ in frames}) == 1
        assert {(v, p) for _, v, p in frames} == {("2CH", "ED"), ("2CH", "ES"), ("4CH", "ED"), ("4CH", "ES")}


def test_arrays_and_labels(data):
    for r in _records(data):
        for key in ("image", "mask"):
            assert r[key].dtype == np.uint8 and r[key].shape == (1, SIZE, SIZE)
        assert set(np.unique(r["mask"])) == {0, 1, 2, 3}, r["metadata"]


def test_outside_the_sector_is_black_and_unlabelled(data):
    r, theta, _ = _polar(SIZE)
    outside = (np.abs(theta) > np.deg2rad(38.0)) | (r > 0.97)  # widest and deepest sector drawn
    inside = (np.abs(theta) < np.deg2rad(30.0)) & (r > 0.05) & (r < 0.85)
    for rec in _records(data):
        assert outside.sum() > 0.2 * SIZE**2
        assert not rec["image"][0][outside].any() and not rec["mask"][0][outside].any()
        assert rec["image"][0][inside].mean() > 10


def test_anatomy_blood_dark_myocardium_bright_la_below_lv(data):
    rows = np.arange(SIZE)[:, None]
    for rec in _records(data):
        image, mask = rec["image"][0].astype(float), rec["mask"][0]
        blood, myo = image[(mask == 1) | (mask == 3)].mean(), image[mask == 2].mean()
        assert blood < 0.6 * myo, rec["metadata"]
        lv_row = np.broadcast_to(rows, mask.shape)[mask == 1].mean()
        la_row = np.broadcast_to(rows, mask.shape)[mask == 3].mean()
        assert la_row > lv_row + 0.15 * SIZE, rec["metadata"]  # the atrium lies deeper, away from the probe


def test_end_systole_has_the_smaller_lv_cavity(data):
    area = {
        (r["metadata"]["patient"], r["metadata"]["view"], r["metadata"]["phase"]): (r["mask"] == 1).sum()
        for r in _records(data)
    }
    for (patient, view, phase), a in area.items():
        if phase == "ED":
            assert a > 1.1 * area[(patient, view, "ES")], (patient, view)


def test_four_chamber_view_has_an_unlabelled_dark_right_heart(data):
    # background left of the LV: the 4CH right ventricle and atrium make much more of it dark
    r, theta, x = _polar(SIZE)
    left = (np.abs(theta) < np.deg2rad(30.0)) & (r < 0.85) & (x < 0.5)
    dark = {"2CH": [], "4CH": []}
    for rec in _records(data):
        smooth = ndimage.uniform_filter(rec["image"][0].astype(float), 3)
        background = left & (rec["mask"][0] == 0)
        dark[rec["metadata"]["view"]].append((smooth[background] < 20).mean())
    assert np.mean(dark["4CH"]) > np.mean(dark["2CH"]) + 0.05


def test_too_small_or_empty_requests_are_refused():
    with pytest.raises(ValueError, match="size"):
        build_synthetic_dataset(16, (1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="patients"):
        build_synthetic_dataset(SIZE, (1, 0, 1), progress=False)


def test_cli_writes_a_loadable_file_and_refuses_to_overwrite(tmp_path):
    out, png = tmp_path / "synth.npz", tmp_path / "examples.png"
    argv = ["--output", str(out), "--size", "32", "--patients", "2", "1", "1", "--seed", "3"]
    argv += ["--examples", str(png)]
    main(argv)
    loaded = load_dataset(out)
    assert {k: len(v) for k, v in loaded.items()} == {"train": 8, "valid": 4, "test": 4}
    direct = build_synthetic_dataset(32, (2, 1, 1), seed=3, progress=False)
    np.testing.assert_array_equal(loaded["test"][3]["image"], direct["test"][3]["image"])
    assert loaded["test"][3]["metadata"] == direct["test"][3]["metadata"]
    assert Image.open(png).size == (4 * 32, 2 * 2 * 32)  # 4 frames wide; image + overlay row per patient
    before = out.stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(argv)
    assert out.stat().st_mtime_ns == before
    main(argv + ["--overwrite"])
    main(["--output", str(tmp_path / "synth.pkl"), "--size", "32", "--patients", "1", "1", "1"])
    assert len(load_dataset(tmp_path / "synth.pkl")["valid"]) == 4


def test_ensure_builds_once_and_rejects_a_mismatched_file(tmp_path):
    path = tmp_path / "synthetic.npz"
    assert ensure_synthetic_dataset(path, 32, (1, 1, 1), seed=0) == path
    built = path.stat().st_mtime_ns
    assert ensure_synthetic_dataset(path, 32, (1, 1, 1), seed=0) == path
    assert path.stat().st_mtime_ns == built
    with pytest.raises(DatasetError, match="expected"):
        ensure_synthetic_dataset(path, 48, (1, 1, 1), seed=0)


def test_examples_png_shows_image_and_overlay_rows(data, tmp_path):
    path = save_examples_png(data, tmp_path / "ex.png", n=2)
    png = np.asarray(Image.open(path))
    assert png.shape == (4 * SIZE, 4 * SIZE, 3)
    first = data["train"][0]
    np.testing.assert_array_equal(png[:SIZE, :SIZE, 0], first["image"][0])  # grey row: the image itself
    overlay = png[SIZE : 2 * SIZE, :SIZE].astype(int)
    lv = first["mask"][0] == 1
    assert (overlay[..., 0] > overlay[..., 1])[lv].all()  # LV cavity tinted red
