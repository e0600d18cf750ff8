"""The client's decisions, once: a generator both transports drive.

Theory of operation. ``flow(settings, call)`` is a generator that yields operations (``Send``
the request, ``Read`` or ``Close`` a response, ``Sleep``, ``Begin`` or ``Finish`` a journal
entry) and receives their results, or their exceptions, back; it never does I/O and never
reads a clock or a random source of its own (both come in ``Settings``). The sync transport
performs each operation directly, the async one awaits it; neither decides anything.

One request, start to end::

    keying ── caller's key (validated) | journal entry (same operation, same key) | new key
      │        the digest check (same key, other request: KeyReusedError) happens here
      ▼
    attempt n ──> answer or error ──> judge: final? retryable? (keyed or idempotent only)
      ▲                                  │
      │   sleep max(backoff, Retry-After)│ attempts left? Retry-After acceptable? (RetryLater)
      └──────────────────────────────────┘ deadline not passed by the sleep? budget token?
      stop: report in response.extensions["oncely"]; journal finished on a final answer

Nothing is sent twice without a key unless it is idempotent or was proven never to leave
(``error_kind`` is ``"not sent"``), and nothing stops silently: every stop has a reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import httpx

from .._errors import PROBLEM_BASE, ConfigurationError
from .._fingerprint import fingerprint
from ._errors import BodyNotReplayable, KeyExpiredError, KeyReusedError, RetryLater
from ._journal import Journal, JournalEntry, MemoryJournal
from ._keys import caller_key, derive_key, format_key, key_hash, new_key
from ._policy import (
    RetryBudget,
    RetryPolicy,
    TooLong,
    clip_timeouts,
    error_kind,
    next_step,
    parse_retry_after,
    unknown_options,
)

__all__ = [
    "AttemptReport",
    "Begin",
    "Call",
    "Close",
    "Finish",
    "Op",
    "Read",
    "Report",
    "RetryEvent",
    "Send",
    "Settings",
    "Sleep",
    "flow",
    "request_options",
]

log = logging.getLogger("oncely.client")

REUSED = PROBLEM_BASE + "idempotency-key-reused"
NOT_REPLAYABLE = PROBLEM_BASE + "response-not-replayable"
# Why retrying stopped; "retry_later" only in the report a RetryLater carries.
Stopped = Literal["success", "not_retryable", "deadline", "budget", "attempts", "retry_later"]


class AttemptReport(TypedDict):
    """One attempt: its answer's status or its error's type, why it was (not) retried, and how
    long the client slept after it."""

    status: int | None
    error: str | None
    reason: str
    sleep: float


class Report(TypedDict):
    """``response.extensions["oncely"]``: the key sent (None without one), the operation, the
    number of attempts, each attempt, whether the final answer was a replay, why it stopped."""

    key: str | None
    operation: str | None
    attempts: int
    history: list[AttemptReport]
    replayed: bool
    stopped: Stopped


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """What ``on_retry`` receives before each retry's sleep."""

    method: str
    url: httpx.URL
    key: str | None
    operation: str | None
    attempt: int  # the attempt that failed, from 1
    status: int | None
    error: BaseException | None
    reason: str
    sleep: float


# Operations the drivers perform.
@dataclass(frozen=True, slots=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True, slots=True)
class Read:
    response: httpx.Response


@dataclass(frozen=True, slots=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Begin:
    journal: Journal
    operation: str
    key: str
    digest: str | None


@dataclass(frozen=True, slots=True)
class Finish:
    journal: Journal
    operation: str
    status: int


Op = Send | Read | Close | Sleep | Begin | Finish


@dataclass(frozen=True, slots=True)
class Settings:
    """A transport's options, checked once when it is built."""

    policy: RetryPolicy
    methods: frozenset[str]
    header: str
    key_format: str
    max_body: int
    server_retention: float
    budget: RetryBudget | None
    journal: Journal
    derive_secret: bytes | None
    on_retry: Callable[[RetryEvent], object] | None
    clock: Callable[[], float]
    random: Callable[[], float]
    wall_clock: Callable[[], float]
    # Caller-set keys seen by this transport and the digest of their request.
    seen: MemoryJournal = field(default_factory=MemoryJournal)


@dataclass(frozen=True, slots=True)
class Options:
    """``request.extensions["oncely"]``."""

    operation: str | None = None
    key: bool | None = None
    policy: RetryPolicy | None = None


_NO_OPTIONS = Options()
_OPTION_NAMES = ("operation", "key", "policy")


def request_options(request: httpx.Request) -> Options:
    """The request's ``extensions["oncely"]``, checked: a bad one fails before sending."""
    given = request.extensions.get("oncely")
    if given is None:
        return _NO_OPTIONS
    if not isinstance(given, dict):
        raise ConfigurationError(
            f'extensions["oncely"] must be a dict such as {{"operation": "order-42/pay"}}, '
            f"not {type(given).__name__}"
        )
    unknown = {name: value for name, value in given.items() if name not in _OPTION_NAMES}
    if unknown:
        unknown_options('extensions["oncely"]', unknown, _OPTION_NAMES)
    operation = given.get("operation")
    if operation is not None and (not isinstance(operation, str) or not operation):
        raise ConfigurationError(
            f'extensions["oncely"] operation must be a non-empty string, not {operation!r}'
        )
    key = given.get("key")
    if key is not None and not isinstance(key, bool):
        raise ConfigurationError(
            f'extensions["oncely"] key must be True (add a key), False (send none) or absent; '
            f"set a key of your own in the Idempotency-Key header, not {key!r}"
        )
    if key is False and operation is not None:
        raise ConfigurationError(
            'extensions["oncely"]: an operation is kept by its key; key=False contradicts it'
        )
    policy = given.get("policy")
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise ConfigurationError(
            f'extensions["oncely"] policy must be a RetryPolicy, not {type(policy).__name__}'
        )
    return Options(operation, key, policy)


@dataclass(slots=True)
class Call:
    """One request through the transport: the request (its key header is set in place), its
    options, and its body when it can be sent again (None: a stream over the buffer limit)."""

    request: httpx.Request
    options: Options
    body: bytes | None
    _digest: str | None = field(default=None, init=False)

    def digest(self) -> str | None:
        """The request's fingerprint, as the server computes it (None for an unread stream)."""
        if self._digest is None and self.body is not None:
            url = self.request.url
            self._digest = fingerprint(
                self.request.method,
                url.path,
                url.query.decode("ascii", "replace"),
                self.request.headers.get("content-type"),
                self.body,
            )
        return self._digest


def flow(s: Settings, call: Call) -> Generator[Op, Any, httpx.Response]:
    """Send ``call`` until it has a final answer, or a reason to stop; see the module doc."""
    request = call.request
    policy = call.options.policy or s.policy
    key, operation = yield from _keying(s, call)
    report: Report = {
        "key": key,
        "operation": operation,
        "attempts": 0,
        "history": [],
        "replayed": False,
        "stopped": "success",
    }
    may_resend = key is not None or request.method in policy.idempotent_methods
    origin = _origin(request.url)
    timeout = request.extensions.get("timeout")
    start = s.clock()
    while True:
        if policy.deadline is not None:
            request.extensions["timeout"] = clip_timeouts(
                timeout, policy.deadline - (s.clock() - start)
            )
        report["attempts"] += 1
        response: httpx.Response | None = None
        error: Exception | None = None
        problem: dict[str, Any] | None = None
        try:
            response = yield Send(request)
        except Exception as exc:
            error = exc
        if response is not None:
            replayed, final, retryable, reason, problem = yield from _judge(
                policy, response, may_resend
            )
            report["replayed"] = replayed
            if problem is not None and problem.get("type") == REUSED:
                _record(report, response.status_code, None, "key reused", 0.0)
                raise KeyReusedError(
                    f"{request.method} {_safe_url(request.url)}: the server refused key "
                    f"{key_hash(key)}: it was used before with another request "
                    f"({problem.get('detail', 'no detail')})",
                    key=key or "",
                    operation=operation,
                    attempts=report["attempts"],
                    problem=problem,
                    report=report,
                )
        else:
            assert error is not None
            kind = error_kind(error)
            final, replayed = False, False
            retryable = kind == "not sent" or (kind == "maybe sent" and may_resend)
            reason = _error_reason(kind, may_resend)
        status = None if response is None else response.status_code
        attempt = _record(report, status, _name(error), reason, 0.0)

        wait = None
        if response is not None and retryable:
            wait = parse_retry_after(
                response.headers.get("retry-after"), response.headers.get("date"), s.wall_clock()
            )
        step: Stopped | TooLong | float = next_step(
            policy,
            attempts=report["attempts"],
            retryable=retryable,
            success=response is not None and response.is_success,
            replayable=call.body is not None,
            status=status,
            wait=wait,
            elapsed=s.clock() - start,
            jitter=s.random(),
        )
        if isinstance(step, float) and s.budget is not None and not s.budget.withdraw(origin):
            step = "budget"
            log.warning(
                "retry budget for %s is exhausted: %s %s not retried (key %s)",
                origin,
                request.method,
                _safe_url(request.url),
                key_hash(key),
            )
        if isinstance(step, TooLong):
            assert response is not None
            if problem is None:
                problem = yield from _problem(response)
            yield Close(response)
            report["stopped"] = "retry_later"
            raise _retry_later(request, report, step.wait, policy, response, problem)
        if isinstance(step, float):
            attempt["sleep"] = step
            _announce(s, request, report, status, error, reason, step)
            if response is not None:
                yield Close(response)
            if step > 0:
                yield Sleep(step)
            continue

        stop: Stopped = step
        unreplayable = retryable and stop == "not_retryable"
        if unreplayable:
            attempt["reason"] = "streamed body over max_body: not replayable"
        report["stopped"] = stop
        if response is None:
            assert error is not None
            raise _final_error(request, report, error, unreplayable)
        if final and s.budget is not None:
            s.budget.succeed(origin)  # the server answered for good: it is healthy
        if operation is not None and final:
            yield Finish(s.journal, operation, response.status_code)
        response.extensions["oncely"] = report
        return response


def _keying(s: Settings, call: Call) -> Generator[Op, Any, tuple[str | None, str | None]]:
    """The request's key and operation; sets the key header unless the caller set one."""
    request, options = call.request, call.options
    operation = options.operation
    values = request.headers.get_list(s.header)
    if values:
        if options.key is False:
            raise ConfigurationError(
                f'the request sets its own {s.header} header and extensions["oncely"] '
                "key=False: choose one"
            )
        key = caller_key(values, s.header)
        if operation is None:
            seen = s.seen.begin(key, key, call.digest())
            _same_request(seen, call, key, None)
            return key, None
    elif options.key is False or not (
        options.key or operation is not None or request.method in s.methods
    ):
        return None, None
    elif operation is not None and s.derive_secret is not None:
        key = derive_key(s.derive_secret, operation)
    else:
        key = new_key()
    if operation is not None:
        entry: JournalEntry = yield Begin(s.journal, operation, key, call.digest())
        if values and entry.key != key:
            raise ConfigurationError(
                f"operation {operation!r} was begun with another key than the {s.header} "
                "header this request sets; drop one of them"
            )
        _same_request(entry, call, entry.key, operation)
        age = s.journal.now() - entry.created
        if age > s.server_retention:
            raise KeyExpiredError(
                f"operation {operation!r} was begun {age:.0f} s ago, longer than the server "
                f"keeps keys (server_retention={s.server_retention:g} s): its key "
                f"{key_hash(entry.key)} may be forgotten and a resend would run again. Check "
                "the server for its outcome, then forget() the entry or use a new name.",
                key=entry.key,
                operation=operation,
                age=age,
                retention=s.server_retention,
            )
        key = entry.key
    if not values:
        request.headers[s.header] = format_key(key, s.key_format)
    return key, operation


def _same_request(entry: JournalEntry, call: Call, key: str, operation: str | None) -> None:
    digest = call.digest() if entry.digest is not None else None
    if digest is None or digest == entry.digest:
        return
    what = f"operation {operation!r}" if operation is not None else f"key {key_hash(key)}"
    raise KeyReusedError(
        f"{what} was sent before with another request ({call.request.method} "
        f"{_safe_url(call.request.url)}, another body); the server would refuse it. A new "
        "request needs a new key" + (" (a new operation name)." if operation else "."),
        key=key,
        operation=operation,
    )


def _judge(
    policy: RetryPolicy, response: httpx.Response, may_resend: bool
) -> Generator[Op, Any, tuple[bool, bool, bool, str, dict[str, Any] | None]]:
    """(replayed, final, retryable, reason, problem) of one answer."""
    status = response.status_code
    replayed = response.headers.get("idempotent-replayed", "").strip().lower() in ("true", "?1")
    problem = None
    if status in (409, 422):
        problem = yield from _problem(response)
    if replayed:
        return True, True, False, "replayed", problem
    if status not in policy.statuses:
        return False, True, False, "success" if response.is_success else "not retryable", problem
    if problem is not None and problem.get("type") == NOT_REPLAYABLE:
        return False, True, False, "completed, not replayable", problem
    if not may_resend:
        return False, False, False, f"status {status}, no key: not resent", problem
    reason = "in flight" if status == 409 else f"status {status}"
    return False, False, True, reason, problem


def _problem(response: httpx.Response) -> Generator[Op, Any, dict[str, Any] | None]:
    """The RFC 9457 problem in ``response``, if it is one (its body is read for that)."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    yield Read(response)
    try:
        problem = json.loads(response.content)
    except ValueError:
        return None
    return problem if isinstance(problem, dict) else None


def _error_reason(kind: str | None, may_resend: bool) -> str:
    if kind == "not sent":
        return "not sent"
    if kind is None:
        return "not retryable"
    return "lost after sending" if may_resend else "may have been sent, no key: not resent"


def _record(
    report: Report, status: int | None, error: str | None, reason: str, sleep: float
) -> AttemptReport:
    attempt: AttemptReport = {"status": status, "error": error, "reason": reason, "sleep": sleep}
    report["history"].append(attempt)
    return attempt


def _name(error: BaseException | None) -> str | None:
    return None if error is None else type(error).__name__


def _announce(
    s: Settings,
    request: httpx.Request,
    report: Report,
    status: int | None,
    error: BaseException | None,
    reason: str,
    delay: float,
) -> None:
    # One line per retry: no body, no query, no credentials, and the key only as a hash.
    log.info(
        "retry %d of %s %s in %.3f s after %s (key %s)",
        report["attempts"],
        request.method,
        _safe_url(request.url),
        delay,
        reason if error is None else f"{type(error).__name__}: {reason}",
        key_hash(report["key"]),
    )
    if s.on_retry is not None:
        s.on_retry(
            RetryEvent(
                request.method,
                request.url,
                report["key"],
                report["operation"],
                report["attempts"],
                status,
                error,
                reason,
                delay,
            )
        )


_STOPS = {
    "success": "answered",
    "not_retryable": "not retryable",
    "deadline": "the next retry would pass the deadline",
    "budget": "the retry budget for this origin is exhausted",
    "attempts": "no attempts left",
    "retry_later": "the server asked for a longer wait",
}


def _summary(request: httpx.Request, report: Report) -> str:
    stopped = report["stopped"]
    return (
        f"oncely: {request.method} {_safe_url(request.url)}, key {key_hash(report['key'])}, "
        f"{report['attempts']} attempt(s), stopped: {stopped} ({_STOPS[stopped]}); "
        f"last: {report['history'][-1]['reason']}"
    )


def _final_error(
    request: httpx.Request, report: Report, error: Exception, unreplayable: bool
) -> Exception:
    if unreplayable:
        failed = BodyNotReplayable(
            f"{request.method} {_safe_url(request.url)} failed with {type(error).__name__} "
            "after its streamed body was sent; the body was over max_body, so it cannot be "
            "sent again. Pass the body as bytes, or raise max_body, to let it be retried.",
            key=report["key"],
            attempts=report["attempts"],
        )
        failed.__cause__ = error
        return failed
    error.add_note(_summary(request, report))
    return error


def _retry_later(
    request: httpx.Request,
    report: Report,
    wait: float,
    policy: RetryPolicy,
    response: httpx.Response,
    problem: dict[str, Any] | None,
) -> RetryLater:
    limit = (
        f"retry_after_max={policy.retry_after_max:g} s"
        if wait > policy.retry_after_max
        else f"the time left before the deadline ({policy.deadline:g} s in all)"
    )
    return RetryLater(
        wait,
        report["key"],
        attempts=report["attempts"],
        status=response.status_code,
        problem=problem,
        report=report,
        message=f"{request.method} {_safe_url(request.url)}: the server answered "
        f"{response.status_code} with Retry-After {wait:g} s, longer than {limit}; send the "
        f"same request (key {key_hash(report['key'])}) again after that.",
    )


def _origin(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


def _safe_url(url: httpx.URL) -> str:
    """The URL without credentials or query: what logs and messages may show."""
    return _origin(url) + url.path
