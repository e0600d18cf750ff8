"""The reference payments service on SQLite as a real uvicorn subprocess, shared by the chain
tests (each test has its own API key, so its own tenant, and its own customers), and helpers
that run ``oncely chain`` as a real process and read the service's ledger directly."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ..realserver.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "chains" / "checkout.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
STARTUP_TIMEOUT = 30.0


@dataclass
class Payments:
    """The running service and its ledger (the same SQLite file)."""

    url: str
    database: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def _rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.database, timeout=10)) as conn:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    def orders(self, customer: str) -> list[tuple[object, ...]]:
        """(id, status, payment) of every order of ``customer``."""
        return self._rows(
            "SELECT id, status, payment FROM orders WHERE customer = ? ORDER BY seq", customer
        )

    def payments(self, customer: str) -> list[tuple[object, ...]]:
        """(id, amount, status, order_id) of every payment of ``customer``."""
        return self._rows(
            "SELECT id, amount, status, order_id FROM payments WHERE customer = ? ORDER BY seq",
            customer,
        )

    def all_orders(self) -> int:
        return len(self._rows("SELECT id FROM orders"))


@pytest.fixture(scope="session")
def payments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Payments]:
    """``python -m oncely_payments`` on a free port, until the session ends."""
    folder = tmp_path_factory.mktemp("payments")
    database = folder / "payments.db"
    port = free_port()
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oncely_payments",
                "--store",
                f"sqlite:{database}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--card-latency-ms",
                "0",
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the payments service did not start:\n{log.read_text()}")
        time.sleep(0.05)
    try:
        yield Payments(url, database, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class Cli:
    """``oncely chain ...`` as a real process in ``cwd``, with ``env`` added."""

    cwd: Path
    env: dict[str, str]

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, **self.env, **env}
        environment.pop("ONCELY_CHAIN_CRASH_AT", None)
        environment.update({k: v for k, v in env.items()})
        return subprocess.run(
            [sys.executable, "-m", "oncely", "chain", *args],
            cwd=self.cwd,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def api_key() -> str:
    return unique("sk_test_chain")


@pytest.fixture
def cli(tmp_path: Path, api_key: str) -> Cli:
    return Cli(tmp_path, {"API_KEY": api_key, "PYTHONUNBUFFERED": "1"})


def checkout_file(folder: Path, payments: Payments) -> Path:
    """The shipped example, aimed at the test's service."""
    path = folder / "checkout.yaml"
    text = EXAMPLE.read_text().replace("http://127.0.0.1:8000", payments.url)
    path.write_text(text)
    return path


def forward(request: httpx.Request) -> httpx.Response:
    """Send ``request`` to the real server (for ``httpx.MockTransport`` handlers that watch or
    change what goes by)."""
    with httpx.Client() as client:
        answer = client.send(request)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
