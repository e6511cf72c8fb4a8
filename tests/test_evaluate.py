import json
import subprocess

import numpy as np
import pytest
from conftest import LOWEST_VAL_LOSS, ROOT, run_with_several_best

import evaluate
import inferer
from utils.evaluation.metrics import bootstrap_ci

NO_WEIGHTS = {"COMET_INCEPTION_WEIGHTS": None, "COMET_CLIP_DIR": None}


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    for k in NO_WEIGHTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setenv("COMET_CACHE_DIR", str(tmp_path / "cache"))


def _eval(tiny_run, out, *extra, comparison=False):
    """evaluate.py on the tiny run; the comparison rows (radiomics, ~10 s) only where a test looks at them."""
    return evaluate.main(["--checkpoint", str(tiny_run), "--num_samples", "12", "--num_steps", "2",
                          "--n_boot", "50", "--output_dir", str(out), *extra,
                          "--comparison" if comparison else "--no-comparison"])


def test_without_weights_it_fails_naming_the_file(tiny_run, tmp_path, no_weights):
    with pytest.raises(SystemExit, match=r"weights-inception-2015-12-05-6726825d.pth.*--skip_missing_metrics"):
        _eval(tiny_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing generated before the check


@pytest.mark.slow  # several seconds on a 2-core CPU; the fast subset keeps under 2 minutes
def test_skip_missing_metrics_records_reasons_and_computes_the_rest(tiny_run, tmp_path, no_weights):
    out = tmp_path / "out"
    assert _eval(tiny_run, out, "--skip_missing_metrics", comparison=True) == 0
    results = json.loads((out / "metrics.json").read_text())
    m = results["metrics"]
    assert list(m) == ["fid", "ssim", "kid", "cmmd", "psnr", "b_dice", "hd95", "surface_dice", "frd_v0", "frd_v1",
                       "precision", "recall", "density", "coverage", "pairwise_dissimilarity", "pixel_std"]
    for name in ("fid", "kid", "cmmd"):
        assert "not found" in m[name]["skipped"] or "not given" in m[name]["skipped"]
    for name in ("ssim", "psnr", "b_dice", "surface_dice", "hd95"):
        assert isinstance(m[name]["value"], float) and m[name]["n"] == 12 and m[name]["n_masks"] == 8
        lo, hi = m[name]["ci95"]
        assert lo <= m[name]["value"] <= hi
    assert results["num_samples"] == 12 and results["num_masks"] == 8 and results["num_steps"] == 2
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0] == "sample,source_index,ssim,psnr,b_dice,surface_dice,hd95" and len(rows) == 13
    # 12 samples cycle over the 8 test masks: the interval resamples the 8 source images, not the 12 samples
    table = np.loadtxt(out / "per_image.csv", delimiter=",", skiprows=1)
    assert table[:, 1].tolist() == [i % 8 for i in range(12)]
    _, lo, hi = bootstrap_ci(table[:, 2], clusters=table[:, 1], n_boot=50, seed=0)
    np.testing.assert_allclose(m["ssim"]["ci95"], [lo, hi], rtol=1e-5)  # the csv holds 6 digits
    report = (out / "report.md").read_text()
    assert "| FID↓ | SSIM↑ |" in report and "| HD95↓ | NSD@2px↑ |" in report
    assert "12 samples of 8 distinct masks" in report
    assert "- SSIM: N = 12 of 8 masks, 95% CI [" in report
    assert "95% cluster-bootstrap interval over the 8 source images; noise and masks only, not training seeds" in report
    assert (out / "best_worst.png").exists() and (out / "samples" / "samples.npz").exists()
    # the comparison rows (on by default): the tiny data are the echo phantom, so the oracle row is there
    c = results["comparison"]
    assert list(c["rows"]) == ["samples", "mean_of_k", "oracle", "real", "constant"] and c["oracle"] == "used"
    assert c["rows"]["samples"]["pixel_std"]["k"] == 2  # masks 0-3 got 2 of the 12 samples, 4-7 one
    assert c["rows"]["samples"]["frd_v0"]["n_reference"] == 16 == c["n_reference"]  # the training split
    assert m["frd_v0"] == c["rows"]["samples"]["frd_v0"] and "precision" in m and "pairwise_dissimilarity" in m
    assert "## Beyond paired metrics" in report and "| oracle: a second real image of each mask" in report
    # the constant row: a flat image at the training split's mean intensity, paired metrics only
    assert 0 < c["constant"] < 1 and c["rows"]["constant"]["ssim"]["n_masks"] == 8
    assert "frd_v0" not in c["rows"]["constant"] and "| a constant image at the training mean intensity" in report
    assert "## How to read these numbers" in report and "PSNR in dB" in report and "HD95 in px" in report
    assert "within 2 px" in report and "↑ higher is better, ↓ lower is better" in report
    audit = results["memorisation"]  # on by default
    assert audit["n"] == 12 and audit["n_test"] == 8 and audit["threshold"] > 0
    assert "## Memorisation audit" in report and (out / "memorisation_hist.png").exists()


@pytest.mark.slow
def test_all_seven_metrics_with_random_weight_extractors_and_the_cache(tiny_run, tmp_path, no_weights,
                                                                      random_inception_file, tiny_clip_dir, caplog):
    weights = ["--inception_weights", str(random_inception_file[0]), "--clip_dir", str(tiny_clip_dir)]
    assert _eval(tiny_run, tmp_path / "a", *weights) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]
    assert all("value" in m[k] for k in m)
    assert m["fid"]["n"] == 12 and m["fid"]["n_real"] == 8 and m["kid"]["subset_size"] == 8
    assert m["cmmd"]["value"] >= 0
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 2  # the real test split's Inception and CLIP features
    stamps = [p.stat().st_mtime_ns for p in cached]
    # the same samples again, from their samples.npz: no regeneration, real features from the cache
    assert evaluate.main(["--samples", str(tmp_path / "a" / "samples" / "samples.npz"), "--n_boot", "50",
                          "--output_dir", str(tmp_path / "b"), *weights, "--no-comparison"]) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
    assert again["fid"]["value"] == pytest.approx(m["fid"]["value"])
    assert again["ssim"]["value"] == pytest.approx(m["ssim"]["value"])
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").glob("*.npy"))] == stamps
    assert "loaded cached" in caplog.text


@pytest.mark.slow
def test_with_inception_weights_precision_and_recall_also_come_in_inception_space(tiny_run, tmp_path, no_weights,
                                                                                 random_inception_file):
    # 2 samples for each of the 8 test masks: 8 images per distribution row, over the k = 5 of the k-NN balls
    assert _eval(tiny_run, tmp_path / "a", "--inception_weights", str(random_inception_file[0]), "--num_samples",
                 "16", "--samples_per_mask", "2", "--skip_missing_metrics", comparison=True) == 0
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["comparison"]["rows"]
    for row in ("samples", "oracle", "real"):
        for m in ("precision", "recall", "density", "coverage"):
            assert rows[row][f"{m}_inception"]["space"] == "inception" and 0 <= rows[row][f"{m}_inception"]["value"]
    assert rows["samples"]["precision_inception"]["n"] == 8  # one image per mask
    assert rows["samples"]["precision_inception"]["n_reference"] == 16  # the training split, in Inception space
    assert rows["real"]["recall_inception"]["value"] > 0  # the test split's images lie near the training split's


@pytest.mark.slow  # several seconds on a 2-core CPU; the fast subset keeps under 2 minutes
def test_real_images_against_themselves_score_perfectly(tiny_run, tiny_data, tmp_path, no_weights):
    out = tmp_path / "gen"
    assert inferer.main(["--checkpoint", str(tiny_run), "--num_samples", "8", "--num_steps", "1",
                         "--output_dir", str(out)]) == 0
    z = dict(np.load(out / "samples.npz"))
    from utils.data.dataset_io import load_dataset, normalise_image

    test = load_dataset(tiny_data)["test"]
    z["images"] = np.stack([normalise_image(test[i]["image"]) for i in z["indices"]])
    np.savez(out / "samples.npz", **z)
    assert evaluate.main(["--samples", str(out / "samples.npz"), "--skip_missing_metrics", "--n_boot", "20",
                          "--output_dir", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert m["ssim"]["value"] == pytest.approx(1.0) and m["b_dice"]["value"] == pytest.approx(1.0)
    assert m["surface_dice"]["value"] == 1.0
    assert m["hd95"]["value"] == 0.0 and m["psnr"]["value"] is None  # infinite PSNR is stored as null
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["comparison"]["rows"]
    for metric in ("frd_v0", "frd_v1", "precision", "recall", "density", "coverage"):  # the same images, the
        assert rows["samples"][metric]["value"] == rows["real"][metric]["value"]     # same distribution scores
    assert "⚠" not in (tmp_path / "ev" / "report.md").read_text()  # no better model than the real images


def test_samples_from_another_dataset_are_refused(tiny_run, tmp_path, no_weights):
    out = tmp_path / "gen"
    assert inferer.main(["--checkpoint", str(tiny_run), "--num_samples", "3", "--num_steps", "1",
                         "--output_dir", str(out)]) == 0
    z = dict(np.load(out / "samples.npz"))
    z["masks"] = np.zeros_like(z["masks"])
    np.savez(out / "samples.npz", **z)
    with pytest.raises(SystemExit, match="not those of"):
        evaluate.main(["--samples", str(out / "samples.npz"), "--skip_missing_metrics",
                       "--output_dir", str(tmp_path / "ev")])


@pytest.mark.slow  # several seconds on a 2-core CPU; the fast subset keeps under 2 minutes
def test_run_eval_best_picks_the_lowest_val_loss_checkpoint(tiny_run, tmp_path, no_weights):
    import os

    run = run_with_several_best(tiny_run, tmp_path)
    out = subprocess.run(["bash", "run_eval_best.sh", str(run), "--num_samples", "4", "--num_steps", "1",
                          "--skip_missing_metrics", "--n_boot", "10", "--no-comparison", "--output_dir",
                          str(tmp_path / "ev")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert results["checkpoint"] == str(run / LOWEST_VAL_LOSS)
    assert "| FID↓ |" in out.stdout


def test_set_changes_the_real_images_dataset_only(tiny_run, tiny_data, tmp_path, no_weights):
    import shutil

    from utils.config import config_diff
    from utils.generation.checkpoints import find_checkpoint
    from utils.methods import load_module

    copy = tmp_path / "copy.npz"
    shutil.copy(tiny_data, copy)
    out = tmp_path / "out"
    assert _eval(tiny_run, out, "--skip_missing_metrics", "--set", f"data_args.path={copy}") == 0
    assert json.loads((out / "metrics.json").read_text())["dataset"] == str(copy)
    trained = load_module(find_checkpoint(tiny_run)).hparams["config"]
    written = json.loads((out / "samples" / "manifest.json").read_text())["config"]
    assert config_diff(trained, written) == ["data_args.path", "sampling_args.num_steps"]  # and _eval's --num_steps 2


def test_set_of_a_key_the_network_depends_on_is_refused(tiny_run, tmp_path, no_weights):
    with pytest.raises(SystemExit, match=r"^error: --set prior_args.alpha cannot change at inference"):
        _eval(tiny_run, tmp_path / "out", "--skip_missing_metrics", "--set", "prior_args.alpha=0.1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_samples, per_mask, volumes, expected", [
    (None, None, False, (2000, 8)), (None, None, True, (8, 8)), (12, None, False, (12, 8)),  # as before
    (None, 4, False, (32, 8)), (12, 4, False, (12, 3)), (32, 4, True, (32, 8))])
def test_sample_plan_gives_k_samples_to_each_of_the_first_n_over_k_masks(num_samples, per_mask, volumes, expected):
    assert evaluate.sample_plan(num_samples, per_mask, 8, volumes) == expected


@pytest.mark.parametrize("num_samples", [10, 36])  # not a multiple of 4; more masks than the split's 8
def test_sample_plan_refuses_what_k_per_mask_cannot_give(num_samples):
    with pytest.raises(SystemExit, match=f"--num_samples {num_samples} with --samples_per_mask 4"):
        evaluate.sample_plan(num_samples, 4, 8, False)


def _results(comparison: dict | None = None, **metrics) -> dict:
    """What evaluate.py gives report(), reduced to ``metrics`` ({name: value}) and ``comparison``."""
    results = {"checkpoint": "c.ckpt", "split": "test", "dataset": "d.npz", "num_samples": 8, "num_masks": 8,
               "num_steps": 2, "sampler": "euler", "seed": 0, "surface_dice_tolerance_px": 2.0,
               "metrics": {m: {"value": v, "n": 8} for m, v in metrics.items()}}
    return results if comparison is None else {**results, "comparison": comparison}


def test_the_report_says_how_to_read_the_numbers_and_flags_a_model_below_a_constant_image():
    from utils.evaluation.report import report

    rows = {"samples": {"ssim": {"value": 0.017}, "psnr": {"value": 18.0}},
            "oracle": {"ssim": {"value": 0.5}, "psnr": {"value": 20.0}},
            "constant": {"ssim": {"value": 0.12}, "psnr": {"value": 17.2}}}
    text = report(_results({"rows": rows, "oracle": "used", "n_reference": 16, "constant": 0.21}, ssim=0.017,
                           psnr=18.0, hd95=3.5))
    guide = text.split("## How to read these numbers\n\n")[1]
    assert guide.startswith("⚠ SSIM 0.017 is below what a constant image scores (0.12): the model looks untrained "
                            "or broken\n\n")  # first, and PSNR 18 above the constant's 17.2 is not flagged
    assert "PSNR in dB" in guide and "HD95 in px" in guide and "within 2 px" in guide
    assert "the oracle, a perfect sampler" in guide and "training split's mean intensity (0.21)" in guide
    from utils.evaluation.comparison import below_constant

    rows["oracle"]["ssim"]["value"] = 0.11  # a perfect sampler below the floor too: the floor says nothing here
    assert below_constant(rows) == []
    del rows["oracle"]
    assert below_constant(rows)[0].endswith("the model may be untrained or broken (no oracle row checks that a "
                                            "perfect sampler scores above it on these data)")
    volumes = report(_results(ssim=0.5, mmd=0.1))  # no comparison rows; volumes count voxels
    assert "HD95 in voxels" in volumes and "No reference rows in this evaluation (--no-comparison)" in volumes
