"""What the client raises, beyond httpx's own errors.

    OncelyError
    ├── ConfigurationError          a bad option, request extension or caller-set key
    ├── KeyReusedError              the key was used for another request (local check, or 422)
    ├── KeyExpiredError             a journal entry older than the server keeps keys
    ├── RetryLater                  the server asks for a wait longer than the client will sleep
    └── BodyNotReplayable           a streamed body over the buffer limit, needed again

A transport error that ends the retries (a refused connection, a timeout) is httpx's own
exception, re-raised with a note that says how many attempts were made and why they stopped
(``attempts``, ``deadline``, ``budget``, ``not_retryable``), so ``except httpx.ConnectError``
keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from .._errors import OncelyError

__all__ = ["BodyNotReplayable", "KeyExpiredError", "KeyReusedError", "RetryLater"]


class KeyReusedError(OncelyError):
    """The same key with another request: refused before sending, or by the server (422
    ``idempotency-key-reused``, its problem in ``problem``)."""

    def __init__(
        self,
        message: str,
        *,
        key: str,
        operation: str | None = None,
        attempts: int = 0,
        problem: Mapping[str, Any] | None = None,
        report: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.operation = operation
        self.attempts = attempts
        self.problem = None if problem is None else dict(problem)
        self.report = report


class KeyExpiredError(OncelyError):
    """The journal's entry for this operation is older than the server keeps keys
    (``server_retention``): a resend might run it again, so nothing is sent."""

    def __init__(
        self, message: str, *, key: str, operation: str, age: float, retention: float
    ) -> None:
        super().__init__(message)
        self.key = key
        self.operation = operation
        self.age = age
        self.retention = retention


class RetryLater(OncelyError):
    """The server said ``Retry-After: delay``, longer than ``retry_after_max`` or than the time
    left before the deadline. Send the same request (the same ``key``) after ``delay`` s."""

    def __init__(
        self,
        delay: float,
        key: str | None,
        *,
        attempts: int = 0,
        status: int | None = None,
        problem: Mapping[str, Any] | None = None,
        report: Mapping[str, Any] | None = None,
        message: str | None = None,
    ) -> None:
        super().__init__(message or f"retry after {delay:g} s")
        self.delay = delay
        self.key = key
        self.attempts = attempts
        self.status = status
        self.problem = None if problem is None else dict(problem)
        self.report = report


class BodyNotReplayable(OncelyError, httpx.StreamError):
    """The request failed after its streamed body was sent; the body was over the buffer
    limit (``max_body``), so it cannot be sent again (what httpx would call StreamConsumed)."""

    def __init__(self, message: str, *, key: str | None, attempts: int) -> None:
        super().__init__(message)
        self.key = key
        self.attempts = attempts
