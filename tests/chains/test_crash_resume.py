"""A chain process SIGKILLed at every step boundary and in the middle of every step, then
resumed: every effect once in the service's ledger, and the final table says what was replayed.

``ONCELY_CHAIN_CRASH_AT=POINT:STEP`` makes the chain process kill itself there:

- ``before_step``: a boundary (the steps before it are in the journal, nothing of it is);
- ``after_intent``: the intent and key are on disk, the request has not left;
- ``after_send``: the server acted and answered, the journal has not recorded it;
- ``after_step`` of the last step: the run is done but not marked finished.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from .conftest import Cli, Payments, checkout_file, unique

STEPS = ("create_order", "pay", "read_order", "confirm", "fetch")
UNSAFE = ("create_order", "pay", "confirm")
POINTS = [
    *[("before_step", step) for step in STEPS],
    ("after_step", "fetch"),
    *[("after_send", step) for step in STEPS],
    ("after_intent", "pay"),
]


@pytest.mark.parametrize(("point", "crashed"), POINTS, ids=[f"{p}:{s}" for p, s in POINTS])
def test_a_killed_run_resumes_and_every_effect_happens_once(
    cli: Cli, payments: Payments, tmp_path: Path, point: str, crashed: str
) -> None:
    chain = checkout_file(tmp_path, payments)
    customer = unique("cus_crash")
    run_id = unique("run")
    killed = cli(
        "run",
        str(chain),
        "--input",
        f"customer={customer}",
        "--run-id",
        run_id,
        ONCELY_CHAIN_CRASH_AT=f"{point}:{crashed}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    resumed = cli("resume", run_id, "--report-json", "report.json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    [(order_id, status, paid_by)] = payments.orders(customer)
    assert status == "fulfilled"
    [(payment_id, amount, payment_status, for_order)] = payments.payments(customer)
    assert (amount, payment_status, for_order, paid_by) == (900, "succeeded", order_id, payment_id)

    steps = {s["name"]: s for s in json.loads((tmp_path / "report.json").read_text())["steps"]}
    assert list(steps) == list(STEPS)
    position = STEPS.index(crashed)
    if point == "after_step":
        position += 1
    for name in STEPS[:position]:
        assert steps[name]["journal"] is True, name
    for name in STEPS[position:]:
        assert steps[name]["journal"] is False, name
    replayed = point == "after_send" and crashed in UNSAFE
    if position < len(STEPS):
        assert steps[crashed]["state"] == ("replayed" if replayed else "ran")
    assert [n for n, s in steps.items() if s["state"] == "replayed"] == (
        [crashed] if replayed else []
    )

    tables = [resumed.stdout]
    if replayed:  # and `show` says so too, from the journal
        shown = cli("show", run_id)
        assert shown.returncode == 0
        assert f"run {run_id} " in shown.stdout
        tables.append(shown.stdout)
    for text in tables:
        row = next(line for line in text.splitlines() if line.startswith(crashed + " "))
        assert ("replayed" in row) is replayed, text
