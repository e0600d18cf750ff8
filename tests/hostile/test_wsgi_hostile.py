"""The WSGI middleware with hand-made environs: known gaps, kept as strict xfails until fixed."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

from oncely import tenant_from_header
from oncely.stores.memory import MemoryStore
from oncely.wsgi import IdempotencyMiddleware


def _call(content_length: str, data: bytes) -> tuple[list[str], list[bytes]]:
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

    list(mw(environ, start_response))
    return statuses, runs


@pytest.mark.xfail(reason="a non-numeric CONTENT_LENGTH raises ValueError (a 500)", strict=True)
def test_junk_content_length_is_a_400() -> None:
    statuses, runs = _call("abc", b"x")
    assert statuses[0].startswith("400")
    assert runs == []


@pytest.mark.xfail(reason="a body shorter than CONTENT_LENGTH still runs the app", strict=True)
def test_truncated_body_does_not_run_the_app() -> None:
    statuses, runs = _call("10", b"abc")
    assert runs == []
    assert statuses[0].startswith("400")
