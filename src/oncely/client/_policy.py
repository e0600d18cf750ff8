"""When to retry, and how long to wait: pure functions over numbers, statuses and headers.

Nothing here does I/O or reads a clock; the flow (``_flow.py``) passes the time in.

- Which failures are worth another attempt (``RetryPolicy.statuses``, :func:`error_kind`).
- Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**n))`` for the n-th
  retry (0-based), base 0.25 s, or 1 s when the server said it is overloaded (429, 503).
- ``Retry-After`` (RFC 9110 section 10.2.3) in delay-seconds or as an HTTP-date, the date read
  against the response's own ``Date`` header, so the two clocks never have to agree.
- The total deadline, which clips each attempt's timeouts to the time left.
- A retry budget per origin (a token bucket), so an outage does not multiply the load.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Never

import httpx

from .._errors import ConfigurationError

__all__ = [
    "DEFAULT_STATUSES",
    "IDEMPOTENT_METHODS",
    "SHARED_BUDGET",
    "RetryBudget",
    "RetryPolicy",
    "TooLong",
    "backoff",
    "clip_timeouts",
    "error_kind",
    "next_step",
    "parse_retry_after",
    "unknown_options",
]

# RFC 9110 9.2.2: PUT and DELETE are idempotent too; repeating them needs no key.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# 409: the first attempt with this key still runs (oncely's idempotency-key-in-flight).
DEFAULT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
THROTTLED = frozenset({429, 503})


class _UnknownOption(ConfigurationError, TypeError):
    """An option nobody knows: a ConfigurationError, and the TypeError Python would raise."""


def unknown_options(where: str, given: Mapping[str, object], known: Iterable[str]) -> Never:
    names = ", ".join(sorted(given))
    raise _UnknownOption(
        f"{where}: unknown option {names}; the options are {', '.join(sorted(known))}"
    )


def _number(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigurationError(f"RetryPolicy {name} must be a number of seconds, not {value!r}")
    if value < minimum or (strict and value == minimum):
        bound = f"more than {minimum:g}" if strict else f"{minimum:g} or more"
        raise ConfigurationError(f"RetryPolicy {name} must be {bound}, not {value!r}")
    return float(value)


@dataclass(frozen=True, init=False)
class RetryPolicy:
    """How often and how long to retry; every option is keyword-only.

    ``attempts`` counts the first one (3: at most two retries). ``deadline`` (seconds, or None
    for none) bounds all attempts and sleeps together. ``retry_after_max``: a longer
    ``Retry-After`` raises :class:`RetryLater` at once instead of sleeping.
    """

    attempts: int = 3
    base: float = 0.25
    throttled_base: float = 1.0
    cap: float = 10.0
    deadline: float | None = 30.0
    retry_after_max: float = 60.0
    statuses: frozenset[int] = DEFAULT_STATUSES
    idempotent_methods: frozenset[str] = IDEMPOTENT_METHODS

    def __init__(
        self,
        *,
        attempts: int = 3,
        base: float = 0.25,
        throttled_base: float = 1.0,
        cap: float = 10.0,
        deadline: float | None = 30.0,
        retry_after_max: float = 60.0,
        statuses: Iterable[int] = DEFAULT_STATUSES,
        idempotent_methods: Iterable[str] = IDEMPOTENT_METHODS,
        **unknown: Never,
    ) -> None:
        if unknown:
            unknown_options("RetryPolicy", unknown, _POLICY_OPTIONS)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy attempts must be a whole number, 1 or more, not {attempts!r}"
            )
        set_ = object.__setattr__
        set_(self, "attempts", attempts)
        set_(self, "base", _number("base", base))
        set_(self, "throttled_base", _number("throttled_base", throttled_base))
        set_(self, "cap", _number("cap", cap))
        set_(
            self,
            "deadline",
            None if deadline is None else _number("deadline", deadline, strict=True),
        )
        set_(self, "retry_after_max", _number("retry_after_max", retry_after_max))
        codes = frozenset(statuses)
        for code in codes:
            if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
                raise ConfigurationError(
                    f"RetryPolicy statuses must be HTTP status codes, not {code!r}"
                )
        set_(self, "statuses", codes)
        set_(
            self,
            "idempotent_methods",
            methods_of("RetryPolicy idempotent_methods", idempotent_methods),
        )


_POLICY_OPTIONS = (
    "attempts",
    "base",
    "throttled_base",
    "cap",
    "deadline",
    "retry_after_max",
    "statuses",
    "idempotent_methods",
)


def methods_of(name: str, methods: Iterable[str]) -> frozenset[str]:
    if isinstance(methods, str):
        raise ConfigurationError(f"{name} must be a collection of methods, such as ('POST',)")
    out = set()
    for method in methods:
        if not isinstance(method, str) or not method.isascii() or not method.isalpha():
            raise ConfigurationError(f"{name}: {method!r} is not an HTTP method")
        out.add(method.upper())
    return frozenset(out)


def backoff(policy: RetryPolicy, retry: int, status: int | None, random: float) -> float:
    """Full jitter: ``random * min(cap, base * 2**retry)``, ``random`` in [0, 1)."""
    base = policy.throttled_base if status in THROTTLED else policy.base
    ceiling = min(policy.cap, base * 2.0 ** min(retry, 64))
    return random * ceiling


@dataclass(frozen=True, slots=True)
class TooLong:
    """The server asks for a wait the client will not sleep (over ``retry_after_max``, or past
    the deadline): the caller is told to come back later instead."""

    wait: float


def next_step(
    policy: RetryPolicy,
    *,
    attempts: int,
    retryable: bool,
    success: bool,
    replayable: bool,
    status: int | None,
    wait: float | None,
    elapsed: float,
    jitter: float,
) -> Literal["success", "not_retryable", "attempts", "deadline"] | TooLong | float:
    """After attempt number ``attempts``: why to stop (``"success"``, ``"not_retryable"``,
    ``"attempts"``, ``"deadline"``), a :class:`TooLong` wait, or the seconds to sleep before the
    next attempt: the larger of ``Retry-After`` (``wait``) and the backoff.

    ``replayable`` is False for a streamed body over the buffer limit (sent once only).
    """
    if not retryable:
        return "success" if success else "not_retryable"
    if attempts >= policy.attempts:
        return "attempts"
    if not replayable:
        return "not_retryable"
    deadline = policy.deadline
    if wait is not None and (
        wait > policy.retry_after_max or (deadline is not None and elapsed + wait > deadline)
    ):
        return TooLong(wait)
    delay = max(wait or 0.0, backoff(policy, attempts - 1, status, jitter))
    if deadline is not None and elapsed + delay >= deadline:
        return "deadline"  # never start a sleep that ends past the deadline
    return delay


def parse_retry_after(value: str | None, date: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None if it says nothing usable.

    An HTTP-date is read against the response's ``Date`` (the server's own clock), and only
    without one against ``now`` (this host's wall clock).
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    when = _http_date(text)
    if when is None:
        return None
    server_now = _http_date(date) if date is not None else None
    return max(0.0, when - (now if server_now is None else server_now))


def _http_date(text: str) -> float | None:
    try:
        parsed = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp()


def clip_timeouts(timeout: Mapping[str, Any] | None, left: float | None) -> dict[str, Any] | None:
    """httpx's per-request timeouts, none longer than the time ``left`` before the deadline."""
    if left is None:
        return None if timeout is None else dict(timeout)
    left = max(left, 0.0)
    names = ("connect", "read", "write", "pool")
    source = timeout or dict.fromkeys(names)
    return {
        name: left if value is None else min(float(value), left) for name, value in source.items()
    }


# Errors that prove the request never left: no connection was made (DNS, refused, connect
# timeout) or none was free in the pool. Any request may be retried after them.
_NOT_SENT: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# Errors after the request may have reached the server: only a keyed or idempotent request
# may be sent again.
_MAYBE_SENT: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


def error_kind(exc: BaseException) -> str | None:
    """``"not sent"``, ``"maybe sent"``, or None for errors that no retry can fix."""
    if isinstance(exc, _NOT_SENT):
        return "not sent"
    if isinstance(exc, _MAYBE_SENT):
        return "maybe sent"
    return None


@dataclass
class RetryBudget:
    """A token bucket per origin: each success adds ``deposit``, each retry costs ``cost``,
    at most ``cap`` tokens; no retry below ``cost``. Every bucket starts full.

    One instance (the default) is shared by every transport in the process, so a whole outage
    costs at most ``cap`` retries plus ``deposit`` per success, however many clients there are.
    """

    deposit: float = 0.1
    cost: float = 1.0
    cap: float = 10.0
    _tokens: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("deposit", "cost", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"RetryBudget {name} must be 0 or more, not {value!r}")

    def tokens(self, origin: str) -> float:
        """The tokens ``origin`` has left."""
        with self._lock:
            return self._tokens.get(origin, self.cap)

    def withdraw(self, origin: str) -> bool:
        """Pay for one retry; False (and nothing paid) when the bucket holds too little."""
        with self._lock:
            tokens = self._tokens.get(origin, self.cap)
            if tokens < self.cost:
                return False
            self._tokens[origin] = round(tokens - self.cost, 9)
            return True

    def succeed(self, origin: str) -> None:
        """Credit one success."""
        with self._lock:
            tokens = self._tokens.get(origin, self.cap)
            if tokens < self.cap:
                # Rounded: ten deposits of 0.1 are one token, not 0.9999999999999999.
                self._tokens[origin] = min(self.cap, round(tokens + self.deposit, 9))


SHARED_BUDGET = RetryBudget()
