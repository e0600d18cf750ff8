"""What a run shows: live progress on a terminal (rich), plain lines otherwise, a final table.

Everything shown is already redacted (see :class:`StepResult`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

from ._journal import RunRecord, StepRecord
from ._results import Event, RunResult, StepFinished, StepResult, StepStarted

__all__ = ["Display", "plain_table", "runs_table", "step_results"]

_COLUMNS = ("step", "state", "status", "attempts", "time", "note")


def _row(step: StepResult) -> tuple[str, ...]:
    note = "from the journal" if step.journal else ""
    if step.error:
        note = step.error if not note else f"{note}; {step.error}"
    return (
        step.label,
        step.state,
        "-" if step.status is None else str(step.status),
        str(step.attempts),
        f"{step.elapsed * 1000:.0f} ms",
        note,
    )


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with spaces; the last column is not padded."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    lines = []
    for row in (tuple(headers), *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def step_results(records: Sequence[StepRecord], loops: set[str]) -> list[StepResult]:
    """The journal's steps as results (``show``); a step sent without a recorded answer is
    shown as 'interrupted'."""
    results = []
    for record in records:
        state: Any = record.state if record.state != "sending" else "interrupted"
        results.append(
            StepResult(
                name=record.step,
                state=state,
                method=record.method,
                url=record.url,
                iteration=record.iteration if record.step in loops else None,
                status=record.status,
                attempts=record.attempts,
                replayed=record.replayed,
                elapsed=record.elapsed,
                captures=record.captures,
                error=record.error
                or (
                    "sent; no answer recorded (resume sends it again, same key)"
                    if record.state == "sending"
                    else None
                ),
            )
        )
    return results


def runs_table(runs: Sequence[RunRecord]) -> str:
    rows = [
        (
            run.run_id,
            run.state,
            "-" if run.exit_code is None else str(run.exit_code),
            run.chain or run.name,
        )
        for run in runs
    ]
    return plain_table(("run", "state", "exit", "chain"), rows)


class Display:
    """Progress while a run goes and its final table, on ``stream``.

    On a terminal (and not ``quiet``): a live table (rich); otherwise one plain line per step.
    ``quiet``: nothing but the errors, which go to stderr.
    """

    def __init__(self, *, quiet: bool = False, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self._rows: list[StepResult] = []
        self._current: StepStarted | None = None
        self._live: Any = None

    def __enter__(self) -> Display:
        if self.tty and not self.quiet:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(file=self.stream), transient=True)
            self._live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _render(self) -> Any:
        from rich.table import Table

        table = Table(*_COLUMNS, title="running", title_justify="left")
        for step in self._rows:
            table.add_row(*_row(step))
        if self._current is not None:
            label = self._current.name
            if self._current.iteration is not None:
                label += f"[{self._current.iteration}]"
            table.add_row(label, "running…", "", "", "", "")
        return table

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            self._current = event
        else:
            self._current = None
            self._rows.append(event.result)
            if self._live is None and not self.quiet:
                self._line(event)
        if self._live is not None:
            self._live.update(self._render())

    def _line(self, event: StepFinished) -> None:
        step = event.result
        status = "" if step.status is None else f" {step.status}"
        origin = ", from the journal" if step.journal else ""
        plural = "" if step.attempts == 1 else "s"
        print(
            f"[{event.index + 1}/{event.total}] {step.label}: {step.state}{status} "
            f"({step.attempts} attempt{plural}, {step.elapsed * 1000:.0f} ms{origin})",
            file=self.stream,
        )
        for line in event.printed:
            print(f"    {line}", file=self.stream)
        if step.error:
            print(f"    {step.error}", file=self.stream)

    def table(self, steps: Sequence[StepResult], title: str) -> None:
        """The final table (also for ``show``)."""
        if self.quiet:
            return
        if self.tty:
            from rich.console import Console
            from rich.table import Table

            table = Table(*_COLUMNS, title=title, title_justify="left")
            for step in steps:
                table.add_row(*_row(step))
            Console(file=self.stream).print(table)
            return
        print(title, file=self.stream)
        print(plain_table(_COLUMNS, [_row(s) for s in steps]), file=self.stream)

    def summary(self, result: RunResult) -> None:
        if self.quiet:
            return
        counts: dict[str, int] = {}
        for step in result.steps:
            counts[step.state] = counts.get(step.state, 0) + 1
        shown = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no steps"
        verdict = "passed" if result.passed else f"failed (exit {result.exit_code})"
        print(f"run {result.run_id}: {verdict}: {shown}", file=self.stream)
