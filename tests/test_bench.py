import json

import pytest
import torch

from bench import device_probe, throughput

FIELDS = {"setting", "task", "batch_size", "precision", "attention", "optimizer", "images_per_s", "ratio_to_baseline",
          "peak_gib", "gflop_per_image", "tflops", "fraction_of_peak", "first_step_s", "compile_s", "timed_images"}


@pytest.mark.slow  # seconds of tiny training per setting; the fast subset keeps under 2 minutes
def test_tiny_benchmark_measures_baseline_and_every_framework_setting(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert throughput.main(["--tiny", "--peak_tflops", "2", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    env, rows = records[0], records[1:]
    assert env["record"] == "environment" and env["device"].startswith("CPU") and env["torch"] and env["monai"]
    # FLOPs counted for this network: a training step (forward + backward) costs about three forwards
    assert 2.5 < env["gflop_train_step_per_image"] / env["gflop_forward_per_image"] < 3.1

    names = ["motfm", *throughput.DEFAULT_SETTINGS]
    assert [(r["setting"], r["task"]) for r in rows] == [(n, task) for n in names for task in ("train", "sample")]
    for r in rows:
        assert FIELDS <= set(r), r
        assert r["batch_size"] == 2 and r["images_per_s"] > 0 and r["ratio_to_baseline"] > 0 and r["tflops"] > 0
        assert r["fraction_of_peak"] == pytest.approx(r["tflops"] / 2, rel=0.01, abs=1e-4)
        assert r["peak_gib"] is None  # no GPU memory on a CPU
        assert r["timed_images"] == (4 if r["task"] == "train" else 2)  # --tiny: 2 steps, 1 sampling batch
    base = {r["task"]: r for r in rows if r["setting"] == "motfm"}
    for r in rows:
        want = r["images_per_s"] / base[r["task"]]["images_per_s"]
        assert r["ratio_to_baseline"] == pytest.approx(want, rel=0.01)
    by = {(r["setting"], r["task"]): r for r in rows}
    assert by["motfm", "train"]["attention"] == "einsum" and by["comet-bf16", "train"]["attention"] == "sdpa"
    assert by["comet-bf16", "train"]["precision"] == "bf16-mixed"
    assert by["comet-fp16", "train"]["precision"] == "32-true"  # fp16 needs a GPU, as in trainer.py
    assert by["comet-bf16", "sample"]["gflop_per_image"] == pytest.approx(10 * env["gflop_forward_per_image"], 0.01)

    assert "| setting | task | batch |" in stdout and "| comet-bf16 | sample | 2 |" in stdout
    saved = json.loads(out.read_text())
    assert saved["results"] == rows and saved["environment"] == env


def test_output_is_not_overwritten_without_the_flag(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("mine")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        throughput.main(["--tiny", "--output", str(out)])
    assert out.read_text() == "mine"


@pytest.mark.parametrize("argv, message", [(["--iters", "0"], "--iters must be >= 1"),
                                           (["--batch_sizes", "1"], "--batch_sizes must be >= 2")])
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(SystemExit, match=message):
        throughput.main(["--tiny", *argv])


@pytest.mark.slow  # several seconds on a 2-core CPU; the fast subset keeps under 2 minutes
def test_sampling_only_with_profiles(tmp_path, capsys):
    """--tasks sample measures no training; --profile writes each setting's top operators after the timed window."""
    argv = ["--tiny", "--tasks", "sample", "--settings", "comet-bf16", "--profile", str(tmp_path / "prof")]
    assert throughput.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"record": "result"')]
    assert [(r["setting"], r["task"]) for r in rows] == [("motfm", "sample"), ("comet-bf16", "sample")]
    written = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert written == ["comet-bf16_sample_b2.txt", "motfm_sample_b2.txt"]
    table = (tmp_path / "prof" / "comet-bf16_sample_b2.txt").read_text()
    assert "Self CPU" in table and "aten::conv2d" in table  # the network ran inside the profiled call


@pytest.mark.slow  # compiles the tiny network for training and for sampling (a cheap backend)
def test_the_fast_setting_samples_with_bf16_weights_compiled_once(capsys, monkeypatch):
    """comet-bf16-fast's sampling: bf16 weights and a compiled network, timed against the baseline (its training
    levers are each tested in tests/test_fast_paths.py)."""
    from utils.methods.networks import compile_network

    compiled = []
    monkeypatch.setattr("utils.methods.base.compile_network",
                        lambda net, **kw: compiled.append(net) or compile_network(net, backend="aot_eager"))
    assert throughput.main(["--tiny", "--tasks", "sample", "--settings", "comet-bf16-fast"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"record": "result"')]
    by = {(r["setting"], r["task"]): r for r in rows}
    assert by["comet-bf16-fast", "sample"]["precision"] == "bf16-true"
    assert len(compiled) == 1 and next(compiled[0].parameters()).dtype is torch.bfloat16  # one copy, compiled once
    assert all(by[k]["ratio_to_baseline"] > 0 for k in by)


@pytest.mark.slow  # seconds of tiny training per setting; the fast subset keeps under 2 minutes
def test_training_profile_is_an_extra_step(tmp_path, capsys):
    argv = ["--tiny", "--tasks", "train", "--settings", "comet-fp32", "--profile", str(tmp_path / "prof")]
    assert throughput.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"record": "result"')]
    assert [(r["setting"], r["task"], r["timed_images"]) for r in rows] == [("motfm", "train", 4),
                                                                            ("comet-fp32", "train", 4)]
    table = (tmp_path / "prof" / "comet-fp32_train_b2.txt").read_text()
    assert "autograd" in table.lower() or "backward" in table.lower()  # a training step, backward included


@pytest.mark.slow  # seconds of tiny training per setting; the fast subset keeps under 2 minutes
def test_tiny_benchmark_of_a_3d_config_times_volumes(capsys):
    """A 3-D config is measured on volumes (FLOPs, the baseline loop, the framework's data), not on 2-D images
    fed to its 3-D network."""
    assert throughput.main(["--tiny", "--config_path", "configs/tiny_3d.yaml", "--settings", "comet-fp32"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    env, rows = records[0], records[1:]
    assert 2.5 < env["gflop_train_step_per_image"] / env["gflop_forward_per_image"] < 3.1
    assert [(r["setting"], r["task"]) for r in rows] == [(n, t) for n in ("motfm", "comet-fp32")
                                                         for t in ("train", "sample")]
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_the_device_probe_runs_on_the_cpu_with_the_cuda_steps_skipped(tmp_path):
    assert device_probe.main(["--tiny", "--backend", "aot_eager", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "probe.json").read_text())
    train = record["train"]
    assert train["+cudnn.benchmark"] == {"skipped": "cuDNN is CUDA's"}
    assert train["+cuda-graph"] == {"skipped": "CUDA graphs need CUDA"}
    for name in ("eager", "+channels-last", "+bf16-groupnorm", "+compile(fullgraph)"):  # fp32 on the CPU: exact
        assert train[name]["per_call_s"] > 0 and train[name]["loss_rel_err"] <= 1e-6, name
        assert train[name]["grad_rel_err"] <= 1e-5, name
    assert record["sample"]["+cuda-graph batch 2"] == {"skipped": "CUDA graphs need CUDA"}
    assert record["sample"]["+compile(fullgraph) batch 2"]["per_call_s"] > 0
    assert record["groupnorm_check"]["weight_grad_rel_err"] < 1e-2
    assert "Name" in (tmp_path / "profile.txt").read_text()
