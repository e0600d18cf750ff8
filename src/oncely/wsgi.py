"""WSGI middleware: the same engine for Flask, Django and any WSGI app, on a store's sync side.

    app.wsgi_app = IdempotencyMiddleware(
        app.wsgi_app, store="sqlite:oncely.db", tenant=tenant_from_header("X-Tenant-Id")
    )

Per request: resolve the route and admit the request (``_pipeline``, as under ASGI), read
``wsgi.input`` once within the limit (``CONTENT_LENGTH``, or to its end where the server marks
chunked input as terminated) and hand the app a buffer of it with ``CONTENT_LENGTH`` kept right,
then drive the flow. The lease is renewed from a background thread while the app runs.

What the client sees: a WSGI server sends nothing before the middleware returns its iterable,
so the app's whole response is consumed (its iterable always closed) before it goes out; the
response is stored first, so a client that has the whole answer can always have it again.
Once the app has answered, a store that does not take the write keeps the client waiting at
most ``store_timeout`` (then it gets its answer and a thread goes on writing while the lease
holds). A response over ``max_response_body`` still reaches the client whole (spooled to a
temporary file) and is kept as not replayable. A replay is one ``start_response`` and one body.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import IO, Any, Unpack

from ._attempt import running
from ._codec import Claimed
from ._config import Options, Request, Settings, Tenant
from ._drive import BackgroundThreads, drive
from ._errors import IncompleteBody, ProblemError, problem_response
from ._flow import AppFailed, Lease, Ran
from ._observe import Observer, Watch
from ._pipeline import Admitted, Answer, Capture, admit, settle
from .stores import Store, open_store

__all__ = ["IdempotencyMiddleware"]

log = logging.getLogger("oncely")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

CHUNK = 64 * 1024


class IdempotencyMiddleware:
    """Makes every keyed POST and PATCH (by default) take effect once, for a WSGI app.

    The options are those of :class:`oncely.asgi.IdempotencyMiddleware`; ``store`` is a URL or a
    sync store object (:class:`oncely.Store`). Call :meth:`close` on shutdown: it waits for the
    outcome writes still going on in the background, then closes the store.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        tenant: Tenant,
        store: str | Store = "sqlite:oncely.db",
        **options: Unpack[Settings],
    ) -> None:
        self.options = Options(tenant=tenant, **options)
        self.app = app
        self.store: Store = open_store(store) if isinstance(store, str) else store
        #: The ``on_decision`` hooks (and the decision log line) of this middleware.
        self.observer = Observer(self.options.on_decision, "wsgi", self.store)
        self._key_variable = "HTTP_" + self.options.header.upper().replace("-", "_")
        self.writes = BackgroundThreads()

    @property
    def hook_failures(self) -> int:
        """How many times an ``on_decision`` hook raised (each is logged, never raised)."""
        return self.observer.hook_failures

    def drain(self) -> None:
        """Wait for the outcome writes still going on in the background."""
        self.writes.drain()

    def close(self) -> None:
        self.drain()
        self.store.close()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method: str = environ["REQUEST_METHOD"]
        path: str = environ.get("PATH_INFO") or "/"
        resolved = self.options.resolve(method, path)
        if resolved is None:
            return self.app(environ, start_response)
        keys = [environ[self._key_variable]] if self._key_variable in environ else []
        query: str = environ.get("QUERY_STRING", "")
        request = Request(method, path, query, _headers_of(environ), environ)
        watch = self.observer.start(method, environ, resolved.route, self.app)
        try:
            admitted = admit(self.options, resolved, request, keys, watch)
            if admitted is None:
                return self.app(environ, start_response)
            return _Exchange(self, admitted, environ, start_response, watch).run()
        except ProblemError as problem:
            self.observer.refused(watch, problem)
            return _send_whole(start_response, problem_response(problem))


def _headers_of(environ: dict[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            headers[name[5:].replace("_", "-").lower()] = value
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers[name.replace("_", "-").lower()] = value
    return headers


def _send_whole(start_response: StartResponse, answer: Answer) -> list[bytes]:
    status, headers, body = answer
    start_response(_status_line(status), headers)
    return [body]


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _read_body(environ: dict[str, Any], admitted: Admitted) -> bytes:
    # PEP 3333 requires wsgi.input; without one there is nothing to read: an empty body (and a
    # 400 below when CONTENT_LENGTH declares bytes), not a KeyError and a 500.
    stream: IO[bytes] | None = environ.get("wsgi.input")
    if stream is None:
        stream = io.BytesIO()
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    if length:
        if not length.isdigit():
            raise IncompleteBody(f"Content-Length {length[:40]!r} is not a number of bytes.")
        declared = int(length)
        body = stream.read(declared) if declared else b""
        if len(body) < declared:
            raise IncompleteBody(
                f"The request body ended after {len(body)} of the {declared} bytes its "
                "Content-Length declares; nothing was run. Send the whole body again.",
                extensions={"received_bytes": len(body), "declared_bytes": declared},
            )
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and no end marker: PEP 3333 says there is no body to read
    parts: list[bytes] = []
    total = 0
    while chunk := stream.read(CHUNK):
        total += len(chunk)
        admitted.check_size(total)
        parts.append(chunk)
    return b"".join(parts)


class _Exchange:
    """One protected request: its body, the app's answer (captured and spooled), its outcome."""

    def __init__(
        self,
        mw: IdempotencyMiddleware,
        admitted: Admitted,
        environ: dict[str, Any],
        start_response: StartResponse,
        watch: Watch | None,
    ) -> None:
        self.mw, self.admitted, self.start_response = mw, admitted, start_response
        self.watch = watch
        body = _read_body(environ, admitted)
        self.environ = dict(environ)
        self.environ["wsgi.input"] = io.BytesIO(body)
        self.environ["CONTENT_LENGTH"] = str(len(body))
        self.environ.pop("HTTP_TRANSFER_ENCODING", None)
        self.body = body
        self.capture = Capture(mw.options.max_response_body)
        self.status_line = ""
        self.headers: list[tuple[str, str]] = []
        # The client's copy of the answer; closed once sent (by _spooled) or not needed.
        self.out: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=mw.options.max_response_body
        )

    def _start(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if self.capture.started and exc_info is None:
            raise RuntimeError("start_response was called twice without exc_info")
        # Nothing has gone out yet (the answer is sent once it is whole), so an error page
        # passed with exc_info simply replaces what the app started.
        self.status_line, self.headers = status, list(headers)
        self.capture.start(int(status.split(" ", 1)[0]), headers)
        return self._write

    def _write(self, chunk: bytes) -> None:
        self.capture.add(chunk)
        self.out.write(chunk)

    def _run_app(self, claim: Claimed | None, lease: Lease | None) -> Ran | AppFailed:
        mw, policy = self.mw, self.admitted.resolved.policy
        error: Exception | None = None
        allowlist = mw.options.header_allowlist
        with running(mw.store, claim, lease, policy, allowlist, self.watch) as attempt:
            try:
                iterable = mw.app(self.environ, self._start)
                try:
                    for chunk in iterable:
                        self._write(chunk)
                finally:
                    close = getattr(iterable, "close", None)
                    if close is not None:
                        close()
                self.capture.finished = self.capture.started
            except Exception as exc:
                error = exc
        completed = attempt is not None and attempt.completed
        return self.capture.result(error, completed=completed)

    def run(self) -> Iterable[bytes]:
        mw = self.mw
        outcome = drive(
            self.admitted.flow(self.body),
            mw.store,
            self._run_app,
            writes=mw.writes,
            watch=self.watch,
        )
        settlement = settle(outcome, self.admitted.key, started=self.capture.started)
        whole = settlement.release_held and self.capture.finished
        if settlement.error is not None and settlement.answer is None and not whole:
            self.out.close()
            raise settlement.error
        if settlement.error is not None:
            # The client gets the whole answer the app gave; the error is the server's to know.
            log.error("oncely: the app raised after its answer", exc_info=settlement.error)
        if settlement.answer is not None:
            self.out.close()
            return _send_whole(self.start_response, settlement.answer)
        self.start_response(self.status_line, self.headers)
        return _spooled(self.out)


def _spooled(out: IO[bytes]) -> Iterator[bytes]:
    try:
        out.seek(0)
        while chunk := out.read(CHUNK):
            yield chunk
    finally:
        out.close()
