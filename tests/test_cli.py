"""One flag vocabulary across the command lines; old spellings still work, with a note; `--help` answers before
the heavy libraries load."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# entry point -> how to reach its argparse parser(s)
CLIS = ["trainer", "evaluate", "inferer", "study", "utils.evaluation.downstream", "utils.evaluation.memorisation",
        "utils.evaluation.segmenter", "utils.evaluation.ranking", "utils.evaluation.weights",
        "utils.studies.conditioning", "utils.motfm.__main__", "bench.throughput"]
# what a flag is called here, and the spellings that once meant the same
RENAMED = {"--num_inference_steps": "--num_steps", "--real": "--data_path", "--data": "--data_path",
           "--synthetic": "--generated", "--method": "--sampler"}


def _parsers(module):
    parser = importlib.import_module(module).build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser] + [p for s in subs for p in s.choices.values()]


@pytest.mark.parametrize("module", CLIS)
def test_old_spellings_are_only_aliases(module):
    for parser in _parsers(module):
        for action in parser._actions:
            first = action.option_strings[0] if action.option_strings else None
            assert first not in RENAMED, f"{module}: {first} is now {RENAMED.get(first)}"
            if first == "--steps" or (first == "--output" and "file" not in (action.help or "")):
                raise AssertionError(f"{module}: {first} is ambiguous: --num_steps / --train_steps, --output_dir")


def test_an_old_spelling_works_and_says_it_was_renamed(capsys):
    from utils.evaluation import memorisation

    old = memorisation.build_parser().parse_args(["--generated", "g.npz", "--data", "d.npz", "--output", "o"])
    assert (old.data_path, old.output_dir) == ("d.npz", "o")
    err = capsys.readouterr().err
    assert "note: --data is now --data_path" in err and "note: --output is now --output_dir" in err
    memorisation.build_parser().parse_args(["--generated", "g.npz", "--data_path", "d.npz", "--output_dir", "o"])
    assert capsys.readouterr().err == ""


# every command line as a person types it: a script path (python X.py) or a module (python -m X)
COMMANDS = ["trainer.py", "inferer.py", "evaluate.py", "study.py", "bench/throughput.py",
            "utils.evaluation.downstream", "utils.evaluation.memorisation", "utils.evaluation.ranking",
            "utils.evaluation.segmenter", "utils.evaluation.weights", "utils.studies.conditioning", "utils.motfm",
            "utils.data.camus", "utils.data.synthetic_echo", "utils.data.dataset_info"]
# seconds to import each; none is needed to print a usage
HEAVY = ("torch", "monai", "pytorch_lightning", "lightning", "scipy", "skimage", "matplotlib")
# runs one command with --help as `python` would, then reports its exit code and the heavy modules it loaded
HELP = """
import json, runpy, sys
target, heavy = sys.argv[1], sys.argv[2:]
sys.argv = [target, "--help"]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = None
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}), file=sys.stderr)
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints_without_the_heavy_libraries(command):
    done = subprocess.run([sys.executable, "-c", HELP, command, *HEAVY], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), done.stderr
    assert done.stdout.startswith("usage:") and "--help" in done.stdout
    assert report["loaded"] == [], f"{command} --help imported {report['loaded']}"
