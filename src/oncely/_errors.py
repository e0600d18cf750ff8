"""Errors, and their rendering as RFC 9457 problem details.

Every error a client can see knows its HTTP answer and renders itself as
``application/problem+json`` with a stable ``type`` URI, a ``title``, and a
``detail`` that tells the client what to do. Nothing secret goes into a problem.

    OncelyError
    ├── ConfigurationError            (set up wrongly: bad URL or option; never an HTTP answer)
    └── ProblemError                  (an HTTP answer for the client)
        ├── MissingKey                400
        ├── MalformedKey              400
        ├── MissingTenant             400
        ├── IncompleteBody            400  (a WSGI body shorter than its Content-Length)
        ├── KeyInFlight               409  + Retry-After
        ├── ResponseNotReplayable     410  (the operation completed; its response is not kept:
        │                                   permanent, so retrying clients stop)
        ├── RequestTooLarge           413
        ├── KeyReused                 422  (same key, another request)
        └── StoreUnavailable          503  + Retry-After
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

__all__ = [
    "ConfigurationError",
    "IncompleteBody",
    "KeyInFlight",
    "KeyReused",
    "MalformedKey",
    "MissingKey",
    "MissingTenant",
    "OncelyError",
    "ProblemError",
    "RequestTooLarge",
    "ResponseNotReplayable",
    "StoreUnavailable",
    "problem_response",
]

PROBLEM_BASE = "https://oncely.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class OncelyError(Exception):
    """The root of every error oncely raises."""


class ConfigurationError(OncelyError, ValueError):
    """oncely was set up wrongly (an unknown store URL, a missing extra, a bad option)."""


class ProblemError(OncelyError):
    """An error with an HTTP answer: status, RFC 9457 type, title and detail."""

    status: int = 400
    slug: str = "error"
    title: str = "Idempotency error"

    def __init__(self, detail: str, *, extensions: Mapping[str, object] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions: dict[str, object] = dict(extensions or {})

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def headers(self) -> list[tuple[str, str]]:
        """Headers beyond Content-Type that go with the answer (Retry-After, ...)."""
        return []

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        body.update(self.extensions)
        return body


class MissingKey(ProblemError):
    status = 400
    slug = "missing-idempotency-key"
    title = "Idempotency key required"


class MalformedKey(ProblemError):
    status = 400
    slug = "malformed-idempotency-key"
    title = "Malformed idempotency key"


class MissingTenant(ProblemError):
    status = 400
    slug = "missing-idempotency-scope"
    title = "Cannot tell whose key this is"


class _RetryLater(ProblemError):
    def __init__(
        self,
        detail: str,
        *,
        retry_after: float = 1.0,
        extensions: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(detail, extensions=extensions)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> list[tuple[str, str]]:
        return [("retry-after", str(self.retry_after))]


class KeyInFlight(_RetryLater):
    status = 409
    slug = "idempotency-key-in-flight"
    title = "A request with this idempotency key is in progress"


class ResponseNotReplayable(ProblemError):
    # 410, not 409: 409 is "still in flight", which clients retry; this will never change.
    status = 410
    slug = "response-not-replayable"
    title = "The operation completed, but its response cannot be replayed"


class RequestTooLarge(ProblemError):
    status = 413
    slug = "request-too-large"
    title = "Request body too large"


class IncompleteBody(ProblemError):
    status = 400
    slug = "incomplete-request-body"
    title = "The request body is not what its length says"


class KeyReused(ProblemError):
    status = 422
    slug = "idempotency-key-reused"
    title = "Idempotency key reused with a different request"


class StoreUnavailable(_RetryLater):
    status = 503
    slug = "idempotency-store-unavailable"
    title = "Idempotency store unavailable"


def problem_response(error: ProblemError) -> tuple[int, list[tuple[str, str]], bytes]:
    """Render ``error`` as (status, headers, body) of an RFC 9457 problem+json answer."""
    body = json.dumps(error.to_dict(), separators=(",", ":"), ensure_ascii=True).encode()
    headers = [
        ("content-type", PROBLEM_CONTENT_TYPE),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        *error.headers(),
    ]
    return error.status, headers, body
