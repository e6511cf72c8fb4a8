"""One flag vocabulary across the command lines; old spellings still work, with a note."""

import argparse
import importlib

import pytest

# entry point -> how to reach its argparse parser(s)
CLIS = ["trainer", "evaluate", "inferer", "study", "utils.evaluation.downstream", "utils.evaluation.memorisation",
        "utils.evaluation.segmenter", "utils.evaluation.ranking", "utils.studies.conditioning",
        "utils.motfm.__main__", "bench.throughput"]
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
