"""Pure ASGI middleware: bytes in, the core decides, bytes out.

    app = IdempotencyMiddleware(
        app, store="sqlite:oncely.db", tenant=tenant_from_header("X-Tenant-Id")
    )

Per request: resolve the route and admit the request (``_pipeline``), read the body once (it
is fingerprinted and handed to the app unchanged), then drive the flow. The app's response
streams to the client as it is produced while a copy is captured; only its final body message
is held back until the response is stored, so a client that has the whole answer can always
have it again. Non-HTTP scopes (lifespan, websocket) pass straight through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Unpack

from ._attempt import running
from ._codec import Claimed
from ._config import Options, Request, Settings, Tenant
from ._drive import BackgroundWrites, adrive
from ._errors import ProblemError, problem_response
from ._flow import AppFailed, Lease, Ran
from ._observe import Observer, Watch
from ._pipeline import Admitted, Answer, Capture, admit, settle
from .stores import AsyncStore, open_async_store

__all__ = ["IdempotencyMiddleware"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# Extensions that would let the app send its body other than as bytes we can capture.
_HIDDEN_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopy", "http.response.trailers")


class IdempotencyMiddleware:
    """Makes every keyed POST and PATCH (by default) take effect once.

    ``tenant`` (required) tells tenants apart: ``tenant_from_header(name)``,
    ``tenant_from_principal()``, ``single_tenant``, or any callable over :class:`oncely.Request`.
    ``store``: a URL (``"sqlite:oncely.db"``, ``"memory:"``, ``"postgresql://..."``,
    ``"redis://..."``) or an async store object. ``on_decision``: a hook or hooks, sync or
    async, called with every :class:`oncely.events.Decision`. See the README for every option.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenant: Tenant,
        store: str | AsyncStore = "sqlite:oncely.db",
        **options: Unpack[Settings],
    ) -> None:
        self.options = Options(tenant=tenant, **options)
        self.app = app
        self.store: AsyncStore = open_async_store(store) if isinstance(store, str) else store
        #: The ``on_decision`` hooks (and the decision log line) of this middleware.
        self.observer = Observer(self.options.on_decision, "asgi", self.store)
        self._header = self.options.header_lower.encode("latin-1")
        # Outcome writes still going on after their client was answered (a store blip).
        self.writes = BackgroundWrites()

    @property
    def hook_failures(self) -> int:
        """How many times an ``on_decision`` hook raised (each is logged, never raised)."""
        return self.observer.hook_failures

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

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope.get("path", "/")
        resolved = self.options.resolve(method, path)
        if resolved is None:
            await self.app(scope, receive, send)
            return
        raw_headers = scope["headers"]
        if not isinstance(raw_headers, list | tuple):
            raw_headers = list(raw_headers)
        header = self._header
        keys = [value for name, value in raw_headers if name == header]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        if len(headers) != len(raw_headers):  # a repeated name: its values joined with ", "
            headers = {}
            for raw_name, raw_value in raw_headers:
                name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        query = scope.get("query_string", b"").decode("latin-1")
        request = Request(method=method, path=path, query=query, headers=headers, raw=scope)
        watch = self.observer.start(method, scope, resolved.route, self.app)
        try:
            admitted = admit(self.options, resolved, request, keys, watch)
            if admitted is None:
                await self.app(scope, receive, send)
                return
            await _Exchange(self, admitted, scope, receive, send, watch).run()
        except ProblemError as problem:
            await self.observer.arefused(watch, problem)
            await _send_whole(send, problem_response(problem))


async def _send_whole(send: Send, answer: Answer) -> None:
    status, headers, body = answer
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
        admitted: Admitted,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        watch: Watch | None,
    ) -> None:
        self.mw, self.admitted, self.watch = mw, admitted, watch
        self.scope, self.receive, self.send = scope, receive, send
        self.body = b""
        self.capture = Capture(mw.options.max_response_body)
        self.held: Message | None = None
        self.body_given = False

    async def _read_body(self) -> bool:
        """The whole request body into ``self.body``; False if the client went away."""
        message = await self.receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            # The whole body in one message, as servers send a small one.
            body = message.get("body", b"")
            self.admitted.check_size(len(body))
            self.body = body if type(body) is bytes else bytes(body)
            return True
        parts: list[bytes] = []
        total = 0
        while True:
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            if chunk:
                total += len(chunk)
                self.admitted.check_size(total)
                parts.append(chunk)
            if not message.get("more_body", False):
                break
            message = await self.receive()
        self.body = b"".join(parts)
        return True

    async def run(self) -> None:
        if not await self._read_body():
            return
        mw = self.mw
        outcome = await adrive(
            self.admitted.flow(self.body),
            mw.store,
            self._run_app,
            store_timeout=mw.options.store_timeout,
            writes=mw.writes,
            watch=self.watch,
        )
        settlement = settle(outcome, self.admitted.key, started=self.capture.started)
        if settlement.answer is not None:
            await _send_whole(self.send, settlement.answer)
        elif settlement.release_held and self.held is not None:
            await self.send(self.held)
        if settlement.error is not None:
            raise settlement.error

    async def _replay_receive(self) -> Message:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        return await self.receive()

    async def _capture_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.capture.start_lowered(
                message["status"],
                [
                    (k.decode("latin-1").lower(), v.decode("latin-1"))
                    for k, v in message.get("headers", ())
                ],
            )
            await self.send(message)
        elif kind == "http.response.body":
            self.capture.add(message.get("body", b""))
            if message.get("more_body", False):
                await self.send(message)
            else:
                self.held = message
                self.capture.finished = True
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
        mw, policy = self.mw, self.admitted.resolved.policy
        allowlist = mw.options.header_allowlist
        with running(mw.store, claim, lease, policy, allowlist, self.watch) as attempt:
            error: Exception | None = None
            try:
                await mw.app(scope, self._replay_receive, self._capture_send)
            except Exception as exc:
                error = exc
        completed = attempt is not None and attempt.completed
        return self.capture.result(error, completed=completed)
