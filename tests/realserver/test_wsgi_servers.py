"""The WSGI middleware under real servers: gunicorn with threads, gunicorn with 2 worker
processes on one SQLite file, and waitress. 200 concurrent duplicates run the handler once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, STARTUP_TIMEOUT, free_port

BIN = Path(sys.executable).parent

COMMANDS = {
    "gunicorn-threads": [
        str(BIN / "gunicorn"), "--workers", "1", "--threads", "32", "--bind", "127.0.0.1:{port}",
        "tests.realserver.wsgi_app:app",
    ],
    "gunicorn-2-workers": [
        str(BIN / "gunicorn"), "--workers", "2", "--threads", "16", "--bind", "127.0.0.1:{port}",
        "tests.realserver.wsgi_app:app",
    ],
    "waitress": [
        str(BIN / "waitress-serve"), "--threads", "32", "--connection-limit", "400",
        "--listen", "127.0.0.1:{port}",
        "tests.realserver.wsgi_app:app",
    ],
}  # fmt: skip


@contextlib.contextmanager
def serving(kind: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The server ``kind`` on a free port (its own process group); stopped afterwards."""
    port = free_port()
    ledger = tmp_path / "ledger.jsonl"
    env = {
        **os.environ,
        "ONCELY_TEST_LEDGER": str(ledger),
        "ONCELY_TEST_STORE": f"sqlite:{tmp_path / 'oncely.db'}",
    }
    command = [part.format(port=port) for part in COMMANDS[kind]]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield url, ledger
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


async def duplicates(url: str, count: int) -> list[httpx.Response]:
    key = str(uuid.uuid4())
    headers = {"Idempotency-Key": key, "X-Tenant-Id": "acme"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one() -> httpx.Response:
            return await client.post("/payments", json={"amount": 1000}, headers=headers)

        return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(COMMANDS))
async def test_200_concurrent_duplicates_run_the_handler_once(kind: str, tmp_path: Path) -> None:
    """Every answer is the one 201 (or 409 while it ran); the ledger holds one run."""
    with serving(kind, tmp_path) as (url, ledger):
        answers = await duplicates(url, 200)
        # Once the first has finished, every repeat is its replay.
        replay = await duplicates_with(url, answers)
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {201, 409}, statuses
    created = {a.content for a in answers if a.status_code == 201}
    assert len(created) == 1
    assert replay.status_code == 201
    assert replay.content in created
    assert replay.headers["idempotent-replayed"] == "true"
    runs = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(runs) == 1, runs


async def duplicates_with(url: str, answers: list[httpx.Response]) -> httpx.Response:
    request = answers[0].request
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            str(request.url), content=request.content, headers=dict(request.headers)
        )
