"""The crash windows, with a real server process killed by SIGKILL and restarted on its database.

``ONCELY_PAYMENTS_CRASH_AT`` makes the service kill itself the first time a payment reaches:

- ``before_first_commit``: inside phase 1's transaction (payment row + recovery point), before
  COMMIT: nothing of it survives; the retry starts over.
- ``during_charge``: the card network has charged, phase 2 has not run: the payment is pending;
  the retry resumes at the charge with the same downstream key, and the network answers the
  charge it already made.
- ``after_charge_commit``: phase 2 committed the payment's status and the response together,
  and the response never left: the retry gets that response replayed. With the ledger apart
  from the store (Redis) the response was not stored yet: the retry runs again, finds the
  payment settled and the charge made (ids derived from the key), and answers the same.

In each, the retries (same key, a 1 s lease) end with one payment, one charge, 201 with the
same payment on every repeat, and the key not stuck.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncely_payments import Settings
from payments_testing import Ledger, Network, auth, new_key, payment

STARTUP_TIMEOUT = 30.0
RETRY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class Servers:
    """Service processes on one SQLite database; every one is stopped when the test ends."""

    tmp_path: Path
    settings: Settings
    started: list[Server] = field(default_factory=list)

    def start(self, *, crash_at: str | None = None) -> Server:
        """``python -m oncely_payments`` on a free port; returns once /health answers 200."""
        port = free_port()
        log = self.tmp_path / f"server-{len(self.started)}.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "ONCELY_PAYMENTS_STORE": self.settings.store,
            "ONCELY_PAYMENTS_PORT": str(port),
            "ONCELY_PAYMENTS_SCHEMA": self.settings.schema,
            "ONCELY_PAYMENTS_CARD_NETWORK_DB": str(self.settings.card_network_path),
            "ONCELY_PAYMENTS_DATABASE": self.settings.database_url or "",
            "ONCELY_PAYMENTS_STORE_PREFIX": self.settings.store_prefix,
        }
        env.pop("ONCELY_PAYMENTS_CRASH_AT", None)
        if crash_at is not None:
            env["ONCELY_PAYMENTS_CRASH_AT"] = crash_at
        command = [
            sys.executable,
            "-m",
            "oncely_payments",
            "--host",
            "127.0.0.1",
            "--lease",
            "1",
            "--card-latency-ms",
            "5",
            "--log-level",
            "warning",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=self.tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(proc, port, log)
        self.started.append(server)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"the service exited with {proc.returncode}:\n{server.output()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(server.url + "/health").status_code == 200:
                        return server
                time.sleep(0.05)
        pytest.fail(f"the service did not start in {STARTUP_TIMEOUT} s:\n{server.output()}")

    def report(self) -> str:
        return "\n".join(
            f"===== server {n} (exit {s.proc.returncode}) =====\n{s.output()}"
            for n, s in enumerate(self.started)
        )


@pytest.fixture
def servers(tmp_path: Path, settings: Settings) -> Iterator[Servers]:
    made = Servers(tmp_path, settings)
    try:
        yield made
    finally:
        for server in made.started:
            server.stop()
        print(made.report())  # shown when the test fails


def retry_until_answered(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    """What a client does: the same request, same key, until it is not 409/5xx."""
    deadline = time.monotonic() + RETRY_TIMEOUT
    with httpx.Client(timeout=10.0) as client:
        while True:
            response = client.post(f"{url}/payments", json=body, headers=auth(key=key))
            if response.status_code not in (409, 500, 502, 503) or time.monotonic() > deadline:
                return response
            time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "left_by_crash"),
    [
        ("before_first_commit", []),
        ("during_charge", ["pending"]),
        ("after_charge_commit", ["succeeded"]),
    ],
)
def test_a_crash_ends_in_one_payment_one_charge_and_the_right_answer(
    servers: Servers, ledger: Ledger, network: Network, point: str, left_by_crash: list[str]
) -> None:
    key = new_key()
    body = payment(amount=4200, currency="GBP", customer="cus_crash")
    doomed = servers.start(crash_at=point)
    with httpx.Client(timeout=10.0) as client, pytest.raises(httpx.TransportError):
        client.post(f"{doomed.url}/payments", json=body, headers=auth(key=key))
    assert doomed.proc.wait(timeout=10) == -signal.SIGKILL
    assert (servers.tmp_path / servers.settings.crash_marker(point)).exists()

    before = ledger.payments()
    assert [row["status"] for row in before] == left_by_crash
    assert len(network.charges()) == (0 if point == "before_first_commit" else 1)

    # The same configuration again: the crash already happened, so it does not repeat.
    restarted = servers.start(crash_at=point)
    answer = retry_until_answered(restarted.url, key, body)
    assert answer.status_code == 201, answer.text
    # With the ledger apart from the store (Redis), the response was not stored with the charge:
    # the retry runs again, finds the payment settled and the charge made, and answers the same.
    stored_with_charge = point == "after_charge_commit" and servers.settings.shares_transaction
    assert (answer.headers.get("idempotent-replayed") == "true") == stored_with_charge
    created = answer.json()
    assert created["status"] == "succeeded"
    assert answer.headers["location"] == f"/payments/{created['id']}"

    [row] = ledger.payments()
    assert (row["id"], row["status"]) == (created["id"], "succeeded")
    if before:
        assert row["id"] == before[0]["id"]  # resumed, not started over
    [charge] = network.charges()
    assert (charge["outcome"], charge["amount"]) == ("approved", 4200)
    assert row["charge_id"] == charge["id"]

    with httpx.Client(timeout=10.0) as client:
        for _ in range(3):
            again = client.post(f"{restarted.url}/payments", json=body, headers=auth(key=key))
            assert again.status_code == 201
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == created
        other = client.post(f"{restarted.url}/payments", json=body, headers=auth(key=new_key()))
        assert other.status_code == 201
    assert ledger.count() == 2
    assert len(network.charges()) == 2
