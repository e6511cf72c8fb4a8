"""Run a study: every row of a study file x every training seed, trained, evaluated and tabulated.

Examples:
    python study.py configs/studies/seed_ablation_quick.yaml
    python study.py configs/studies/seed_results.yaml --set seeds=[0,1,2,3,4]
    python study.py configs/studies/seed_ablation_quick.yaml --report_only    # tables from finished runs
    python study.py configs/studies/seed_results_quick.yaml --dry_run         # what would run; writes nothing

Writes into <output_dir>/<name>/: results.md (the seed's table layout and the differences from the
baseline row), results.csv and results.json (every per-image value), samples.png, metrics.png, configs/
(each row's resolved config) and runs/ (each row and seed's run directory). Running it again skips what
finished; a killed study continues where it stopped; a row whose config changed is refused; a second
study.py on the same study directory is refused while the first runs (its .lock).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from contextlib import ExitStack

from utils.cli import configure_logging, docstring_parser, run_command


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__)
    p.add_argument("study", help="study file (configs/studies/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the study file, e.g. --set seeds=[0,1] (repeatable)")
    p.add_argument("--report_only", action="store_true", help="only write the tables from finished runs")
    p.add_argument("--dry_run", action="store_true",
                   help="list every stage: done earlier or to run, with its command; write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    from utils.config import ConfigError
    from utils.locks import LockError, directory_lock
    from utils.studies.report import write_report
    from utils.studies.runner import plan_study, run_study
    from utils.studies.spec import load_study

    try:
        spec = load_study(args.study, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if args.dry_run:
        print("\n".join(plan_study(spec)))
        return 0
    with ExitStack() as held:
        try:
            held.enter_context(directory_lock(spec.study_dir))  # one study.py per study directory
        except LockError as e:
            raise SystemExit(f"error: {e}") from None
        if not args.report_only:
            import evaluate
            import trainer

            try:
                run_study(spec, trainer.main, evaluate.main)
            except KeyboardInterrupt:
                return 130  # the runner said where it stopped; the lock is released on the way out
        command = shlex.join(["python", "study.py", *(argv if argv is not None else sys.argv[1:])])
        path = write_report(spec, command)
    print(path.read_text())
    logging.getLogger("comet.study").info("wrote %s", path)
    return 0


def cli() -> None:
    """The console script (pyproject.toml): Ctrl-C ends with one line and status 130."""
    run_command(main)


if __name__ == "__main__":
    cli()
