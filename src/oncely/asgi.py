"""Pure ASGI middleware: bytes in, the sans-IO flow decides, bytes out.

    app = IdempotencyMiddleware(
        app, store="sqlite:oncely.db", scope=scope_from_header("X-Tenant-Id")
    )

Per request: match the route, parse the key, read the body once (it is fingerprinted and handed
to the app unchanged), then drive the flow. The app's response streams to the client as it is
produced while a copy is captured; only its final body message is held back until the response
is stored, so a client that has the whole answer can always have it again.
Non-HTTP scopes (lifespan, websocket) pass straight through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._attempt import Attempt, LeaseLost
from ._attempt import _current as _current_attempt
from ._codec import Claimed, StoredResponse
from ._config import DEFAULT_METHODS, Request, Route, Scope
from ._drive import BackgroundWrites, Lease, adrive
from ._errors import (
    ConfigurationError,
    MalformedKey,
    MissingKey,
    MissingScope,
    ProblemError,
    RequestTooLarge,
    problem_response,
)
from ._fingerprint import fingerprint
from ._flow import (
    DEFAULT_HEADER_ALLOWLIST,
    AppFailed,
    Fresh,
    PassThrough,
    Policy,
    Ran,
    Refuse,
    Replay,
    flow,
)
from ._keys import parse_key, storage_key
from .stores import AsyncStore, open_async_store

__all__ = ["IdempotencyMiddleware"]

log = logging.getLogger("oncely")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

MiB = 1024 * 1024
# Extensions that would let the app send its body other than as bytes we can capture.
_HIDDEN_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopy", "http.response.trailers")


class _Resolved:
    __slots__ = ("ignore_fields", "policy", "required")

    def __init__(self, policy: Policy, required: bool, ignore_fields: tuple[str, ...]) -> None:
        self.policy, self.required, self.ignore_fields = policy, required, ignore_fields


class IdempotencyMiddleware:
    """Makes every keyed POST and PATCH (by default) take effect once.

    ``scope`` (required) tells tenants apart: ``scope_from_header(name)``,
    ``scope_from_principal()``, ``single_tenant``, or any callable over :class:`oncely.Request`.
    ``store``: a URL (``"sqlite:oncely.db"``, ``"memory:"``, ``"postgresql://..."``,
    ``"redis://..."``) or a store object. See the README for every option.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        scope: Scope,
        store: str | AsyncStore = "sqlite:oncely.db",
        methods: Iterable[str] = DEFAULT_METHODS,
        routes: Iterable[Route] = (),
        header: str = "Idempotency-Key",
        required: bool = True,
        ttl: float = 24 * 3600.0,
        tombstone_ttl: float = 7 * 24 * 3600.0,
        lease: float = 60.0,
        wait: float = 0.0,
        replay_errors: bool = False,
        fail_open: bool = False,
        ignore_fields: Iterable[str] = (),
        max_request_body: int = 10 * MiB,
        max_response_body: int = 1 * MiB,
        store_timeout: float = 5.0,
        retry_after: float = 1.0,
        header_allowlist: Iterable[str] = DEFAULT_HEADER_ALLOWLIST,
        namespace: str = "",
    ) -> None:
        if not callable(scope):
            raise ConfigurationError(
                "scope must be a callable over the request: scope_from_header(name), "
                "scope_from_principal() or single_tenant"
            )
        if lease <= 0 or ttl <= 0 or tombstone_ttl < 0 or wait < 0 or store_timeout <= 0:
            raise ConfigurationError("lease, ttl and store_timeout must be positive")
        self.app = app
        self.store: AsyncStore = open_async_store(store) if isinstance(store, str) else store
        self.scope = scope
        self.methods = frozenset(m.upper() for m in methods)
        self.routes = tuple(routes)
        self.header = header.lower().encode("latin-1")
        self.header_name = header
        self.max_request_body = max_request_body
        self.max_response_body = max_response_body
        self.store_timeout = store_timeout
        self.namespace = namespace
        self.header_allowlist = frozenset(h.lower() for h in header_allowlist)
        self.required = required
        self.ignore_fields = tuple(ignore_fields)
        self.policy = Policy(
            lease=lease,
            ttl=ttl,
            tombstone_ttl=tombstone_ttl,
            wait=wait,
            retry_after=retry_after,
            replay_errors=replay_errors,
            fail_open=fail_open,
        )
        self._default = _Resolved(self.policy, required, self.ignore_fields)
        self._cache: dict[tuple[str, str], _Resolved | None] = {}
        # Outcome writes still going on after their client was answered (a store blip).
        self.writes = BackgroundWrites()

    async def drain(self) -> None:
        """Wait for the outcome writes still going on in the background (each ends when it
        lands or when its lease does). Done on lifespan shutdown and by :meth:`aclose`."""
        await self.writes.drain()

    async def aclose(self) -> None:
        await self.drain()
        await self.store.aclose()

    async def _lifespan(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send
    ) -> None:
        """Pass the lifespan to the app, letting the writes in the background land before the
        app hears of shutdown (and closes what they need)."""

        async def receive_draining() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                await self.drain()
            return message

        await self.app(scope, receive_draining, send)

    def _resolve(self, method: str, path: str) -> _Resolved | None:
        """The settings for (method, path), or None when such requests are not protected."""
        cache_key = (method, path)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        resolved: _Resolved | None = None
        for route in self.routes:
            if route.matches(method, path, self.methods):
                if route.enabled:
                    p = self.policy
                    policy = Policy(
                        lease=route.lease if route.lease is not None else p.lease,
                        ttl=route.ttl if route.ttl is not None else p.ttl,
                        tombstone_ttl=(
                            route.tombstone_ttl
                            if route.tombstone_ttl is not None
                            else p.tombstone_ttl
                        ),
                        wait=route.wait if route.wait is not None else p.wait,
                        poll_interval=p.poll_interval,
                        retry_after=p.retry_after,
                        replay_errors=(
                            route.replay_errors
                            if route.replay_errors is not None
                            else p.replay_errors
                        ),
                        fail_open=p.fail_open,
                    )
                    resolved = _Resolved(
                        policy, route.required, self.ignore_fields + route.ignore_fields
                    )
                break
        else:
            if method in self.methods:
                resolved = self._default
        if len(self._cache) < 10_000:  # paths with ids are unbounded; keep the cache small
            self._cache[cache_key] = resolved
        return resolved

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope.get("path", "/")
        settings = self._resolve(method, path)
        if settings is None:
            await self.app(scope, receive, send)
            return
        raw_key: bytes | None = None
        for name, value in scope["headers"]:
            if name == self.header:
                if raw_key is not None:
                    await _send_problem(
                        send, MalformedKey(f"Send exactly one {self.header_name} header.")
                    )
                    return
                raw_key = value
        if raw_key is None:
            if not settings.required:
                await self.app(scope, receive, send)
                return
            await _send_problem(
                send,
                MissingKey(
                    f"{method} {path} requires an {self.header_name} header. Send a unique value "
                    "(such as a UUID) and reuse it when you retry the same request."
                ),
            )
            return
        try:
            key = parse_key(raw_key)
            await _Exchange(self, settings, scope, receive, send).run(key)
        except ProblemError as problem:
            await _send_problem(send, problem)


def _headers_of(scope: MutableMapping[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


async def _send_problem(send: Send, problem: ProblemError) -> None:
    status, headers, body = problem_response(problem)
    await _send_whole(send, status, headers, body)


async def _send_stored(send: Send, response: StoredResponse, *, replayed: bool) -> None:
    headers = [*response.headers, ("content-length", str(len(response.body)))]
    if replayed:
        headers.append(("idempotent-replayed", "true"))
    await _send_whole(send, response.status, headers, response.body)


async def _send_whole(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Exchange:
    """One protected request: its body, its capture of the app's response, its outcome."""

    def __init__(
        self,
        mw: IdempotencyMiddleware,
        settings: _Resolved,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
    ) -> None:
        self.mw, self.settings = mw, settings
        self.scope, self.receive, self.send = scope, receive, send
        self.body = b""
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.started = False
        self.held: Message | None = None
        self.body_given = False

    async def _read_body(self) -> bool:
        """The whole request body into ``self.body``; False if the client went away."""
        limit = self.mw.max_request_body
        for name, value in self.scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    raise _too_large(limit)
        parts: list[bytes] = []
        total = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            if chunk:
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        self.body = b"".join(parts)
        return True

    async def run(self, key: str) -> None:
        mw, scope = self.mw, self.scope
        headers = _headers_of(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        request = Request(
            method=scope["method"],
            path=scope.get("path", "/"),
            query=query,
            headers=headers,
            raw=scope,
        )
        tenant = mw.scope(request)
        if tenant is None:
            raise MissingScope(
                "This request does not say whose it is (the tenant the idempotency key belongs "
                "to), so it cannot be deduplicated safely. Authenticate, or send the tenant "
                "header this API requires."
            )
        if not await self._read_body():
            return
        fp = fingerprint(
            request.method,
            request.path,
            query,
            headers.get("content-type"),
            self.body,
            self.settings.ignore_fields,
        )
        skey = storage_key(tenant, key, mw.namespace)
        outcome = await adrive(
            flow(skey, fp, self.settings.policy, header_allowlist=mw.header_allowlist),
            mw.store,
            self._run_app,
            lease=self.settings.policy.lease,
            store_timeout=mw.store_timeout,
            writes=mw.writes,
        )
        if isinstance(outcome, Replay):
            await _send_stored(self.send, outcome.response, replayed=True)
        elif isinstance(outcome, Refuse):
            await _send_problem(self.send, outcome.error)
        elif isinstance(outcome, Fresh | PassThrough):
            if isinstance(outcome, Fresh):
                if outcome.superseded:
                    # Another claim owns the key and its answer is the one kept. Cut this
                    # response short, so the client retries and gets that answer instead of
                    # a second, different "original".
                    raise LeaseLost(
                        f"key {skey} was taken over while it ran; its answer was not stored "
                        "and the response is aborted"
                    )
                if outcome.lost_lease:
                    log.warning("oncely: key %s was taken over while it ran; not stored", skey)
                if outcome.store_error is not None:
                    log.error(
                        "oncely: could not store the outcome of key %s: %s",
                        skey,
                        outcome.store_error,
                    )
            if self.held is not None:
                await self.send(self.held)
        else:
            if outcome.store_error is not None:
                log.error(
                    "oncely: could not record the failure of key %s: %s", skey, outcome.store_error
                )
            if self.started:
                if self.held is not None:  # the app's whole answer: let the client have it
                    await self.send(self.held)
            elif outcome.response is not None:
                await _send_stored(self.send, outcome.response, replayed=False)
            raise outcome.error

    async def _replay_receive(self) -> Message:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()

    async def _capture_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.headers = [
                (k.decode("latin-1").lower(), v.decode("latin-1"))
                for k, v in message.get("headers", ())
            ]
            await self.send(message)
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and not self.too_large:
                self.size += len(chunk)
                if self.size > self.mw.max_response_body:
                    self.too_large = True
                    self.chunks.clear()
                else:
                    self.chunks.append(chunk)
            if message.get("more_body", False):
                await self.send(message)
            else:
                self.held = message
        else:
            await self.send(message)

    async def _run_app(self, claim: Claimed | None, lease: Lease | None) -> Ran | AppFailed:
        scope = self.scope
        extensions = scope.get("extensions")
        if extensions and any(name in extensions for name in _HIDDEN_EXTENSIONS):
            scope = dict(scope)
            scope["extensions"] = {
                k: v for k, v in extensions.items() if k not in _HIDDEN_EXTENSIONS
            }
        attempt = None
        if claim is not None:
            policy = self.settings.policy
            attempt = Attempt(
                self.mw.store,
                claim,
                ttl=policy.ttl,
                tombstone_ttl=policy.tombstone_ttl,
                header_allowlist=self.mw.header_allowlist,
                lease=lease,
                store_timeout=self.mw.store_timeout,
            )
        reset = _current_attempt.set(attempt)
        try:
            await self.mw.app(scope, self._replay_receive, self._capture_send)
        except Exception as exc:
            whole = None if self.held is None else self._ran(attempt)
            return AppFailed(exc, self.started, response=whole)
        finally:
            _current_attempt.reset(reset)
        if self.held is None:
            return AppFailed(
                RuntimeError("the app returned without completing a response"), self.started
            )
        return self._ran(attempt)

    def _ran(self, attempt: Attempt | None) -> Ran:
        """The captured answer, once its last body message is held."""
        return Ran(
            status=self.status,
            headers=tuple(self.headers),
            body=b"".join(self.chunks),
            too_large=self.too_large,
            completed=attempt is not None and attempt.completed,
        )


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than this API accepts ({limit} bytes).",
        extensions={"max_bytes": limit},
    )
