"""The sans-IO engine: what to do with one request that carries an idempotency key.

Theory of operation
-------------------
``flow()`` is a generator. It never does I/O and never reads the clock: it *yields operations*
(claim the key, run the app, complete, release, sleep) and receives their results. A driver
(the ASGI middleware, later WSGI and a decorator) performs each operation and sends the result
back in; a failed operation is thrown back in as its exception. The flow returns the outcome.

    Claim ──► Claimed ──► Run ──► Ran ──► keep? ── yes ─► Complete ─► Fresh
      │                    │               └──── no ──► Release ──► Fresh
      │                    └─► AppFailed ─────────────► Release ──► Failed
      └─► Existing ─► other fingerprint ─────────────────────────► Refuse 422
                   ├─► in flight ─► (wait: Sleep, Claim again) ───► Refuse 409
                   ├─► completed, in its replay window ─────────────► Replay
                   └─► completed, expired or not replayable ────────► Refuse 410
      └─► store unavailable ─► fail closed: Refuse 503 (fail_open: PassThrough)

What is kept (the client always sees the original answer): 2xx, 3xx and 4xx outcomes are stored
and replayed; 5xx, 408, 429 and exceptions release the key so a retry runs again, unless
``replay_errors`` keeps them too (at most once, as Stripe's API v1 does). 307 and 308 are never
kept: they ask for the same request elsewhere, which must then be free to run under the key.
An exception raised after the app sent a whole answer (a framework's error page, a failing
background task) is judged by that answer's status, as if the app had returned it.

The driver alone renews the lease while the app runs and its outcome is written (a background
task), because the flow cannot do two things at once; a lost lease shows up as ``Complete``
returning False. The driver also retries a write after the app while the lease holds (a store
blip must not cost a second run); one that has not landed within ``store_timeout`` of the app's
answer comes back as :class:`Deferred`: the client is answered and the write goes on.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

from ._codec import Claimed, Existing, State, StoredResponse
from ._errors import KeyInFlight, KeyReused, ProblemError, ResponseNotReplayable, StoreUnavailable

__all__ = [
    "DEFAULT_HEADER_ALLOWLIST",
    "AppFailed",
    "Claim",
    "Complete",
    "Deferred",
    "Failed",
    "Flow",
    "Fresh",
    "Op",
    "Outcome",
    "PassThrough",
    "Policy",
    "Ran",
    "Refuse",
    "Release",
    "Replay",
    "Run",
    "Sleep",
    "flow",
    "is_kept",
]

# Response headers that are part of the answer and safe to keep; never Set-Cookie or Date.
DEFAULT_HEADER_ALLOWLIST = frozenset(
    {
        "content-type",
        "location",
        "content-location",
        "etag",
        "last-modified",
        "link",
        # The body is kept as the app encoded it, so its encoding must come back with it.
        "content-encoding",
        "content-language",
    }
)


@dataclass(frozen=True, slots=True)
class Policy:
    """What one route asks for. Seconds throughout."""

    lease: float = 60.0
    ttl: float = 24 * 3600.0
    tombstone_ttl: float = 7 * 24 * 3600.0
    wait: float = 0.0
    poll_interval: float = 0.1
    retry_after: float = 1.0
    replay_errors: bool = False
    fail_open: bool = False


# Operations the flow yields ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    key: str
    fingerprint: str
    lease: float


@dataclass(frozen=True, slots=True)
class Run:
    """Run the app once; the driver answers with :class:`Ran` or :class:`AppFailed`."""

    claim: Claimed | None


@dataclass(frozen=True, slots=True)
class Complete:
    claim: Claimed
    response: StoredResponse
    ttl: float
    tombstone_ttl: float


@dataclass(frozen=True, slots=True)
class Release:
    claim: Claimed


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Op = Claim | Run | Complete | Release | Sleep

# Results of Run ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ran:
    """The app answered. ``body`` is everything it sent unless ``too_large``."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    too_large: bool = False
    # The app stored this response itself, in the transaction that committed its effect.
    completed: bool = False


@dataclass(frozen=True, slots=True)
class AppFailed:
    """The app raised. ``started``: a response had already gone out to the client.

    ``response``: the whole answer the app had sent before it raised (an error page from a
    framework's error handler, or a success followed by a failing background task), if any.
    """

    error: BaseException
    started: bool
    response: Ran | None = None


@dataclass(frozen=True, slots=True)
class Deferred:
    """The result of a write after the app that has not landed yet: the driver answers the
    client now and goes on writing (see ``_drive``)."""


# Outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    response: StoredResponse


@dataclass(frozen=True, slots=True)
class Refuse:
    error: ProblemError


@dataclass(frozen=True, slots=True)
class Fresh:
    """The app ran and answered; ``stored`` tells whether the answer is kept for repeats."""

    stored: bool
    lost_lease: bool = False
    store_error: BaseException | None = None
    # Another claim took the key over and its answer is the one kept: the driver should not
    # hand this one out as if it were the result (it aborts the response instead).
    superseded: bool = False
    # The write of the outcome goes on after the answer (the store is slow or out).
    deferred: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """The app raised. ``response``: the answer kept for repeats, if any; the driver sends it
    only when no response has started."""

    error: BaseException
    response: StoredResponse | None = None
    store_error: BaseException | None = field(default=None)


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Run the app unprotected (fail_open with the store down)."""

    reason: BaseException


Outcome = Replay | Refuse | Fresh | Failed | PassThrough
Flow = Generator[Op, object, Outcome]

INTERNAL_ERROR_BODY = (
    b'{"type":"about:blank","title":"Internal Server Error","status":500,'
    b'"detail":"The server failed while handling this request."}'
)


# 307 and 308 ask the client to send the same request elsewhere (RFC 9110 15.4.8, 15.4.9): the
# operation has not happened, and the redirected request (same key) must be free to run.
REDIRECTS_TO_REPEAT = frozenset({307, 308})


def is_kept(status: int, *, replay_errors: bool) -> bool:
    """Whether an answer with ``status`` is stored and replayed (see the module docstring)."""
    if status in REDIRECTS_TO_REPEAT:
        return False
    if replay_errors:
        return True
    return 100 <= status < 500 and status not in (408, 429)


def refusal_for(existing: Existing, fingerprint: str, policy: Policy) -> Replay | Refuse | None:
    """Replay or refusal for a key somebody else holds; None while it is still in flight."""
    record = existing.record
    if record.fingerprint != fingerprint:
        return Refuse(
            KeyReused(
                "This Idempotency-Key was already used with a different request (method, path, "
                "query or body). Send a new key for a new request, or repeat the original "
                "request exactly."
            )
        )
    if record.state is State.IN_FLIGHT:
        return None
    response = record.response
    if response is None or existing.now >= record.expires_at:
        return Refuse(
            ResponseNotReplayable(
                "The request with this Idempotency-Key completed earlier, and its stored "
                "response has expired. It will not run again; look up the result, or send a "
                "new key for a new request.",
                extensions={"reason": "expired"},
            )
        )
    if not response.replayable:
        extensions: dict[str, object] = {"reason": "too_large", "original_status": response.status}
        location = _header(response.headers, "location")
        if location is not None:
            extensions["location"] = location
        return Refuse(
            ResponseNotReplayable(
                "The request with this Idempotency-Key completed, but its response was too "
                "large to keep, so it cannot be replayed. It will not run again; look up the "
                "result (see original_status and location).",
                extensions=extensions,
            )
        )
    return Replay(response)


def _header(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _in_flight(policy: Policy) -> Refuse:
    return Refuse(
        KeyInFlight(
            "A request with this Idempotency-Key is still being processed. Retry the same "
            "request after the Retry-After delay to get its result.",
            retry_after=policy.retry_after,
        )
    )


def _unavailable(policy: Policy) -> Refuse:
    return Refuse(
        StoreUnavailable(
            "The idempotency store cannot be reached, so the request was not processed. Retry "
            "the same request with the same Idempotency-Key after the Retry-After delay.",
            retry_after=policy.retry_after,
        )
    )


def _to_store(ran: Ran, allowlist: frozenset[str]) -> StoredResponse:
    headers = tuple((k, v) for k, v in ran.headers if k in allowlist)
    if ran.too_large:
        return StoredResponse(status=ran.status, headers=headers, body=b"", replayable=False)
    return StoredResponse(status=ran.status, headers=headers, body=ran.body)


def flow(
    key: str,
    fingerprint: str,
    policy: Policy,
    *,
    header_allowlist: frozenset[str] = DEFAULT_HEADER_ALLOWLIST,
) -> Flow:
    """Decide the fate of one keyed request; see the module docstring."""
    polls = math.ceil(policy.wait / policy.poll_interval) if policy.wait > 0 else 0
    while True:
        try:
            claimed = yield Claim(key, fingerprint, policy.lease)
        except StoreUnavailable as exc:
            if policy.fail_open:
                result = yield Run(None)
                if isinstance(result, AppFailed):
                    return Failed(result.error)
                return PassThrough(exc)
            return _unavailable(policy)
        if isinstance(claimed, Claimed):
            break
        assert isinstance(claimed, Existing)
        decided = refusal_for(claimed, fingerprint, policy)
        if decided is not None:
            return decided
        if polls <= 0:
            return _in_flight(policy)
        polls -= 1
        yield Sleep(policy.poll_interval)

    result = yield Run(claimed)

    if isinstance(result, AppFailed):
        response = None
        if result.response is not None:
            # The client has a whole answer: it is the outcome, kept or not by its status.
            if is_kept(result.response.status, replay_errors=policy.replay_errors):
                response = _to_store(result.response, header_allowlist)
        elif policy.replay_errors:
            response = StoredResponse(
                status=500,
                headers=(("content-type", "application/problem+json"),),
                body=INTERNAL_ERROR_BODY,
            )
        try:
            if response is not None:
                yield Complete(claimed, response, policy.ttl, policy.tombstone_ttl)
            else:
                yield Release(claimed)
        except StoreUnavailable as exc:
            return Failed(result.error, response, store_error=exc)
        return Failed(result.error, response)

    assert isinstance(result, Ran)
    if result.completed:
        return Fresh(stored=True)  # the app committed its response with its effect
    try:
        if is_kept(result.status, replay_errors=policy.replay_errors):
            done = yield Complete(
                claimed, _to_store(result, header_allowlist), policy.ttl, policy.tombstone_ttl
            )
            if isinstance(done, Deferred):
                return Fresh(stored=False, deferred=True)
            return Fresh(stored=bool(done), lost_lease=not done, superseded=not done)
        released = yield Release(claimed)
        if isinstance(released, Deferred):
            return Fresh(stored=False, deferred=True)
        return Fresh(stored=False, lost_lease=not released)
    except StoreUnavailable as exc:
        return Fresh(stored=False, store_error=exc)
