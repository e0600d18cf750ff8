"""atheris: the ASGI middleware on raw ASGI messages (any header bytes, chunked, truncated and
empty bodies, odd methods). Never a 5xx, never a second run of a POST, every error a documented
problem+json."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from collections.abc import MutableMapping
from typing import Any

import atheris

with atheris.instrument_imports():
    from oncely import tenant_from_header
    from oncely._errors import ProblemError
    from oncely.asgi import IdempotencyMiddleware
    from oncely.stores.memory import AsyncMemoryStore


def _documented() -> dict[str, int]:
    found: dict[str, int] = {}
    todo = list(ProblemError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_"):
            found["https://oncely.dev/problems/" + cls.slug] = cls.status
    return found


DOCUMENTED = _documented()
NAMES = [b"idempotency-key", b"x-tenant", b"content-type", b"content-length", b"x-other"]
METHODS = ["POST", "PATCH", "GET", "PUT", "DELETE", "FOO", ""]
runs: collections.Counter[tuple[bytes, ...]] = collections.Counter()


async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    runs[tuple(v for k, v in scope["headers"] if k in (b"idempotency-key", b"x-tenant"))] += 1
    await send({"type": "http.response.start", "status": 201, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def exchange(mw: Any, scope: dict[str, Any], incoming: list[Any]) -> list[Any]:
    queue = list(incoming)
    sent: list[Any] = []

    async def receive() -> Any:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    return sent


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = METHODS[fdp.ConsumeIntInRange(0, len(METHODS) - 1)]
    headers = [
        (
            NAMES[fdp.ConsumeIntInRange(0, len(NAMES) - 1)],
            fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80)),
        )
        for _ in range(fdp.ConsumeIntInRange(0, 6))
    ]
    chunks = [
        fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)) for _ in range(fdp.ConsumeIntInRange(0, 4))
    ]
    truncated = fdp.ConsumeBool()
    path = fdp.ConsumeBytes(30).decode("latin-1")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/" + path,
        "raw_path": ("/" + path).encode("latin-1"),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
    }
    incoming: list[Any] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]
    if truncated:
        incoming[-1]["more_body"] = True
        incoming.append({"type": "http.disconnect"})
    runs.clear()
    mw = IdempotencyMiddleware(
        app, tenant=tenant_from_header("X-Tenant"), store=AsyncMemoryStore(), max_request_body=100
    )
    for _ in range(2):
        sent = asyncio.run(exchange(mw, dict(scope), [dict(m) for m in incoming]))
        if not sent:
            assert truncated
            continue
        start = sent[0]
        assert start["status"] < 500, sent
        names = dict(start["headers"])
        if b"x-app" in names or b"idempotent-replayed" in names:
            continue  # the app's answer, or its replay
        assert names[b"content-type"] == b"application/problem+json", sent
        problem = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert DOCUMENTED[problem["type"]] == problem["status"] == start["status"], problem
    if method in ("POST", "PATCH"):
        assert all(count <= 1 for count in runs.values()), runs


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
