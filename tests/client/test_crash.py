"""A client process killed with SIGKILL after sending and before the answer: restarted with
the same operation name and journal, it sends the same key, and the ledger shows one payment.

The payments service's card network takes 6 s here, so the first attempt is still running on
the server when its client dies, and still running when a restarted client (a new Python
process, slow to start on a busy machine) sends it again. Waits are for real processes (a
payment row to appear); nothing here times anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oncely.client import KeyJournal

from ..realserver.conftest import ROOT
from .support import Service, new_customer, running_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("crash"), card_latency_ms=6000) as started:
        yield started


def payer(service: Service, journal: Path, name: str, customer: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen(
        [sys.executable, "-m", "tests.client.payer", service.url, str(journal), name, customer],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def kill_in_flight(service: Service, journal: Path, name: str, customer: str) -> str:
    """Start a payer, SIGKILL it once its payment is on the server and before the answer; the
    key its journal holds."""
    proc = payer(service, journal, name, customer)
    try:
        service.wait_for_payment(customer, settled=False)
        assert proc.poll() is None, "the payer finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with KeyJournal(journal) as read:
        entry = read.get(name)
    assert entry is not None
    assert entry.finished is None
    return entry.key


@pytest.mark.parametrize("restart", ["after the first finished", "while it still runs"])
def test_a_killed_client_restarted_with_its_journal_pays_once(
    slow_service: Service, tmp_path: Path, restart: str
) -> None:
    """Killed mid-request and restarted with the same operation: one payment, the same key;
    the restart gets the replay (after 409s while the first attempt still runs)."""
    customer = new_customer()
    journal = tmp_path / "client.db"
    name = f"order-{customer}/pay"
    key = kill_in_flight(slow_service, journal, name, customer)
    if restart == "after the first finished":
        slow_service.wait_for_payment(customer, settled=True)

    result = outcome(payer(slow_service, journal, name, customer))

    assert result["status"] == 201
    report = result["report"]
    assert report["key"] == key
    assert report["replayed"] is True
    statuses = [attempt["status"] for attempt in report["history"]]
    if restart == "while it still runs":
        assert statuses[0] == 409
        assert set(statuses[:-1]) == {409}
    else:
        assert statuses == [201]
    assert len(slow_service.payments(customer)) == 1
    with KeyJournal(journal) as read:
        entry = read.get(name)
    assert entry is not None
    assert entry.status == 201
    assert entry.finished is not None
