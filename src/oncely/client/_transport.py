"""The transports: thin drivers of ``_flow.flow``, one sync and one async.

Each one reads the request's body (up to ``max_body``, so it can be sent again), runs the
flow, and performs what it yields on the inner transport, the clock and the journal. Every
decision is in ``_flow.py`` and ``_policy.py``; nothing here decides.
"""

from __future__ import annotations

import functools
import os
import random as _random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, Never, TypeVar, assert_never

import anyio.to_thread
import httpx

from .._errors import ConfigurationError
from ._flow import (
    Begin,
    Call,
    Close,
    Finish,
    Op,
    Read,
    RetryEvent,
    Send,
    Settings,
    Sleep,
    flow,
    request_options,
)
from ._journal import Journal, KeyJournal, MemoryJournal
from ._keys import KEY_FORMATS
from ._policy import SHARED_BUDGET, RetryBudget, RetryPolicy, methods_of, unknown_options

__all__ = ["AsyncIdempotentTransport", "IdempotentTransport"]

MAX_BODY = 2**20
SERVER_RETENTION = 24 * 3600.0
_OPTIONS = (
    "policy",
    "journal",
    "derive_keys",
    "methods",
    "header",
    "key_format",
    "max_body",
    "server_retention",
    "budget",
    "on_retry",
    "clock",
    "sleep",
    "random",
    "wall_clock",
)


InnerT = TypeVar("InnerT", httpx.BaseTransport, httpx.AsyncBaseTransport)
SleepT = TypeVar("SleepT", Callable[[float], object], Callable[[float], Awaitable[object]])


class _Configured(Generic[InnerT, SleepT]):
    """The options both transports take, checked once; the subclasses only drive."""

    _inner_type: type[InnerT]

    def __init__(
        self,
        inner: InnerT | None = None,
        *,
        policy: RetryPolicy | None = None,
        journal: KeyJournal | str | os.PathLike[str] | None = None,
        derive_keys: str | bytes | None = None,
        methods: Iterable[str] = ("POST", "PATCH"),
        header: str = "Idempotency-Key",
        key_format: str = "token",
        max_body: int = MAX_BODY,
        server_retention: float = SERVER_RETENTION,
        budget: RetryBudget | None = SHARED_BUDGET,
        on_retry: Callable[[RetryEvent], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: SleepT | None = None,
        random: Callable[[], float] = _random.random,
        wall_clock: Callable[[], float] = time.time,
        **unknown: Never,
    ) -> None:
        owner = type(self).__name__
        if unknown:
            unknown_options(owner, unknown, _OPTIONS)
        if inner is not None and not isinstance(inner, self._inner_type):
            raise ConfigurationError(
                f"{owner} inner must be an {self._inner_type.__name__}, not {inner!r}"
            )
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise ConfigurationError(f"{owner} policy must be a RetryPolicy, not {policy!r}")
        if key_format not in KEY_FORMATS:
            raise ConfigurationError(
                f"{owner} key_format must be one of {', '.join(map(repr, KEY_FORMATS))}, "
                f"not {key_format!r}"
            )
        if not isinstance(header, str) or not header or not header.isascii() or " " in header:
            raise ConfigurationError(f"{owner} header must be a header name, not {header!r}")
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ConfigurationError(f"{owner} max_body must be 0 or more bytes, not {max_body!r}")
        if (
            isinstance(server_retention, bool)
            or not isinstance(server_retention, int | float)
            or not server_retention > 0
        ):
            raise ConfigurationError(
                f"{owner} server_retention must be a positive number of seconds, "
                f"not {server_retention!r}"
            )
        if budget is not None and not isinstance(budget, RetryBudget):
            raise ConfigurationError(
                f"{owner} budget must be a RetryBudget or None, not {budget!r}"
            )
        secret: bytes | None = None
        if derive_keys is not None:
            secret = derive_keys.encode() if isinstance(derive_keys, str) else derive_keys
            if not isinstance(secret, bytes) or len(secret) < 16:
                raise ConfigurationError(
                    f"{owner} derive_keys must be a secret of 16 bytes or more (such as "
                    "secrets.token_hex(32)); anyone who knows it can compute the keys"
                )
        for name, value in (
            ("on_retry", on_retry),
            ("clock", clock),
            ("sleep", sleep),
            ("random", random),
            ("wall_clock", wall_clock),
        ):
            if value is not None and not callable(value):
                raise ConfigurationError(f"{owner} {name} must be callable, not {value!r}")
        chosen: Journal
        if journal is None:
            chosen = MemoryJournal()
        elif isinstance(journal, KeyJournal):
            chosen = journal
        elif isinstance(journal, str | os.PathLike):
            chosen = KeyJournal(journal)
        else:
            raise ConfigurationError(
                f"{owner} journal must be a KeyJournal or a file path, not {journal!r}"
            )
        # A journal opened here from a path is closed with the transport.
        self._owns_journal = chosen is not journal and journal is not None
        self._settings = Settings(
            policy=policy or RetryPolicy(),
            methods=methods_of(f"{owner} methods", methods),
            header=header,
            key_format=key_format,
            max_body=max_body,
            server_retention=float(server_retention),
            budget=budget,
            journal=chosen,
            derive_secret=secret,
            on_retry=on_retry,
            clock=clock,
            random=random,
            wall_clock=wall_clock,
        )
        self._inner: InnerT = inner if inner is not None else self._new_inner()
        self._sleep: SleepT = sleep if sleep is not None else self._default_sleep()

    def _new_inner(self) -> InnerT:
        raise NotImplementedError

    def _default_sleep(self) -> SleepT:
        raise NotImplementedError

    def _close_journal(self) -> None:
        if self._owns_journal and isinstance(self._settings.journal, KeyJournal):
            self._settings.journal.close()


def _buffered(request: httpx.Request, chunks: list[bytes]) -> bytes:
    """Make ``request`` carry ``chunks`` as one replayable body; the body."""
    body = b"".join(chunks)
    request.stream = httpx.ByteStream(body)
    request.headers.pop("transfer-encoding", None)
    request.headers["content-length"] = str(len(body))
    return body


class _Rest(httpx.SyncByteStream):
    """A stream over the limit: what was read, then the rest, once."""

    def __init__(self, head: list[bytes], tail: Iterator[bytes], source: httpx.SyncByteStream):
        self._head, self._tail, self._source = head, tail, source

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._tail

    def close(self) -> None:
        self._source.close()


class _AsyncRest(httpx.AsyncByteStream):
    def __init__(
        self, head: list[bytes], tail: AsyncIterator[bytes], source: httpx.AsyncByteStream
    ):
        self._head, self._tail, self._source = head, tail, source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._tail:
            yield chunk

    async def aclose(self) -> None:
        await self._source.aclose()


def _read_body(request: httpx.Request, limit: int) -> bytes | None:
    """The body, buffered so that it can be sent again; None when it streams over ``limit``."""
    try:
        return request.content
    except httpx.RequestNotRead:
        pass
    source = request.stream
    if not isinstance(source, httpx.SyncByteStream):
        raise ConfigurationError("IdempotentTransport needs a sync body; this one is async")
    chunks: list[bytes] = []
    size = 0
    iterator = iter(source)
    for chunk in iterator:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            request.stream = _Rest(chunks, iterator, source)
            return None
    return _buffered(request, chunks)


async def _aread_body(request: httpx.Request, limit: int) -> bytes | None:
    try:
        return request.content
    except httpx.RequestNotRead:
        pass
    source = request.stream
    if not isinstance(source, httpx.AsyncByteStream):
        raise ConfigurationError("AsyncIdempotentTransport needs an async body; this one is sync")
    chunks: list[bytes] = []
    size = 0
    iterator = aiter(source)
    async for chunk in iterator:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            request.stream = _AsyncRest(chunks, iterator, source)
            return None
    return _buffered(request, chunks)


class IdempotentTransport(
    _Configured[httpx.BaseTransport, Callable[[float], object]], httpx.BaseTransport
):
    """An httpx transport that gives every POST and PATCH an Idempotency-Key, keeps it for
    every retry of the operation, and retries only what is safe to send again.

        client = httpx.Client(base_url="https://api.example.com", transport=IdempotentTransport())

    ``inner`` is the transport that sends (default: ``httpx.HTTPTransport()``). Per request,
    ``extensions={"oncely": {"operation": "order-42/pay"}}`` names the operation (one key for
    it, kept in ``journal`` across restarts), ``{"key": False}`` sends no key, ``{"key":
    True}`` adds one to any method, ``{"policy": RetryPolicy(...)}`` overrides the policy. The
    answer's ``extensions["oncely"]`` is a :class:`Report`.
    """

    _inner_type = httpx.BaseTransport

    def _new_inner(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    def _default_sleep(self) -> Callable[[float], object]:
        return time.sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        options = request_options(request)
        call = Call(request, options, _read_body(request, self._settings.max_body))
        steps = flow(self._settings, call)
        value: Any = None
        error: Exception | None = None
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                response: httpx.Response = done.value
                return response
            value, error = None, None
            try:
                value = self._do(op)
            except Exception as exc:
                error = exc

    def _do(self, op: Op) -> Any:
        match op:
            case Send(request):
                return self._inner.handle_request(request)
            case Read(response):
                return response.read()
            case Close(response):
                return response.close()
            case Sleep(seconds):
                return self._sleep(seconds)
            case Begin(journal, operation, key, digest):
                return journal.begin(operation, key, digest)
            case Finish(journal, operation, status):
                return journal.finish(operation, status)
            case _:
                assert_never(op)

    def close(self) -> None:
        self._inner.close()
        self._close_journal()


class AsyncIdempotentTransport(
    _Configured[httpx.AsyncBaseTransport, Callable[[float], Awaitable[object]]],
    httpx.AsyncBaseTransport,
):
    """The async twin of :class:`IdempotentTransport`: the same options and decisions, with
    an async inner transport (default ``httpx.AsyncHTTPTransport()``) and an async ``sleep``."""

    _inner_type = httpx.AsyncBaseTransport

    def _new_inner(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    def _default_sleep(self) -> Callable[[float], Awaitable[object]]:
        return anyio.sleep

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        options = request_options(request)
        call = Call(request, options, await _aread_body(request, self._settings.max_body))
        steps = flow(self._settings, call)
        value: Any = None
        error: Exception | None = None
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                response: httpx.Response = done.value
                return response
            value, error = None, None
            try:
                value = await self._do(op)
            except Exception as exc:
                error = exc

    async def _do(self, op: Op) -> Any:
        match op:
            case Send(request):
                return await self._inner.handle_async_request(request)
            case Read(response):
                return await response.aread()
            case Close(response):
                return await response.aclose()
            case Sleep(seconds):
                return await self._sleep(seconds)
            case Begin(journal, operation, key, digest):
                return await _off_loop(journal, journal.begin, operation, key, digest)
            case Finish(journal, operation, status):
                return await _off_loop(journal, journal.finish, operation, status)
            case _:
                assert_never(op)

    async def aclose(self) -> None:
        await self._inner.aclose()
        self._close_journal()


async def _off_loop(journal: Journal, method: Callable[..., Any], *args: Any) -> Any:
    """A journal call: in a worker thread when it touches a file (fsync), inline in memory."""
    if isinstance(journal, MemoryJournal):
        return method(*args)
    return await anyio.to_thread.run_sync(functools.partial(method, *args))
