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

The flow never reads the clock: it yields :class:`Clock` and the driver answers with its
monotonic time. The lease is the flow's (:class:`Lease`, created when the claim is sent and
handed to the driver on :class:`Run`): the driver renews it from a timer or a thread while the
app runs and the outcome is written, because the flow cannot do two things at once, and marks it
lost when another claim owns the key. A write after the app (complete, release, a checkpoint)
that fails is tried again by the flow itself while the lease holds (a store blip must not cost a
second run):

    claim ─ lease ──────────────────────────────────────────────────────────────────► lease ends
      │ app runs │ write ✗ │ Sleep │ write ✗ │ Sleep …  (renewals keep trying too) │ write ✓
                 │◄── store_timeout ──►│ Detach: the client gets its answer here at the latest;
                                         the driver goes on with the flow in the background
                                         (bounded in number, awaited on shutdown) until the
                                         write lands, or the lease is lost or about to end

A renewal that gets through extends the time left. Only when the lease is lost (another claim
owns the key) or about to end is the outcome abandoned, and logged as such.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator
from dataclasses import dataclass, field

from ._codec import Claimed, Existing, State, StoredResponse
from ._errors import KeyInFlight, KeyReused, ProblemError, ResponseNotReplayable, StoreUnavailable
from ._keys import Hashed

__all__ = [
    "CLOCK",
    "DEFAULT_HEADER_ALLOWLIST",
    "AppFailed",
    "Claim",
    "Clock",
    "Complete",
    "Detach",
    "Failed",
    "Flow",
    "Fresh",
    "Lease",
    "Op",
    "Outcome",
    "PassThrough",
    "Policy",
    "Ran",
    "RecordPhase",
    "Refuse",
    "Release",
    "Replay",
    "Run",
    "Sleep",
    "flow",
    "is_kept",
    "write_while_owned",
]

log = logging.getLogger("oncely")

# Pauses between tries of a write after the app ran: doubling from the first, at most the last.
WRITE_RETRY_FIRST = 0.05
WRITE_RETRY_CAP = 1.0
# Seconds of lease below which a write is given up: it could not land in time to matter.
LEASE_END_MARGIN = 0.02

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
    # Seconds a store operation may take, and the longest the client waits for a write
    # after the app before it is answered and the write goes on in the background.
    store_timeout: float = 5.0


class Lease:
    """What this process knows of its claim's lease, on the driver's monotonic clock.

    The store's lease began when the store ran the claim, after it was sent: so the key is
    surely ours until ``sent + duration`` here, whatever the two clocks read. A renewal that
    gets through moves that on (``renewed``); one that finds another owner sets ``lost``.
    """

    __slots__ = ("duration", "lost", "until")

    def __init__(self, duration: float, sent: float) -> None:
        self.duration = duration
        self.until = sent + duration
        self.lost = False

    def renewed(self, sent: float) -> None:
        self.until = max(self.until, sent + self.duration)

    def left(self, now: float) -> float:
        return self.until - now

    def __repr__(self) -> str:
        return f"Lease({self.duration:g} s, until={self.until:g}, lost={self.lost})"


# Operations the flow yields ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    key: str
    fingerprint: str
    lease: float


@dataclass(frozen=True, slots=True)
class Clock:
    """Read the driver's monotonic clock: the result is seconds, as a float."""


#: The one Clock the flow yields (it carries nothing, so one will do).
CLOCK = Clock()


@dataclass(frozen=True, slots=True)
class Run:
    """Run the app once; the driver answers with :class:`Ran` or :class:`AppFailed`.

    With a claim comes its ``lease``, which the driver renews while the app runs and the
    outcome is written (and marks lost when another claim owns the key).
    """

    claim: Claimed | None
    lease: Lease | None = None


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
class RecordPhase:
    claim: Claimed
    name: str
    data: str


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Detach:
    """Answer the client now with ``outcome``, and go on driving this flow in the background.

    The result is True when the driver did (the flow's own outcome is then only logged), False
    when it cannot (too many writes in the background already): the client waits for its own.
    """

    outcome: Outcome
    key: str


Op = Clock | Claim | Run | Complete | Release | RecordPhase | Sleep | Detach

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


def _clock() -> Generator[Op, object, float]:
    """The driver's monotonic time."""
    now = yield CLOCK
    assert isinstance(now, float)
    return now


def write_while_owned(
    op: Complete | Release | RecordPhase,
    lease: Lease,
    *,
    what: str,
    answer_by: float | None = None,
    answer: Outcome | None = None,
) -> Generator[Op, object, object]:
    """Yield ``op`` until it lands, with backoff, while the lease holds; its result.

    False once the lease is lost (the write is fenced: it would change nothing); the last
    :class:`StoreUnavailable` when the lease is about to end. With ``answer``, past
    ``answer_by`` the client is answered with it (:class:`Detach`) while the tries go on.
    """
    try:
        return (yield op)
    except StoreUnavailable as exc:
        return (
            yield from _write_after_failure(
                op, exc, lease, what=what, answer_by=answer_by, answer=answer
            )
        )


def _write_after_failure(
    op: Complete | Release | RecordPhase,
    error: StoreUnavailable,
    lease: Lease,
    *,
    what: str,
    answer_by: float | None,
    answer: Outcome | None,
) -> Generator[Op, object, object]:
    """:func:`write_while_owned` once the first try of ``op`` failed with ``error``."""
    key = op.claim.key
    shown = Hashed(key)  # logs show a keyed hash, never the storage key
    delay, tries = WRITE_RETRY_FIRST, 1
    first_failure: float | None = None
    detached = answer is None or answer_by is None
    while True:
        now = yield from _clock()
        if first_failure is None:
            first_failure = now
        if lease.lost:
            log.error("oncely: abandoned the %s of key %s: its lease was lost", what, shown)
            return False
        # Renewals that get through extend the lease, but a store that answers renewals and
        # keeps refusing this write (a value it will never take) must not hold the key for
        # ever: the tries last one lease at most from the first failure.
        left = min(lease.left(now), first_failure + lease.duration - now)
        if left <= LEASE_END_MARGIN:
            log.error(
                "oncely: abandoned the %s of key %s after %d tries in %.1f s: the lease ends "
                "(or a lease's worth of tries is spent) and the store still fails (%s); a "
                "retry after the lease will run the request again",
                what,
                shown,
                tries,
                now - first_failure,
                error,
            )
            raise error
        pause = min(delay, left / 2)  # a renewal may extend the lease meanwhile
        if not detached:
            assert answer is not None
            assert answer_by is not None
            if now >= answer_by:
                detached = True
                yield Detach(answer, key)
            else:
                pause = min(pause, answer_by - now)
        log.warning(
            "oncely: the %s of key %s failed, retrying in %.2g s (%.1f s of lease left): %s",
            what,
            shown,
            pause,
            left,
            error,
        )
        yield Sleep(pause)
        delay = min(delay * 2, WRITE_RETRY_CAP)
        tries += 1
        try:
            result = yield op
        except StoreUnavailable as exc:
            error = exc
            continue
        now = yield from _clock()
        log.warning(
            "oncely: wrote the %s of key %s after %d tries in %.1f s",
            what,
            shown,
            tries,
            now - first_failure,
        )
        return result


# The outcomes of a request whose write landed at the first try: frozen, so shared.
_STORED = Fresh(stored=True)
_RELEASED = Fresh(stored=False)
_SUPERSEDED = Fresh(stored=False, lost_lease=True, superseded=True)
_RELEASE_LOST = Fresh(stored=False, lost_lease=True)
_DEFERRED = Fresh(stored=False, deferred=True)


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
        sent = yield CLOCK
        assert isinstance(sent, float)
        try:
            claimed = yield Claim(key, fingerprint, policy.lease)
        except StoreUnavailable as exc:
            log.warning("oncely: could not claim key %s: %s", Hashed(key), exc)
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

    lease = Lease(policy.lease, sent)
    result = yield Run(claimed, lease)
    answered = yield CLOCK
    assert isinstance(answered, float)
    answer_by = answered + policy.store_timeout

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
        failed = Failed(result.error, response)
        try:
            yield from write_while_owned(
                Release(claimed)
                if response is None
                else Complete(claimed, response, policy.ttl, policy.tombstone_ttl),
                lease,
                what="release" if response is None else "completion",
                answer_by=answer_by,
                answer=failed,
            )
        except StoreUnavailable as exc:
            return Failed(result.error, response, store_error=exc)
        return failed

    assert isinstance(result, Ran)
    if result.completed:
        return _STORED  # the app committed its response with its effect
    kept = is_kept(result.status, replay_errors=policy.replay_errors)
    write = (
        Complete(claimed, _to_store(result, header_allowlist), policy.ttl, policy.tombstone_ttl)
        if kept
        else Release(claimed)
    )
    try:
        try:
            done = yield write  # the first try inline; the tries after a failure below
        except StoreUnavailable as exc:
            done = yield from _write_after_failure(
                write,
                exc,
                lease,
                what="completion" if kept else "release",
                answer_by=answer_by,
                answer=_DEFERRED,
            )
    except StoreUnavailable as exc:
        return Fresh(stored=False, store_error=exc)
    if kept:
        return _STORED if done else _SUPERSEDED
    return _RELEASED if done else _RELEASE_LOST
