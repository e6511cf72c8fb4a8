"""--dry_run of inferer.py and evaluate.py: the plan names what a run would load and write, nothing is written
(no output folder, no samples, no feature cache, no segmenter), bad inputs stop as in a run; the estimate
extrapolates one timed batch."""

from pathlib import Path

import pytest
import torch

import evaluate
import inferer
from utils.generation.checkpoints import find_checkpoint
from utils.generation.generate import Generated
from utils.generation.plan import describe_samples, estimate_generation, extrapolate


def listing(*roots: Path) -> dict:
    """Every path under ``roots`` with its size and modification time: what a dry run must leave as it was."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots if root.exists() for p in root.rglob("*")}


def plan_of(out: str) -> dict[str, str]:
    """The printed plan as {line name: text}."""
    assert out.startswith("dry run: nothing was written\n")
    return {k: v.strip() for k, v in (line.strip().split(":", 1) for line in out.splitlines()[1:])}


@pytest.mark.parametrize("batch_seconds, batch_size, n, devices, expected", [
    (2.0, 4, 10, 1, 6.0),  # 3 batches, the last one partial but counted whole
    (2.0, 4, 10, 2, 4.0),  # 2 batches at a time: 2 rounds
    (2.0, 4, 3, 1, 2.0),  # one batch, smaller than asked
    (0.5, 8, 2000, 1, 125.0)])
def test_extrapolate_counts_whole_batches_over_the_devices(batch_seconds, batch_size, n, devices, expected):
    assert extrapolate(batch_seconds, batch_size, n, devices) == expected


def test_the_estimate_times_the_second_of_two_first_batches_and_extrapolates():
    calls = []

    def fake_generate(module, masks, ids, seed, num_steps, sampler, batch_size, devices, progress, classes):
        calls.append((len(masks), ids.tolist(), seed, num_steps, sampler, batch_size, devices, classes.tolist()))
        return Generated(torch.zeros(len(masks), 1, 2, 2), nfe=2 * num_steps, seconds=9.0 if len(calls) == 1 else 2.5)

    masks = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    estimate = estimate_generation(None, masks, 7, 5, "midpoint", 4, ["cpu", "cpu"], generate_fn=fake_generate,
                                   classes=torch.arange(10))
    assert calls == [(4, [0, 1, 2, 3], 7, 5, "midpoint", 4, ["cpu"], [0, 1, 2, 3])] * 2  # warm-up, then timed
    assert (estimate.timed, estimate.batch_seconds, estimate.nfe) == (4, 2.5, 10)
    assert estimate.seconds == 5.0  # 3 batches of 4, 2 devices: 2 rounds of 2.5 s; the warm-up's 9 s not counted
    assert estimate.peak_bytes > 0 and "resident" in estimate.peak_kind  # on a CPU: the process's peak RSS
    assert estimate.lines()["estimate"].startswith("about 5.0 s for generation")


def test_describe_samples_counts_samples_per_mask():
    assert describe_samples(torch.arange(12) % 8, "X") == "12 samples of 8 masks (1-2 per mask) from X"
    assert describe_samples(torch.arange(8) % 4, "X") == "8 samples of 4 masks (2 per mask) from X"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """COMET_CACHE_DIR and the torch hub under tmp_path (no metric weights there), the variables naming weights
    unset."""
    monkeypatch.setenv("COMET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for k in ("COMET_INCEPTION_WEIGHTS", "COMET_CLIP_DIR", "COMET_R3D_WEIGHTS"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path / "cache"


def test_inferer_dry_run_plans_and_writes_nothing(tiny_run, tmp_path, caches, capsys):
    before = listing(tmp_path, tiny_run)
    assert inferer.main(["--checkpoint", str(tiny_run), "--num_samples", "12", "--num_steps", "2",
                         "--dry_run"]) == 0
    assert listing(tmp_path, tiny_run) == before and not caches.exists()
    plan = plan_of(capsys.readouterr().out)
    assert plan["checkpoint"] == str(find_checkpoint(tiny_run).resolve())
    assert plan["samples"].startswith("12 samples of 8 masks (1-2 per mask) from split 'test'")
    assert plan["output"] == str(tiny_run / "samples_test_2steps")  # the default output folder, not created
    assert plan["method"] == "flow_matching, sampler euler, 2 steps"
    assert plan["estimate"].startswith("about ") and "timed batch of" in plan["estimate"]
    assert ("GiB, peak GPU memory" if torch.cuda.is_available() else "GiB, peak resident memory") in plan["memory"]


def test_evaluate_dry_run_plans_the_metrics_and_writes_nothing(tiny_run, tmp_path, caches, capsys):
    before = listing(tmp_path, tiny_run)
    assert evaluate.main(["--checkpoint", str(tiny_run), "--num_samples", "12", "--num_steps", "2",
                          "--skip_missing_metrics", "--segmenter", "auto", "--output_dir", str(tmp_path / "ev"),
                          "--dry_run"]) == 0
    assert listing(tmp_path, tiny_run) == before and not caches.exists()  # no samples, features, segmenter
    plan = plan_of(capsys.readouterr().out)
    assert plan["checkpoint"] == str(find_checkpoint(tiny_run).resolve()) and plan["output"] == str(tmp_path / "ev")
    assert plan["samples"].startswith("12 samples of 8 masks (1-2 per mask)")
    assert plan["computes"] == "ssim, psnr, b_dice, hd95, surface_dice, comparison, memorisation, mask_fidelity"
    assert plan["skips fid, kid"].startswith("Inception-v3 weights for FID/KID") and "skips cmmd" in plan
    assert plan["segmenter"].startswith(str(caches / "segmenters")) and "not cached" in plan["segmenter"]
    assert plan["estimate"].endswith("; metrics not included")


def test_evaluate_dry_run_of_samples_generates_nothing(tiny_run, tmp_path, caches, capsys):
    assert inferer.main(["--checkpoint", str(tiny_run), "--num_samples", "4", "--num_steps", "1",
                         "--output_dir", str(tmp_path / "gen")]) == 0
    before = listing(tmp_path)
    assert evaluate.main(["--samples", str(tmp_path / "gen" / "samples.npz"), "--skip_missing_metrics",
                          "--no-memorisation", "--dry_run"]) == 0
    assert listing(tmp_path) == before
    plan = plan_of(capsys.readouterr().out)
    assert plan["samples"].startswith("4 samples of 4 masks (1 per mask)")
    assert plan["output"] == str(tmp_path / "gen" / "eval") and plan["skips memorisation"] == "--no-memorisation"
    assert plan["estimate"].startswith("nothing to generate")


@pytest.mark.parametrize("cli, extra, message", [
    (inferer, ["--checkpoint", "nope"], "nope: checkpoint does not exist"),
    (inferer, ["--masks", "no_such_masks"], "no_such_masks"),
    (evaluate, ["--checkpoint", "nope"], "nope: checkpoint does not exist"),
    (evaluate, [], "weights-inception-2015-12-05-6726825d.pth.*--skip_missing_metrics")])
def test_a_bad_input_stops_a_dry_run_as_it_stops_a_run(cli, extra, message, tiny_run, tmp_path, caches):
    argv = ["--checkpoint", str(tiny_run), "--num_samples", "2", "--num_steps", "1",
            "--output_dir", str(tmp_path / "out"), *extra]
    errors = []
    for dry in ([], ["--dry_run"]):
        with pytest.raises(SystemExit, match=message) as e:
            cli.main(argv + dry)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and not (tmp_path / "out").exists()
