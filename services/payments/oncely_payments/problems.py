"""The service's errors as RFC 9457 ``application/problem+json``, like oncely's own.

Every problem has a stable ``type`` URI, a ``title``, the ``status`` and a ``detail`` that tells
the client what to do. Validation problems (422) list every field at fault in ``errors``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_TYPE",
    "ApiProblem",
    "encode",
    "http_exception_handler",
    "invalid",
    "problem_handler",
    "validation_handler",
]

PROBLEM_BASE = "https://oncely.dev/problems/payments/"
PROBLEM_TYPE = "application/problem+json"


def encode(value: object) -> bytes:
    """Compact JSON: the exact bytes the service answers with (and oncely stores)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class ApiProblem(Exception):
    """An answer other than success; raise it from a handler or a unit of work."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        extensions: Mapping[str, object] | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.extensions = dict(extensions or {})
        self.headers = tuple(headers)

    def body(self) -> bytes:
        return encode(
            {
                "type": PROBLEM_BASE + self.slug,
                "title": self.title,
                "status": self.status,
                "detail": self.detail,
                **self.extensions,
            }
        )

    def response(self) -> Response:
        headers = {"content-type": PROBLEM_TYPE, **dict(self.headers)}
        return Response(self.body(), self.status, headers=headers)


def invalid(errors: Sequence[Mapping[str, str]]) -> ApiProblem:
    """422 listing every field at fault: ``[{"field", "in", "message"}, ...]``."""
    fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
    return ApiProblem(
        422,
        "validation-error",
        "The request is not valid",
        f"Correct these fields and send the request again: {fields}.",
        extensions={"errors": [dict(e) for e in errors]},
    )


def _field_error(error: Mapping[str, Any]) -> dict[str, str]:
    loc = [str(part) for part in error.get("loc", ())]
    where = loc[0] if loc else "body"
    path = loc[1:]
    if error.get("type") == "json_invalid":
        path = []
    field = ".".join(path) if path else where
    return {"field": field, "in": where, "message": str(error.get("msg", "invalid"))}


async def validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return invalid([_field_error(e) for e in exc.errors()]).response()


async def problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    return exc.response()


_HTTP_SLUGS = {404: "not-found", 405: "method-not-allowed"}


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    slug = _HTTP_SLUGS.get(exc.status_code, "http-error")
    detail = exc.detail if isinstance(exc.detail, str) else "The request failed."
    headers = tuple((exc.headers or {}).items())
    return ApiProblem(exc.status_code, slug, detail, detail, headers=headers).response()
