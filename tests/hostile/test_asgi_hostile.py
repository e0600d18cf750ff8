"""The ASGI middleware as a raw ASGI app: hostile headers, keys and bodies never give a 5xx,
never a second run, and every error is a documented problem+json."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import MutableMapping
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from oncely import tenant_from_header
from oncely._errors import ProblemError
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import AsyncMemoryStore

Message = MutableMapping[str, Any]


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


async def _exchange(
    mw: IdempotencyMiddleware,
    method: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    truncated: bool,
) -> list[Message]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/pay",
        "raw_path": b"/pay",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
    }
    incoming: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]
    if truncated:
        incoming[-1]["more_body"] = True
        incoming.append({"type": "http.disconnect"})
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    return sent


header_bytes = st.binary(max_size=300)
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [b"idempotency-key", b"x-tenant", b"content-type", b"content-length", b"x-other"]
        ),
        header_bytes,
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["POST", "PATCH", "GET", "PUT", "FOO"]),
    HEADERS,
    st.lists(st.binary(max_size=64), max_size=4),
    st.booleans(),
)
@example("POST", [(b"idempotency-key", b"!"), (b"x-tenant", b"\x00")], [], False)  # a replay
def test_hostile_requests(
    method: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes], truncated: bool
) -> None:
    runs: collections.Counter[tuple[bytes, ...]] = collections.Counter()

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        runs[tuple(v for k, v in scope["headers"] if k in (b"idempotency-key", b"x-tenant"))] += 1
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = IdempotencyMiddleware(
        app, tenant=tenant_from_header("X-Tenant"), store=AsyncMemoryStore(), max_request_body=100
    )
    for _ in range(2):
        sent = asyncio.run(_exchange(mw, method, headers, chunks, truncated))
        if not sent:
            assert truncated
            continue
        start = sent[0]
        assert start["status"] < 500
        names = dict(start["headers"])
        if b"x-app" in names:
            continue
        if names.get(b"idempotent-replayed") == b"true":
            # A replay of the app's answer (x-app is not on the header allowlist).
            assert start["status"] == 201
            assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ok"
            continue
        assert names[b"content-type"] == b"application/problem+json"
        problem = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert DOCUMENTED[problem["type"]] == problem["status"] == start["status"]
    if method in ("POST", "PATCH"):
        assert all(count <= 1 for count in runs.values()), runs
