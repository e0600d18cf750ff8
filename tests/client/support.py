"""What the client tests share: a real payments service, faults on the wire, time that moves
only when told to, and one client interface over the sync and async transports.

``Faults`` is a script of what happens to each attempt, decided once in ``Faults.next`` and
carried out by two thin wrappers (sync and async) around httpx's real transports:

- ``PASS``: forwarded; the answer comes back.
- ``LOSE``: forwarded and answered, and the answer is lost on the way back (``ReadError``).
- ``TIMEOUT``: forwarded and answered, and the client times out before reading it.
- ``REFUSE``: never sent (``ConnectError``, as a refused connection).
- ``BEHIND``: forwarded from another thread, which keeps waiting for the server; the client
  times out at once (the server is still working on it). ``Faults.wait_behind()`` joins it.
- ``answer(status, headers)``: an answer made up here; the server sees nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import httpx

from ..realserver.conftest import ROOT, Server, free_port, wait_until_serving

API_KEY = "sk_test_client"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

PASS, LOSE, TIMEOUT, REFUSE, BEHIND = "pass", "lose", "timeout", "refuse", "behind"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def answer(status: int, **headers: str) -> Answer:
    return Answer(status, tuple((name.replace("_", "-"), value) for name, value in headers.items()))


def http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


Action = str | Answer


@dataclass
class Faults:
    """The fate of each attempt, in order (``PASS`` once the script runs out); what was sent."""

    script: list[Action] = field(default_factory=list)
    seen: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    behind: list[threading.Thread] = field(default_factory=list)
    behind_answers: list[httpx.Response] = field(default_factory=list)
    hook: Any = None  # called with each request before it goes anywhere

    def next(self, request: httpx.Request) -> Action:
        self.seen.append(request)
        if self.hook is not None:
            self.hook(request)
        return self.script.pop(0) if self.script else PASS

    @property
    def attempts(self) -> int:
        return len(self.seen)

    def keys(self) -> list[str | None]:
        return [request.headers.get("idempotency-key") for request in self.seen]

    def made_up(self, request: httpx.Request, fake: Answer) -> httpx.Response:
        return httpx.Response(
            fake.status, headers=list(fake.headers), content=fake.body, request=request
        )

    def send_behind(self, request: httpx.Request, body: bytes) -> None:
        """Forward ``request`` from a thread of its own, which waits for the answer."""

        def forward() -> None:
            with httpx.Client(timeout=60) as client:
                copy = client.build_request(
                    request.method, request.url, headers=request.headers, content=body
                )
                self.behind_answers.append(client.send(copy))

        thread = threading.Thread(target=forward, daemon=True)
        thread.start()
        self.behind.append(thread)

    def wait_behind(self) -> None:
        for thread in self.behind:
            thread.join(timeout=60)

    def before(self, request: httpx.Request, action: Action, body: bytes) -> httpx.Response | None:
        """What happens before the wire: a made-up answer, an error, or None (forward it)."""
        self.bodies.append(body)
        if isinstance(action, Answer):
            return self.made_up(request, action)
        if action == REFUSE:
            raise httpx.ConnectError("connection refused", request=request)
        if action == BEHIND:
            self.send_behind(request, body)
            raise httpx.ReadTimeout("timed out; the server is still at it", request=request)
        return None

    def lost(self, request: httpx.Request, action: Action) -> httpx.TransportError:
        """The error of an answer lost on its way back."""
        if action == LOSE:
            return httpx.ReadError("connection reset after the request was sent", request=request)
        return httpx.ReadTimeout("timed out waiting for the answer", request=request)


class FaultyTransport(httpx.BaseTransport):
    def __init__(self, faults: Faults, inner: httpx.BaseTransport | None = None) -> None:
        self.faults = faults
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        action = self.faults.next(request)
        made_up = self.faults.before(request, action, request.read())
        if made_up is not None:
            return made_up
        response = self.inner.handle_request(request)
        if action == PASS:
            return response
        response.read()
        response.close()
        raise self.faults.lost(request, action)

    def close(self) -> None:
        self.inner.close()


class AsyncFaultyTransport(httpx.AsyncBaseTransport):
    def __init__(self, faults: Faults, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.faults = faults
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        action = self.faults.next(request)
        made_up = self.faults.before(request, action, await request.aread())
        if made_up is not None:
            return made_up
        response = await self.inner.handle_async_request(request)
        if action == PASS:
            return response
        await response.aread()
        await response.aclose()
        raise self.faults.lost(request, action)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class FakeTime:
    """A monotonic clock that moves only when the client sleeps; every sleep is recorded.
    ``on_sleep`` runs at each sleep (to let something happen meanwhile)."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Any = None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Client(Protocol):
    faults: Faults
    time: FakeTime

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response: ...

    def stream_body(self, chunks: list[bytes]) -> Any: ...

    async def aclose(self) -> None: ...


@dataclass
class SyncClient:
    """The sync transport, behind the same awaitable interface as the async one."""

    http: httpx.Client
    faults: Faults
    time: FakeTime

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, url, **kwargs)

    def stream_body(self, chunks: list[bytes]) -> Iterator[bytes]:
        yield from chunks

    async def aclose(self) -> None:
        self.http.close()


@dataclass
class AsyncClient:
    http: httpx.AsyncClient
    faults: Faults
    time: FakeTime

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, url, **kwargs)

    async def stream_body(self, chunks: list[bytes]) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def aclose(self) -> None:
        await self.http.aclose()


@dataclass
class Service:
    """A payments service (``python -m oncely_payments``) on a SQLite file of its own."""

    server: Server
    database: Path

    @property
    def url(self) -> str:
        return self.server.url

    def payments(self, customer: str) -> list[dict[str, Any]]:
        """The ledger's payments of ``customer``, read from the database as an auditor would."""
        if not self.database.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.database, timeout=10)) as conn:
            conn.row_factory = sqlite3.Row
            try:
                rows = conn.execute(
                    "SELECT id, customer, amount, status FROM payments WHERE customer = ? "
                    "ORDER BY seq",
                    (customer,),
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
        return [dict(row) for row in rows]

    def wait_for_payment(self, customer: str, *, settled: bool, timeout: float = 30.0) -> None:
        """Until ``customer`` has a payment (``settled``: one no longer pending)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.payments(customer)
            if found and (not settled or found[0]["status"] != "pending"):
                return
            time.sleep(0.02)
        raise AssertionError(f"no {'settled ' if settled else ''}payment of {customer}")


@contextlib.contextmanager
def running_service(directory: Path, *, card_latency_ms: float = 0.0) -> Iterator[Service]:
    """A payments service for the ``with`` block, stopped after it."""
    started = start_service(directory, card_latency_ms=card_latency_ms)
    try:
        yield started
    finally:
        started.server.stop()


def start_service(directory: Path, *, card_latency_ms: float = 0.0) -> Service:
    """Start the reference payments service on a free port; return once it answers."""
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "payments.db"
    port = free_port()
    log_path = directory / f"payments-{port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oncely_payments",
            "--store",
            f"sqlite:{database}",
            "--port",
            str(port),
            "--card-latency-ms",
            repr(card_latency_ms),
            "--lease",
            "10",
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server("payments", proc, port, 1, log_path, log_file)
    wait_until_serving(server)
    return Service(server, database)


def new_customer() -> str:
    return f"cus_{uuid.uuid4().hex[:12]}"


def payment(customer: str, amount: int = 1000) -> dict[str, Any]:
    return {"amount": amount, "currency": "USD", "customer": customer}
