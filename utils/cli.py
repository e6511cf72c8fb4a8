"""The command-line entry points' shared argument-parser construction (standard library only)."""

from __future__ import annotations

import argparse


def docstring_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows ``doc``: its first paragraph as the description, the rest (examples,
    notes) verbatim after the arguments."""
    description, _, epilog = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
