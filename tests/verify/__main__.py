"""``python -m tests.verify`` (``make verify``): the explorer at deeper bounds than ``make test``.

Prints one line per configuration (states, transitions, interleavings, seconds), the shortest
trace of any violation, and a summary; exits 1 on a violation.
"""

from __future__ import annotations

import sys
import time

from tests.verify.explorer import Bounds, explore

DEEP = [
    Bounds(app="plain", crashes=1, retries=1, errors=1, renewals=0, ticks=2),
    Bounds(app="atomic", crashes=1, retries=1, errors=1, renewals=0, ticks=2),
    Bounds(app="atomic-complete", crashes=1, retries=0, errors=1, renewals=1, ticks=2),
    Bounds(app="atomic", requests=1, mismatch=True, jumps=1, errors=0, renewals=1, ticks=2),
    Bounds(app="atomic", requests=3, crashes=0, retries=0, errors=0, renewals=0, ticks=2),
    Bounds(app="plain", crashes=1, retries=1, errors=0, renewals=0, ticks=3),
]


def main() -> int:
    started = time.perf_counter()
    states = interleavings = violations = 0
    for bounds in DEEP:
        report = explore(bounds)
        print(report.summary(), flush=True)
        states += report.states
        interleavings += report.interleavings
        if report.violation is not None:
            violations += 1
            print(report.format_trace(), flush=True)
    seconds = time.perf_counter() - started
    print(
        f"verify: {len(DEEP)} configurations, {states} states, {interleavings} interleavings, "
        f"{violations} violations, {seconds:.0f} s"
    )
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
