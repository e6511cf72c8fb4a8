"""The command-line entry points' shared pieces: parser construction, the checkpoint and sampler arguments,
and logging (standard library and utils.config only)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable

from utils.config import INFERENCE_OVERRIDES

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def clock(seconds: float) -> str:
    """A duration for a log line: '4m32s', '1h02m'."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def docstring_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows ``doc``: its first paragraph as the description, the rest (examples,
    notes) verbatim after the arguments."""
    description, _, epilog = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def configure_logging(level: int = logging.INFO, timestamps: bool = True) -> None:
    """Log records to the console as every CLI of the project shows them."""
    logging.basicConfig(level=level, format=LOG_FORMAT if timestamps else "%(levelname)s %(name)s: %(message)s")


def fit_until_ctrl_c(trainer, *args, **kwargs) -> None:
    """``trainer.fit(*args, **kwargs)`` where Ctrl-C raises KeyboardInterrupt. Lightning answers it by ignoring
    SIGINT for the rest of the process and exiting with status 1, which a caller (a study) cannot tell from a
    failure and which leaves a later Ctrl-C without effect; here both are undone."""
    handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def run_command(main: Callable[[], int]) -> None:
    """``sys.exit(main())``, where Ctrl-C ends with one line and status 130 instead of a traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); running the same command again goes on from what was saved", file=sys.stderr)
        code = 130
    sys.exit(code)


class _Renamed(argparse.Action):
    """Stores like ``store``; given under its old name (the last option string), says once on stderr that the
    flag was renamed."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.option_strings[-1]:
            print(f"note: {option_string} is now {self.option_strings[0]} (the old name still works)",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(group, name: str, old: str, **kwargs) -> argparse.Action:
    """The flag ``name``, with ``old`` kept as an alias whose use prints a one-line deprecation note (the flags of
    every CLI share one vocabulary: --output_dir, --data_path, --num_steps, --train_steps)."""
    return group.add_argument(name, old, dest=name.lstrip("-"), action=_Renamed, **kwargs)


def add_checkpoint_arguments(group) -> None:
    """--checkpoint, --which, --config_path and --set (inference overrides): which trained model to load
    (:func:`utils.methods.resolve_checkpoint`, :func:`utils.methods.load_module`)."""
    group.add_argument("--checkpoint", help="a .ckpt file or a run directory (default: the run of --config_path)")
    group.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint in a run directory")
    group.add_argument("--config_path", help="config whose run directory holds the checkpoint, when no --checkpoint")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="change one key of the checkpoint's config, e.g. --set data_args.path=other.npz; "
                            "allowed: " + ", ".join(INFERENCE_OVERRIDES))


def add_sampler_argument(group, samplers: dict[str, tuple[str, ...]]) -> None:
    """--sampler (old name --method), one of the checkpoint's method's ``samplers`` ({method: its samplers})."""
    choices = tuple(dict.fromkeys(s for names in samplers.values() for s in names))
    add_renamed(group, "--sampler", "--method", choices=choices, metavar="SAMPLER",
                help="sampler, one of the checkpoint's method's ("
                     + "; ".join(f"{m}: {', '.join(s)}" for m, s in samplers.items())
                     + "; default: the checkpoint's sampling_args.sampler). --method is its old name")
