"""The exhaustive check of the engine (tests/verify/explorer.py) at its default bounds, and
proof that it finds a real bug: stores with fencing or the lease check broken on purpose."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.verify.explorer import PLANTED, Bounds, explore

# The default bounds (``make verify`` goes deeper): each runs in a few seconds on 2 cores.
DEFAULT = {
    "plain, crash and retry": Bounds(app="plain", errors=0, renewals=0, ticks=2),
    "atomic, crash and retry": Bounds(app="atomic", errors=0, renewals=0, ticks=2),
    "atomic-complete, store error": Bounds(
        app="atomic-complete", crashes=0, retries=0, errors=1, renewals=0, ticks=2
    ),
    "atomic, clock jump, renewal and mismatch": Bounds(
        app="atomic", requests=1, mismatch=True, crashes=0, retries=0, errors=0, jumps=1, ticks=2
    ),
}


@pytest.mark.parametrize("name", list(DEFAULT))
def test_every_interleaving_keeps_the_invariants(
    name: str, record_property: Callable[[str, object], None]
) -> None:
    report = explore(DEFAULT[name])
    record_property("explorer", report.summary())
    print(report.summary())
    assert report.violation is None, report.format_trace()
    assert report.states > 100
    assert report.interleavings >= report.quiescent > 0


@pytest.mark.parametrize("bug", list(PLANTED))
def test_a_planted_bug_is_reported_with_a_short_trace(
    bug: str, record_property: Callable[[str, object], None]
) -> None:
    # A release only follows a failed app: the atomic app, with one store error, gets there.
    bounds = Bounds(app="atomic", crashes=0, retries=0, errors=1, renewals=0, ticks=2)
    report = explore(bounds, PLANTED[bug])
    record_property("explorer", report.summary())
    print(report.format_trace())
    assert report.violation is not None
    assert 3 <= len(report.trace) <= 12
    assert any("Claim" in event for event in report.trace)
    if bug == "claim-ignores-lease":
        assert "took over a lease that had not expired" in report.violation
    else:
        assert "stale holder" in report.violation
