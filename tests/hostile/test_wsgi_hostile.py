"""The WSGI middleware with hand-made environs: a junk or overstated CONTENT_LENGTH is a 400."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from oncely import tenant_from_header
from oncely.stores.memory import MemoryStore
from oncely.wsgi import IdempotencyMiddleware


def _call(content_length: str, data: bytes) -> tuple[list[str], list[bytes], bytes]:
    runs: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        runs.append(environ["wsgi.input"].read())
        start_response("201 Created", [])
        return [b"ok"]

    mw = IdempotencyMiddleware(app, tenant=tenant_from_header("X-T"), store=MemoryStore())
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/p",
        "CONTENT_LENGTH": content_length,
        "HTTP_IDEMPOTENCY_KEY": "k",
        "HTTP_X_T": "t",
        "wsgi.input": io.BytesIO(data),
    }
    statuses: list[str] = []

    def start_response(
        status: str, headers: object, exc_info: object = None
    ) -> Callable[..., object]:
        statuses.append(status)
        return runs.append

    body = b"".join(mw(environ, start_response))
    return statuses, runs, body


def test_junk_content_length_is_a_400() -> None:
    statuses, runs, body = _call("abc", b"x")
    assert statuses[0].startswith("400")
    assert runs == []
    assert json.loads(body)["type"].endswith("/incomplete-request-body")


def test_truncated_body_does_not_run_the_app() -> None:
    statuses, runs, body = _call("10", b"abc")
    assert runs == []
    assert statuses[0].startswith("400")
    problem = json.loads(body)
    assert problem["type"].endswith("/incomplete-request-body")
    assert (problem["received_bytes"], problem["declared_bytes"]) == (3, 10)
