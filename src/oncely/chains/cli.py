"""``oncely chain``: run, resume, show and list chain runs.

    oncely chain run FILE [--input k=v ...] [--run-id R] [--journal PATH] [--env-file F]
                          [--report-junit F] [--report-json F] [--quiet]
    oncely chain resume R      oncely chain show R      oncely chain list

Exit codes: 0 all passed; 1 a step failed (assertion or HTTP status); 2 bad definition or
usage; 3 transport failure after retries; 4 resume refused (changed inputs or definition).

``ONCELY_CHAIN_CRASH_AT=POINT:STEP`` (tests) makes the process SIGKILL itself when the run
reaches POINT (before_step, after_intent, after_send, after_step) of step STEP.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._console import Display, runs_table, step_results
from ._journal import DEFAULT_JOURNAL, Journal
from ._loader import load_chain
from ._model import Chain, ChainError, DefinitionError
from ._report import write_reports
from ._results import EXIT_REFUSED, EXIT_USAGE, ResumeRefused, RunResult
from ._runner import HOOK_POINTS, run_chain

__all__ = ["main"]

CRASH_ENV = "ONCELY_CHAIN_CRASH_AT"


class _Help(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so a file name such as oncely-chains.db stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _input(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--input takes NAME=VALUE, not {text!r}")
    return name, value


def _common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--journal",
        default=DEFAULT_JOURNAL,
        metavar="PATH",
        help=f"the run journal, a SQLite file (default: {DEFAULT_JOURNAL} in the working "
        "directory)",
    )


def _running(cmd: argparse.ArgumentParser) -> None:
    _common(cmd)
    cmd.add_argument(
        "--input",
        action="append",
        type=_input,
        default=[],
        metavar="NAME=VALUE",
        help="a declared input (repeat for more)",
    )
    cmd.add_argument("--env-file", metavar="F", help="a .env file for ${ENV:...}")
    cmd.add_argument("--report-junit", metavar="F", help="write a JUnit XML report to F")
    cmd.add_argument("--report-json", metavar="F", help="write a JSON report to F")
    cmd.add_argument(
        "--quiet", action="store_true", help="no progress and no table (errors still on stderr)"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="oncely chain",
        description="Run API chains whose unsafe steps take effect once, and resume them.",
        formatter_class=_Help,
    )
    sub = top.add_subparsers(dest="action", required=True)
    run = sub.add_parser(
        "run", help="run a chain file", description="Run a chain file.", formatter_class=_Help
    )
    run.add_argument("file", help="the chain (YAML)")
    run.add_argument("--run-id", metavar="R", help="the run's id (default: a new one)")
    _running(run)
    resume = sub.add_parser(
        "resume",
        help="continue a run",
        description="Continue a run where it stopped.",
        formatter_class=_Help,
    )
    resume.add_argument("run_id", metavar="R", help="the run's id")
    _running(resume)
    show = sub.add_parser(
        "show", help="show a run's steps", description="Show a run's steps.", formatter_class=_Help
    )
    show.add_argument("run_id", metavar="R", help="the run's id")
    _common(show)
    listing = sub.add_parser(
        "list", help="list the runs", description="List the runs.", formatter_class=_Help
    )
    _common(listing)
    return top


def _crash_hook() -> Callable[[str, str], None] | None:
    """The test hook of ``ONCELY_CHAIN_CRASH_AT``: SIGKILL at a named point of a step."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    point, _, step = spec.partition(":")
    if point not in HOOK_POINTS or not step:
        raise DefinitionError(
            f"{CRASH_ENV} must be POINT:STEP with POINT one of {', '.join(HOOK_POINTS)}"
        )

    def hook(reached: str, name: str) -> None:
        if (reached, name) == (point, step):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _run(chain: Chain, args: argparse.Namespace, run_id: str | None) -> int:
    display = Display(quiet=args.quiet)
    with display:
        result: RunResult = run_chain(
            chain,
            dict(args.input),
            run_id=run_id,
            journal=args.journal,
            env_file=args.env_file,
            on_event=display,
            hook=_crash_hook(),
        )
    write_reports(result, junit=args.report_junit, json_path=args.report_json)
    display.table(result.steps, f"run {result.run_id} ({result.chain})")
    display.summary(result)
    for step in result.steps:
        if step.state == "failed" and args.quiet:
            print(f"oncely chain: step {step.label!r} failed: {step.error}", file=sys.stderr)
    return result.exit_code


def _resume(args: argparse.Namespace) -> int:
    with Journal(args.journal) as journal:
        record = journal.run(args.run_id)
    if record is None:
        raise DefinitionError(f"no run {args.run_id!r} in the journal {args.journal}")
    if record.chain is None or not Path(record.chain).is_file():
        raise DefinitionError(
            f"run {args.run_id!r}: its chain file {record.chain!r} is not there any more"
        )
    return _run(load_chain(record.chain), args, args.run_id)


def _show(args: argparse.Namespace) -> int:
    with Journal(args.journal) as journal:
        record = journal.run(args.run_id)
        if record is None:
            raise DefinitionError(f"no run {args.run_id!r} in the journal {args.journal}")
        records = journal.steps(args.run_id)
    loops = {r.step for r in records if r.iteration > 0}
    display = Display()
    exit_code = "-" if record.exit_code is None else record.exit_code
    display.table(
        step_results(records, loops),
        f"run {record.run_id} ({record.chain or record.name}): {record.state}, exit {exit_code}",
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    with Journal(args.journal) as journal:
        runs = journal.runs()
    print(runs_table(runs) if runs else f"no runs in {args.journal}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = parser().parse_args(argv)
    try:
        if args.action == "run":
            return _run(load_chain(args.file), args, args.run_id)
        if args.action == "resume":
            return _resume(args)
        if args.action == "show":
            return _show(args)
        return _list(args)
    except ResumeRefused as exc:
        print(f"oncely chain {args.action}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ChainError as exc:
        print(f"oncely chain {args.action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
