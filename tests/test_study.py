"""Studies: rows x training seeds, resumable, with paired differences summarised over seeds."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from utils.config import ConfigError
from utils.studies.spec import load_study
from utils.studies.tables import RunResult, paired_difference, run_value, t_interval


def _run(row, seed, values, index=(0, 1, 2)):
    return RunResult(row, seed, np.array(index), {"ssim": np.array(values, dtype=float)}, {}, {})


def test_a_row_minus_itself_is_exactly_zero_with_an_interval_containing_zero():
    runs = [_run("a", s, v) for s, v in enumerate([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4], [0.7, 0.1, 0.6]])]
    d = [paired_difference(r, r, "ssim") for r in runs]
    assert d == [0.0, 0.0, 0.0]
    cell = t_interval(d)
    assert cell["mean"] == 0.0 and cell["lo"] <= 0.0 <= cell["hi"]


def test_differences_are_paired_within_seed_then_summarised_over_seeds():
    base = [_run("b", 0, [0.1, 0.2, 0.3]), _run("b", 1, [0.5, 0.5, 0.5])]
    row = [_run("r", 0, [0.2, 0.4, 0.3]), _run("r", 1, [0.5, 0.8, 0.5])]
    d = [paired_difference(r, b, "ssim") for r, b in zip(row, base)]
    np.testing.assert_allclose(d, [0.1, 0.1])
    cell = t_interval([0.1, 0.3, 0.2])
    from scipy import stats  # the textbook interval: mean +- t_{0.975, 2} * sd / sqrt(3)

    half = stats.t.ppf(0.975, 2) * np.std([0.1, 0.3, 0.2], ddof=1) / np.sqrt(3)
    np.testing.assert_allclose([cell["lo"], cell["hi"]], [0.2 - half, 0.2 + half])
    assert t_interval([0.4])["lo"] is None  # one seed: no interval
    with pytest.raises(ValueError, match="different masks"):
        paired_difference(_run("r", 0, [1, 2, 3], index=(0, 1, 5)), base[0], "ssim")


def test_mask_dice_is_the_segmenters_dice_averaged_over_labels():
    run = _run("a", 0, [0.5, 0.5, 0.5])
    assert run_value(run, "mask_dice") is None  # evaluated without a segmenter: the column is left out
    run.evaluation["mask_fidelity"] = {"generated": {"LV cavity": {"dice": {"value": 0.9}},
                                                     "myocardium": {"dice": {"value": 0.6}}}}
    assert run_value(run, "mask_dice") == pytest.approx(0.75)
    other = _run("b", 0, [0.5, 0.5, 0.5])
    other.evaluation["mask_fidelity"] = {"generated": {"LV cavity": {"dice": {"value": 0.8}},
                                                       "myocardium": {"dice": {"value": 0.5}}}}
    assert paired_difference(run, other, "mask_dice") == pytest.approx(0.1)


@pytest.fixture
def said():
    """The messages of the study's and the trainer's loggers (the trainer's logging setup replaces the root's
    handlers, caplog's among them)."""
    records, handler = [], logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("comet.study", "comet.trainer")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def _study(tmp_path, tiny_data, **extra) -> str:
    spec = {"name": "tiny_study", "config": "configs/tiny.yaml", "seeds": [0, 1], "output_dir": str(tmp_path),
            "evaluation": {"num_samples": 12, "samples_per_mask": 2, "num_steps": 2, "n_boot": 20,
                           "segmenter": "auto"},
            "rows": [{"name": "MOTFM", "set": ["prior_args.alpha=0", "contrastive_args.weight=0",
                                               f"data_args.path={tiny_data}", "train_args.max_epochs=1"]},
                     {"name": "+ warm start", "set": ["contrastive_args.weight=0", f"data_args.path={tiny_data}",
                                                      "train_args.max_epochs=1"]},
                     {"name": "MOTFM 1 step", "runs_of": "MOTFM", "num_steps": 1}], **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_bad_study_file_names_the_key(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"study.yaml: baseline must be one of the rows"):
        load_study(_study(tmp_path, tiny_data, baseline="COMET"))
    with pytest.raises(ConfigError, match=r"rows\[0\].runs_of must name an earlier row that trains"):
        load_study(_study(tmp_path, tiny_data), ["rows=[{name: a, runs_of: b}, {name: b}]"])
    with pytest.raises(ConfigError, match=r"row '\+ warm start'.*prior_args.alpah"):
        load_study(_study(tmp_path, tiny_data), ["rows=[{name: '+ warm start', set: [prior_args.alpah=1]}]"])


def test_a_run_trained_before_the_samplers_rename_counts_as_done(tmp_path, tiny_data):
    """A done/ marker holding ``sampling_args.method`` (the sampler's old name) is the same setting, not a change;
    a real change is still refused."""
    from utils.config import config_to_dict
    from utils.studies.runner import _finished, _mark
    from utils.studies.spec import row_config

    spec = load_study(_study(tmp_path, tiny_data))
    row = spec.rows[0]
    record = config_to_dict(row_config(spec, row, 0))
    old = json.loads(json.dumps(record))
    old["sampling_args"]["method"] = old["sampling_args"].pop("sampler")
    _mark(spec, row, 0, "train", old)
    assert _finished(spec, row, 0, "train", record)
    old["train_args"]["lr"] = 0.5
    _mark(spec, row, 0, "train", old)
    with pytest.raises(SystemExit, match=r"trained with a different setting \(differs in: train_args.lr\)"):
        _finished(spec, row, 0, "train", record)


def test_a_run_trained_before_a_key_was_added_counts_as_done_at_its_default(tmp_path, tiny_data):
    """A marker written before ``prior_args.image_range`` existed is the same setting when the row leaves it at
    its default; a row that now sets it is refused."""
    from utils.config import config_to_dict
    from utils.studies.runner import _finished, _mark
    from utils.studies.spec import row_config

    spec = load_study(_study(tmp_path, tiny_data))
    row = spec.rows[0]
    record = config_to_dict(row_config(spec, row, 0))
    old = json.loads(json.dumps(record))
    del old["prior_args"]["image_range"]
    _mark(spec, row, 0, "train", old)
    assert _finished(spec, row, 0, "train", record)
    record["prior_args"]["image_range"] = [0.0, 1.0]
    with pytest.raises(SystemExit, match=r"differs in: prior_args.image_range\)"):
        _finished(spec, row, 0, "train", record)


@pytest.mark.slow
def test_a_killed_study_resumes_without_retraining_and_writes_the_tables(tmp_path, tiny_data, monkeypatch, said):
    import evaluate
    import study
    import trainer

    monkeypatch.setenv("COMET_CACHE_DIR", str(tmp_path / "cache"))  # the auto segmenter, trained once
    trained, evaluated = [], []
    real_train, real_eval = trainer.main, evaluate.main

    def counting_train(args):
        trained.append(args)
        return real_train(args)

    def failing_eval(args):
        if len(evaluated) == 3:  # killed during the first evaluation of seed 1
            raise KeyboardInterrupt
        evaluated.append(args)
        return real_eval(args)

    monkeypatch.setattr(trainer, "main", counting_train)
    monkeypatch.setattr(evaluate, "main", failing_eval)
    path = _study(tmp_path, tiny_data)
    assert study.main([path]) == 130  # Ctrl-C: stopped there, saying so
    assert len(trained) == 3 and len(evaluated) == 3  # seed 0: all rows; seed 1: MOTFM trained, not evaluated
    said = [r.getMessage() for r in said if r.name == "comet.study"]
    forecast = next(i for i, m in enumerate(said) if m.startswith("study forecast: this training takes about"))
    assert forecast < next(i for i, m in enumerate(said) if " done in " in m)  # before the first stage ended
    assert "4 training(s) at that pace" in said[forecast] and "plus 6 evaluation(s)" in said[forecast]
    assert said[-1].startswith("[7/10] row 'MOTFM' seed 1: evaluate: interrupted; the 6 stages finished before it")
    assert evaluated[2][evaluated[2].index("--num_steps") + 1] == "1"  # MOTFM's seed-0 run, at 1 step
    monkeypatch.setattr(evaluate, "main", lambda args: evaluated.append(args) or real_eval(args))
    assert study.main([path]) == 0
    assert len(trained) == 4 and len(evaluated) == 6  # only the missing stages ran

    out = tmp_path / "tiny_study"
    md = (out / "results.md").read_text()
    paired, beyond = [line for line in md.splitlines() if line.startswith("| Method")][::2]
    # the seed's order, then surface Dice; FID/KID/CMMD not measured without weights
    assert paired == "| Method | SSIM↑ | PSNR↑ | B-Dice↑ | HD95↓ | NSD↑ | mask Dice↑ |"
    assert beyond == ("| Method | FRDv0↓ | FRDv1↓ | Prec↑ | Rec↑ | Dens↑ | Cov↑ | 1-SSIM(K)≈ | pixel std(K)≈ |")
    assert "Difference from MOTFM:" in md and "| + warm start | " in md and "2 training seeds [0, 1]" in md
    assert "12 samples of 6 distinct masks of split 'test' (2 per mask)" in md
    oracle = [line for line in md.splitlines() if line.startswith("| *oracle: a perfect sampler* |")]
    # the tiny data are the echo phantom: an oracle row in both tables, every column but the segmenter's mask Dice
    assert len(oracle) == 2 and oracle[0].endswith("| – |") and oracle[0].count("–") == 1 and "–" not in oracle[1]
    assert "Smallest difference from MOTFM this design detects with 80% power" in md
    results = json.loads((out / "results.json").read_text())
    assert results["rows"]["MOTFM"]["ssim"]["n_seeds"] == 2
    assert results["rows"]["MOTFM"]["frd_v0"]["n_seeds"] == 2
    assert len(results["runs"]) == 6 and len(results["runs"][0]["per_image"]["ssim"]) == 12
    assert sum(1 for _ in open(out / "results.csv")) == 1 + 6 * 12
    assert "Rows evaluated at other step counts: MOTFM 1 step: 1." in md
    for name in ("samples.png", "metrics.png", "configs/motfm.yaml", "configs/warm_start.yaml"):
        assert (out / name).is_file(), name

    changed = _study(tmp_path, tiny_data)  # the same study with MOTFM's learning rate changed
    spec = yaml.safe_load(open(changed))
    spec["rows"][0]["set"].append("train_args.lr=0.5")
    open(changed, "w").write(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match=r"row 'MOTFM' seed 0 was trained with a different setting.*train_args.lr"):
        study.main([changed])
    assert len(trained) == 4


@pytest.mark.parametrize("path", sorted(Path("configs/studies").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_study_loads_with_its_rows(path):
    spec = load_study(path)
    assert spec.baseline_row in [r.name for r in spec.rows] and len(spec.seeds) >= 3


def test_detectable_difference_has_the_power_it_claims():
    """Simulated paired t-tests over 3 seeds with a true difference equal to the detectable one reject at 5%
    about 80% of the time (and about 5% with no difference); the textbook normal-approximation formula is near."""
    from scipy import stats

    from utils.studies.tables import detectable_difference

    sd, n = 0.02, 3
    delta = detectable_difference(sd, n)
    approx = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
    assert delta == pytest.approx(approx, rel=0.1) and delta > approx  # the approximation is optimistic at 2 df
    rng = np.random.default_rng(0)
    for true, expected in ((delta, 0.8), (0.0, 0.05)):
        d = rng.normal(true, sd, size=(40000, n))
        rejected = stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05
        assert rejected.mean() == pytest.approx(expected, abs=0.01)
    assert detectable_difference(sd, 1) is None and detectable_difference(0.0, 3) is None


def test_pooled_sd_pools_the_per_seed_differences_of_every_row():
    from utils.studies.tables import pooled_sd

    diffs = {"a": {"ssim": {"per_seed": [0.1, 0.2, 0.3]}}, "b": {"ssim": {"per_seed": [0.0, 0.0, 0.6]}},
             "c": {"psnr": {"per_seed": [1.0, 2.0, 3.0]}}}
    sd, n = pooled_sd(diffs, "ssim")
    # sums of squares 0.02 and 0.24 over 2 + 2 degrees of freedom
    assert n == 3 and sd == pytest.approx(np.sqrt(0.26 / 4))
    assert pooled_sd(diffs, "hd95") == (None, 0)


def test_the_oracle_row_is_the_baselines_evaluated_oracle():
    from utils.studies.tables import oracle_row

    runs = {("MOTFM", s): _run("MOTFM", s, [0.5, 0.5, 0.5]) for s in (0, 1)}
    assert oracle_row(runs, "MOTFM", (0, 1), ("ssim",)) == {}  # off phantom data: no oracle
    for s, v in ((0, 0.54), (1, 0.56)):
        runs["MOTFM", s].evaluation["comparison"] = {"rows": {"oracle": {"ssim": {"value": v},
                                                                         "frd_v0": {"skipped": "few"}}}}
    assert oracle_row(runs, "MOTFM", (0, 1), ("ssim", "frd_v0")) == {"ssim": pytest.approx(0.55)}


def test_an_evaluation_split_the_data_lacks_is_refused_before_any_training(tmp_path, tiny_data):
    """It was once refused only by the first evaluation, after the first row had trained."""
    from utils.studies.runner import run_study

    calls = []
    spec = load_study(_study(tmp_path, tiny_data), ["evaluation.split=holdout"])
    with pytest.raises(SystemExit, match=rf"evaluation.split 'holdout' is not a split of {tiny_data} "
                                         r"\(has: test, train, valid\); nothing was trained"):
        run_study(spec, calls.append, calls.append)
    assert calls == []


@pytest.mark.slow
def test_ctrl_c_in_a_studys_training_stops_the_study_and_the_run_resumes(tmp_path, tiny_data, monkeypatch, said):
    import signal

    import study
    from utils.methods.pace import EpochPace

    real_epoch_end = EpochPace.on_train_epoch_end

    def ctrl_c_after_epoch_2(self, trainer, module):
        real_epoch_end(self, trainer, module)
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt

    path = _study(tmp_path, tiny_data, seeds=[0], evaluation={"num_samples": 4, "num_steps": 1},
                  rows=[{"name": "MOTFM", "set": [f"data_args.path={tiny_data}", "train_args.max_epochs=3"]}])
    monkeypatch.setattr(EpochPace, "on_train_epoch_end", ctrl_c_after_epoch_2)
    # Python's own handler, whatever this process inherited (a background job starts with SIGINT ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert study.main([path]) == 130  # Lightning's own answer is sys.exit(1), which a study took for a failure
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning had left SIGINT ignored
    finally:
        signal.signal(signal.SIGINT, outer)
    run = tmp_path / "tiny_study" / "runs" / "motfm-seed0"
    assert (run / "last.ckpt").is_file() and not (tmp_path / "tiny_study" / "done").exists()
    monkeypatch.setattr(EpochPace, "on_train_epoch_end", real_epoch_end)
    said.clear()
    assert study.main([path]) == 0
    assert any(r.getMessage().startswith(f"resuming from {run / 'last.ckpt'}") for r in said)
    assert (tmp_path / "tiny_study" / "done" / "motfm-seed0.train.json").is_file()


def test_a_dry_run_lists_each_stage_with_its_command_and_writes_nothing(tmp_path, tiny_data, capsys):
    import study
    from utils.config import config_to_dict
    from utils.studies.runner import _mark
    from utils.studies.spec import row_config

    path = _study(tmp_path, tiny_data)
    spec = load_study(path)
    _mark(spec, spec.rows[0], 0, "train", config_to_dict(row_config(spec, spec.rows[0], 0)))
    before = sorted(tmp_path.rglob("*"))
    assert study.main([path, "--dry_run"]) == 0
    assert sorted(tmp_path.rglob("*")) == before  # no lock, run, table or marker
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/10] row 'MOTFM' seed 0: train: done earlier, would be skipped"
    assert lines[1].startswith("[2/10] row 'MOTFM' seed 0: evaluate: would run  python evaluate.py --checkpoint ")
    assert lines[3].startswith("[4/10] row '+ warm start' seed 0: evaluate: would run")
    assert "python trainer.py --config_path configs/tiny.yaml --set prior_args.alpha=0" in lines[5]  # seed 1
    assert lines[-1].startswith("3 training(s) and 6 evaluation(s) to run, into ")
