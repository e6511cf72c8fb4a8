"""Downstream study: training sets per condition, paired statistics over seeds, the written tables."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from utils.data.dataset_io import load_dataset, save_dataset
from utils.evaluation import downstream


def _as_synthetic(records):
    """Records shaped like an inferer.py --export: source_patient instead of patient."""
    return [{"image": r["image"], "mask": r["mask"],
             "metadata": {"sample": i, "source_patient": r["metadata"]["patient"]}} for i, r in enumerate(records)]


def test_conditions_draw_patients_and_add_synthetic_images_for_the_rest(tiny_data):
    train = load_dataset(tiny_data)["train"]  # 4 patients x 4 images
    synthetic = _as_synthetic(train)
    sets = downstream.conditions(train, synthetic, 0.25, seed=0)
    assert list(sets) == ["real", "synthetic", "real+synthetic", "real25", "real25+synthetic"]
    kept = {r["metadata"]["patient"] for r in sets["real25"]}
    assert len(kept) == 1 and len(sets["real25"]) == 4 and len(sets["real+synthetic"]) == 32
    extra = sets["real25+synthetic"][4:]
    assert len(extra) == 12 and not kept & {r["metadata"]["source_patient"] for r in extra}
    assert downstream.conditions(train, synthetic, 0.25, seed=0)["real25"] == sets["real25"]  # seeded


def test_t_interval_is_the_textbook_one():
    values = [0.80, 0.84, 0.83]
    t = downstream.t_interval(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert t["mean"] == pytest.approx(np.mean(values))
    np.testing.assert_allclose(t["ci95"], [np.mean(values) - half, np.mean(values) + half])
    assert downstream.t_interval([0.5])["ci95"] == [None, None]


@pytest.mark.slow
def test_cli_synthetic_copies_of_the_real_images_train_the_same_segmenter(tiny_data, tmp_path):
    """Synthetic = the real training images in the same order: same seed, same batches, same weights, so
    the synthetic row equals the real row and its paired differences are exactly zero."""
    save_dataset(tmp_path / "synth.npz", {"train": _as_synthetic(load_dataset(tiny_data)["train"])})
    out = tmp_path / "out"
    assert downstream.main(["--data_path", str(tiny_data), "--generated", str(tmp_path / "synth.npz"),
                            "--output_dir", str(out), "--seeds", "0", "1", "--train_steps", "3"]) == 0
    summary = json.loads((out / "downstream.json").read_text())["summary"]
    for label in ("LV cavity", "myocardium", "LA cavity"):
        for score in ("dice", "hd95", "surface_dice"):
            assert summary["synthetic"][label][score]["value"] == summary["real"][label][score]["value"]
            assert summary["synthetic"][label][score]["vs_real"]["mean"] == 0.0
    rows = list(csv.DictReader(open(out / "downstream.csv")))
    assert len(rows) == 5 * 2 * 3
    dice = [float(r["dice"]) for r in rows if r["condition"] == "real" and r["label"] == "LV cavity"]
    assert summary["real"]["LV cavity"]["dice"]["value"]["mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    md = (out / "downstream.md").read_text()
    assert "| real25+synthetic | 16 |" in md and "ΔDice LV cavity" in md
    with pytest.raises(SystemExit, match="downstream.json exists; pass --overwrite"):
        downstream.main(["--data_path", str(tiny_data), "--generated", str(tmp_path / "synth.npz"),
                         "--output_dir", str(out)])


def test_sets_of_another_image_size_are_refused_before_any_training(tiny_data, tmp_path, monkeypatch):
    """32 px real against 16 px synthetic images: one error line naming the synthetic file, its record and both
    sizes, before a segmenter trains (it used to train two, then fail with a traceback in the third)."""
    monkeypatch.setattr(downstream, "run", lambda *a, **k: pytest.fail("trained before checking image sizes"))
    small = [{**r, "image": r["image"][..., ::2, ::2], "mask": r["mask"][..., ::2, ::2]}
             for r in _as_synthetic(load_dataset(tiny_data)["train"])]
    save_dataset(tmp_path / "synth.npz", {"train": small})
    with pytest.raises(SystemExit, match=r"error: .*synth.npz: train\[0\] is (1x)?16x16 but .*data.npz: train\[0\] "
                                         r"is (1x)?32x32; every image of --data_path and --generated needs one size"):
        downstream.main(["--data_path", str(tiny_data), "--generated", str(tmp_path / "synth.npz"),
                         "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_dry_run_lists_the_trainings_with_their_time_and_writes_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(downstream, "run", lambda *a, **k: pytest.fail("a dry run trained"))
    monkeypatch.setattr(downstream, "seconds_per_step", lambda *a: 0.5)  # timed for real in the next test
    save_dataset(tmp_path / "synth.npz", {"train": _as_synthetic(load_dataset(tiny_data)["train"])})
    before = sorted(tmp_path.rglob("*"))
    assert downstream.main(["--data_path", str(tiny_data), "--generated", str(tmp_path / "synth.npz"),
                            "--output_dir", str(tmp_path / "out"), "--seeds", "0", "1", "--dry_run"]) == 0
    assert sorted(tmp_path.rglob("*")) == before
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  seed 0: real 16 images, synthetic 16 images, real+synthetic 32 images, real25 4 images, " \
                     "real25+synthetic 16 images"
    assert out[3].startswith("  10 segmenter trainings of 600 steps at 0.500 s per step: about 50m00s")


def test_the_time_per_segmenter_step_is_the_difference_of_two_trainings(tiny_data, monkeypatch):
    clock = iter([0.0, 3.0, 10.0, 17.0])  # after a warm-up, a 2-step training takes 3 s, a 6-step one 7 s
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    monkeypatch.setattr(downstream, "train_segmenter", lambda *a, **k: None)
    assert downstream.seconds_per_step(None, None, 4) == 1.0
