"""A small HTTP/1.1 client for the real-server tests, written by hand over asyncio streams.

It is cheap enough that a thousand clients at once measure the server, not the client:

- :func:`pay` sends one request over a new connection (``Connection: close``), as a client
  that retries from scratch would.
- :class:`KeepAlive` holds one connection open and sends requests one after another over it,
  as a load balancer or a connection-pooling client would.

Also the checks every real-server test shares: the problem answers oncely gives (409 in flight,
503 store unavailable), and a burst of identical requests that must run the handler once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from .conftest import Server, Servers

TENANT = "tenant-acme"
PAYLOAD = {"amount": 1250, "currency": "EUR", "note": "real server"}
BODY = json.dumps(PAYLOAD).encode()
REQUEST_TIMEOUT = 60.0
MAX_TRIES = 10  # a client that is told 409 waits Retry-After and tries again, this many times


class ConnectionLost(Exception):
    """The server closed the connection without a complete answer (it was killed)."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    latency: float

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"

    def json(self) -> Any:
        return json.loads(self.body)


def _head(raw: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "transfer-encoding" not in headers, headers
    return int(status_line.split(" ", 2)[1]), headers


def _parse(raw: bytes, latency: float) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionLost(f"no complete answer: {raw!r}")
    status, headers = _head(head)
    if len(body) != int(headers["content-length"]):
        raise ConnectionLost(f"a truncated answer: {raw!r}")
    return Answer(status, headers, body, latency)


def _request(port: int, key: str, body: bytes, *, close: bool) -> bytes:
    return (
        "POST /payments HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Idempotency-Key: {key}\r\n"
        f"X-Tenant-Id: {TENANT}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode() + body


async def pay(server: Server, key: str, body: bytes = BODY) -> Answer:
    """POST the payment with ``key`` over a new connection."""
    started = time.perf_counter()
    request = _request(server.port, key, body, close=True)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(request)
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except OSError as exc:
        raise ConnectionLost(repr(exc)) from exc
    return _parse(raw, time.perf_counter() - started)


class KeepAlive:
    """One persistent connection to one server; requests go one after another over it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def pay(self, key: str, body: bytes = BODY) -> Answer:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                if self._streams is None:
                    self._streams = await asyncio.open_connection("127.0.0.1", self.server.port)
                reader, writer = self._streams
                writer.write(_request(self.server.port, key, body, close=False))
                await writer.drain()
                status, headers = _head((await reader.readuntil(b"\r\n\r\n"))[:-4])
                payload = await reader.readexactly(int(headers["content-length"]))
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise ConnectionLost(repr(exc)) from exc
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, headers, payload, time.perf_counter() - started)

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def wait_for(condition: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.02)


async def sleep_past(moment: float, margin: float = 0.25) -> None:
    """Sleep until ``margin`` seconds after ``moment`` on the host clock (the store's clock)."""
    await asyncio.sleep(max(0.0, moment - time.time()) + margin)


def assert_retry_after(answer: Answer) -> None:
    retry_after = answer.headers.get("retry-after")
    assert retry_after is not None, answer
    assert int(retry_after) >= 1


def assert_in_flight_problem(answer: Answer) -> None:
    assert answer.status == 409
    assert_retry_after(answer)
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"].endswith("/idempotency-key-in-flight"), answer.body


def assert_unavailable_problem(answer: Answer) -> None:
    assert answer.status == 503, answer
    assert_retry_after(answer)
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"].endswith("/idempotency-store-unavailable"), answer.body
    assert problem["status"] == 503


# A burst of identical requests -----------------------------------------------------------------


async def burst(servers: Server | Sequence[Server], key: str, n: int) -> list[list[Answer]]:
    """``n`` clients send the same request at once, client ``i`` to server ``i`` modulo their
    number; each retries (to the same server) after Retry-After on 409."""
    targets = [servers] if isinstance(servers, Server) else list(servers)
    go = asyncio.Event()

    async def one(server: Server) -> list[Answer]:
        await go.wait()
        answers: list[Answer] = []
        for _ in range(MAX_TRIES):
            answer = await pay(server, key)
            answers.append(answer)
            retry_after = answer.headers.get("retry-after")
            if answer.status != 409 or retry_after is None:
                break
            await asyncio.sleep(float(retry_after))
        return answers

    tasks = [asyncio.create_task(one(targets[i % len(targets)])) for i in range(n)]
    await asyncio.sleep(0.05)  # every task is waiting on the event
    go.set()
    return await asyncio.gather(*tasks)


def check_burst(servers: Servers, key: str, histories: list[list[Answer]], label: str) -> None:
    answers = [answer for history in histories for answer in history]
    statuses = Counter(answer.status for answer in answers)
    failures = [(a.status, a.body) for a in answers if a.status >= 500]
    assert not failures, (statuses, failures[:5])
    assert set(statuses) <= {201, 409}, statuses
    for answer in answers:
        if answer.status == 409:
            assert_in_flight_problem(answer)

    originals = [a for a in answers if a.status == 201 and not a.replayed]
    assert len(originals) == 1, f"{len(originals)} original answers: the handler ran twice"
    original = originals[0]
    replays = [a for a in answers if a.status == 201 and a.replayed]
    for replay in replays:
        assert replay.body == original.body
        assert replay.headers["location"] == original.headers["location"]
        assert replay.headers["content-type"] == original.headers["content-type"]
    # Every client ends with the answer: the original, or its replay.
    assert all(history[-1].status == 201 for history in histories), Counter(
        len(h) for h in histories
    )

    runs = servers.runs(key)
    assert len(runs) == 1, runs
    assert [end["id"] for end in servers.ends(key)] == [runs[0]["id"]]
    assert original.json()["id"] == runs[0]["id"]

    first = [history[0] for history in histories]
    latencies = sorted(answer.latency for answer in first)
    first_kinds = Counter(
        "original" if a.status == 201 and not a.replayed else "replay" if a.replayed else "409"
        for a in first
    )
    print(
        f"{label}: {len(histories)} clients, {len(answers)} answers {dict(statuses)}; "
        f"first answers {dict(first_kinds)}; later answers: "
        f"{sum(a.replayed for h in histories for a in h[1:])} replays; "
        f"first-answer latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )
