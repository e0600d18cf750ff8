"""What every surface decides around the flow, once: admit a request, capture, settle.

    options.resolve(method, path) ─► None: not protected, pass through
      └─► admit(): key header present / one / well formed, a tenant, a declared body within the
          limit ─► a ProblemError (400, 413) or Admitted (the storage key)
    the adapter reads the body (Admitted.check_size on the way) ─► Admitted.flow(body)
    the driver runs the flow; the app's answer goes into a Capture ─► Ran | AppFailed
    settle(outcome) ─► a whole answer to send (replay, problem, stored error), or the app's own
    answer to let out, and an error to raise after (the app's, or LeaseLost to abort)

Adapters only translate bytes: ASGI messages or a WSGI environ and iterable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._attempt import LeaseLost
from ._codec import StoredResponse
from ._config import Options, Request, Resolved
from ._errors import MalformedKey, MissingKey, MissingTenant, RequestTooLarge, problem_response
from ._fingerprint import fingerprint
from ._flow import AppFailed, Failed, Flow, Fresh, Outcome, PassThrough, Ran, Refuse, Replay, flow
from ._keys import Hashed, key_hash, parse_key, storage_key
from ._observe import Watch

__all__ = ["Admitted", "Answer", "Capture", "Settlement", "admit", "settle", "stored_answer"]

log = logging.getLogger("oncely")

Answer = tuple[int, list[tuple[str, str]], bytes]
"""A whole answer: status, headers (lower-case names), body."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """A protected request that may go on: its settings, its storage key, its body limit."""

    options: Options
    resolved: Resolved
    request: Request
    key: str

    def check_size(self, size: int) -> None:
        """Raise :class:`RequestTooLarge` once the body read so far is over the limit."""
        limit = self.options.max_request_body
        if size > limit:
            raise RequestTooLarge(
                f"The request body is larger than this API accepts ({limit} bytes).",
                extensions={"max_bytes": limit},
            )

    def flow(self, body: bytes) -> Flow:
        """The flow for this request with its whole ``body``."""
        request = self.request
        fp = fingerprint(
            request.method,
            request.path,
            request.query,
            request.headers.get("content-type"),
            body,
            self.resolved.ignore_fields,
        )
        return flow(
            self.key, fp, self.resolved.policy, header_allowlist=self.options.header_allowlist
        )


def admit(
    options: Options,
    resolved: Resolved,
    request: Request,
    keys: Sequence[bytes | str],
    watch: Watch | None = None,
) -> Admitted | None:
    """Admit a request its route protects; None when it runs unprotected (no key, not required).

    ``keys``: the values of every idempotency key header it carries. Raises the problem that
    answers a request which cannot go on. ``watch`` learns the storage key and the tenant.
    """
    if len(keys) > 1:
        raise MalformedKey(f"Send exactly one {options.header} header.")
    if not keys:
        if not resolved.required:
            return None
        raise MissingKey(
            f"{request.method} {request.path} requires an {options.header} header. Send a unique "
            "value (such as a UUID) and reuse it when you retry the same request."
        )
    key = parse_key(keys[0])
    tenant = options.tenant(request)
    if tenant is None:
        raise MissingTenant(
            "This request does not say whose it is (the tenant the idempotency key belongs "
            "to), so it cannot be deduplicated safely. Authenticate, or send the tenant "
            "header this API requires."
        )
    admitted = Admitted(options, resolved, request, storage_key(tenant, key, options.namespace))
    if watch is not None:
        watch.storage_key, watch.tenant = admitted.key, tenant
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:
        declared = -1
    admitted.check_size(declared)
    return admitted


class Capture:
    """The app's answer as it goes out: status, headers, and the body up to ``limit`` bytes."""

    __slots__ = ("chunks", "finished", "headers", "limit", "size", "started", "status", "too_large")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.started = False
        self.finished = False  # the whole answer is in (its last body part is held back)

    def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        self.start_lowered(status, [(k.lower(), v) for k, v in headers])

    def start_lowered(self, status: int, headers: list[tuple[str, str]]) -> None:
        """:meth:`start` with ``headers`` whose names are lower-case already."""
        self.started = True
        self.status = status
        self.headers = headers

    def add(self, chunk: bytes) -> None:
        if chunk and not self.too_large:
            self.size += len(chunk)
            if self.size > self.limit:
                self.too_large = True
                self.chunks.clear()
            else:
                self.chunks.append(chunk)

    def ran(self, *, completed: bool) -> Ran:
        """The captured answer, once it is finished. ``completed``: the app stored it itself."""
        return Ran(
            status=self.status,
            headers=tuple(self.headers),
            body=b"".join(self.chunks),
            too_large=self.too_large,
            completed=completed,
        )

    def result(self, error: BaseException | None, *, completed: bool) -> Ran | AppFailed:
        """What running the app came to, given the exception it raised (if any)."""
        if error is not None:
            whole = self.ran(completed=completed) if self.finished else None
            return AppFailed(error, self.started, response=whole)
        if not self.finished:
            return AppFailed(
                RuntimeError("the app returned without completing a response"), self.started
            )
        return self.ran(completed=completed)


def stored_answer(response: StoredResponse, *, replayed: bool) -> Answer:
    headers = [*response.headers, ("content-length", str(len(response.body)))]
    if replayed:
        headers.append(("idempotent-replayed", "true"))
    return response.status, headers, response.body


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the adapter does with an outcome: send ``answer`` (a whole answer of its own), or
    let the app's held answer out (``release_held``); then raise ``error`` if any."""

    answer: Answer | None = None
    release_held: bool = False
    error: BaseException | None = None


_RELEASE_HELD = Settlement(release_held=True)


def settle(outcome: Outcome, key: str, *, started: bool) -> Settlement:
    """What to do with ``outcome`` of the request under storage ``key``. ``started``: the app's
    answer has begun to go out to the client."""
    if isinstance(outcome, Replay):
        return Settlement(stored_answer(outcome.response, replayed=True))
    if isinstance(outcome, Refuse):
        return Settlement(problem_response(outcome.error))
    if isinstance(outcome, Fresh):
        if outcome.superseded:
            # Another claim owns the key and its answer is the one kept. Cut this response
            # short, so the client retries and gets that answer instead of a second,
            # different "original".
            return Settlement(
                error=LeaseLost(
                    f"key {key_hash(key)} was taken over while it ran; its answer was not "
                    "stored and the response is aborted"
                )
            )
        if outcome.lost_lease:
            log.warning("oncely: key %s was taken over while it ran; not stored", Hashed(key))
        if outcome.store_error is not None:
            log.error(
                "oncely: could not store the outcome of key %s: %s",
                Hashed(key),
                outcome.store_error,
            )
        return _RELEASE_HELD
    if isinstance(outcome, PassThrough):
        return _RELEASE_HELD
    assert isinstance(outcome, Failed)
    if outcome.store_error is not None:
        log.error(
            "oncely: could not record the failure of key %s: %s", Hashed(key), outcome.store_error
        )
    if started:  # the app's whole answer, if it sent one: let the client have it
        return Settlement(release_held=True, error=outcome.error)
    if outcome.response is not None:
        return Settlement(stored_answer(outcome.response, replayed=False), error=outcome.error)
    return Settlement(error=outcome.error)
