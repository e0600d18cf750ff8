"""``@idempotent``: any function, sync or async, runs once per key, on the same stores.

    @idempotent(store="sqlite:oncely.db", prefix="payments.charge", key=lambda event: event["id"])
    def charge(event: dict) -> Receipt: ...

The same flow as HTTP requests: the call claims ``(tenant, prefix, key)`` with a fingerprint of
``payload(*args, **kwargs)`` (canonical JSON, like a request body); a repeat returns the stored
result without running; another payload under the key raises :class:`KeyReused`; a concurrent
duplicate raises :class:`KeyInFlight` (or waits ``wait`` seconds for the first); an exception
releases the key (a retry runs again) unless it is one of ``replay_exceptions``, which are kept
and raised again on a repeat. Leases (renewed while the function runs), fencing, TTL and
tombstones are those of the store. ``prefix`` is required and explicit, never derived from the
function's name, so a refactor does not reset deduplication.

Results are stored as JSON, never pickled: JSON values keep their types (0, False, "", [], {}
and None are all distinct), and dataclasses and pydantic models are rebuilt from the declared
return type; or pass ``codec`` (``encode(value) -> bytes``, ``decode(bytes) -> value``). A
result that cannot be encoded fails the first call (:class:`ResultNotEncodable`), and the key is
released.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from ._attempt import LeaseLost, running
from ._codec import Claimed
from ._drive import adrive, drive
from ._errors import ConfigurationError, OncelyError
from ._fingerprint import fingerprint
from ._flow import AppFailed, Failed, Fresh, Lease, PassThrough, Policy, Ran, Refuse, Replay, flow
from ._keys import storage_key
from ._observe import Observer, Watch, hooks_of
from .events import DecisionHook
from .stores import AsyncStore, Store, open_async_store, open_store

__all__ = ["Codec", "ResultNotEncodable", "idempotent"]

P = ParamSpec("P")
R = TypeVar("R")

_EXCEPTION_HEADER = "oncely-exception"
_ALLOWLIST = frozenset({"content-type", _EXCEPTION_HEADER})


class ResultNotEncodable(OncelyError, TypeError):
    """The function's result cannot be stored by the codec (the key was released)."""


class Codec(Protocol):
    """Turns a result into bytes to store and back."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def _plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses and pydantic models become objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _rebuild(tp: Any, data: Any) -> Any:
    """``data`` as the declared type ``tp``: dataclasses and pydantic models, nested in lists,
    dicts and optionals; anything else as the JSON value it is."""
    if data is None or tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is not type(None):
                return _rebuild(arm, data)
    if origin in (list, tuple) and isinstance(data, list):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return origin(_rebuild(item, v) for v in data)
    if origin is dict and isinstance(data, dict):
        args = typing.get_args(tp)
        return {k: _rebuild(args[1] if args else Any, v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{k: _rebuild(hints.get(k, Any), v) for k, v in data.items()})
    validate = getattr(tp, "model_validate", None)
    if callable(validate):
        return validate(data)
    return data


class _JSONCodec:
    """JSON, with dataclasses and pydantic models rebuilt from the declared return type."""

    def __init__(self, returns: Any) -> None:
        self.returns = returns

    def encode(self, value: Any) -> bytes:
        return json.dumps(_plain(value), separators=(",", ":"), allow_nan=False).encode()

    def decode(self, data: bytes) -> Any:
        return _rebuild(self.returns, json.loads(data))


def idempotent(
    *,
    prefix: str,
    key: Callable[..., object],
    store: str | Store | AsyncStore = "sqlite:oncely.db",
    payload: Callable[..., object] | None = None,
    tenant: str | Callable[..., str] | None = None,
    codec: Codec | None = None,
    replay_exceptions: tuple[type[BaseException], ...] = (),
    wait: float = 0.0,
    lease: float = 60.0,
    ttl: float = 24 * 3600.0,
    tombstone_ttl: float = 7 * 24 * 3600.0,
    store_timeout: float = 5.0,
    on_decision: DecisionHook | Iterable[DecisionHook] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make the decorated function run once per ``key(*args, **kwargs)`` under ``prefix``.

    ``on_decision``: a hook or hooks, sync or async, called with the
    :class:`oncely.events.Decision` of every call (its route is ``prefix``); the wrapper's
    ``observer.hook_failures`` counts the hooks that raised.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError(
            "prefix must name what is deduplicated (such as 'payments.charge'); it is never "
            "derived from the function, so that a refactor does not reset deduplication"
        )
    if not callable(key):
        raise ConfigurationError("key must be a callable over the function's arguments")
    if lease <= 0 or ttl <= 0 or tombstone_ttl < 0 or wait < 0 or store_timeout <= 0:
        raise ConfigurationError("lease, ttl and store_timeout must be positive")
    policy = Policy(
        lease=lease, ttl=ttl, tombstone_ttl=tombstone_ttl, wait=wait, store_timeout=store_timeout
    )
    hooks = hooks_of(on_decision)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        is_async = inspect.iscoroutinefunction(fn)
        the_codec: Codec = codec or _JSONCodec(typing.get_type_hints(fn).get("return", Any))
        opened: list[Any] = []
        observer = Observer(hooks, "function", store)

        def the_store() -> Any:
            if not opened:
                if isinstance(store, str):
                    opened.append(open_async_store(store) if is_async else open_store(store))
                else:
                    opened.append(store)
            return opened[0]

        def steps(args: Any, kwargs: Any, watch: Watch | None) -> Any:
            raw_key = str(key(*args, **kwargs))
            body = b""
            if payload is not None:
                body = json.dumps(_plain(payload(*args, **kwargs)), sort_keys=True).encode()
            fp = fingerprint("CALL", "/" + prefix, "", "application/json", body)
            who = tenant(*args, **kwargs) if callable(tenant) else (tenant or "")
            stored_as = storage_key(who, raw_key, prefix)
            if watch is not None:
                watch.storage_key, watch.tenant = stored_as, who or None
            return flow(stored_as, fp, policy, header_allowlist=_ALLOWLIST)

        def ran(value: Any) -> Ran:
            try:
                body = the_codec.encode(value)
            except (TypeError, ValueError) as exc:
                raise ResultNotEncodable(
                    f"the result of {fn.__qualname__} ({type(value).__name__}) cannot be "
                    f"stored: {exc}; return JSON values, dataclasses or pydantic models, or "
                    "pass codec="
                ) from exc
            return Ran(200, (("content-type", "application/json"),), body)

        def returned(value: Any, results: list[Any]) -> Ran | AppFailed:
            """What the call came to, once it returned ``value``."""
            results[0] = value
            try:
                return ran(value)
            except ResultNotEncodable as exc:
                return AppFailed(exc, started=False)

        def raised(exc: Exception, results: list[Any]) -> Ran | AppFailed:
            results[0] = exc
            if isinstance(exc, replay_exceptions):
                name = f"{type(exc).__module__}:{type(exc).__qualname__}"
                body = json.dumps([_plain(a) for a in exc.args]).encode()
                return Ran(200, ((_EXCEPTION_HEADER, name),), body)
            return AppFailed(exc, started=False)

        def settled(outcome: Any, results: list[Any]) -> Any:
            if isinstance(outcome, Replay):
                response = outcome.response
                kind = dict(response.headers).get(_EXCEPTION_HEADER)
                if kind is not None:
                    raise _rebuilt_exception(kind, response.body, replay_exceptions)
                return the_codec.decode(response.body)
            if isinstance(outcome, Refuse):
                raise outcome.error
            if isinstance(outcome, Failed):
                raise outcome.error
            if isinstance(outcome, Fresh) and outcome.superseded:
                raise LeaseLost("another call took the key over while this one ran")
            assert isinstance(outcome, Fresh | PassThrough)
            if isinstance(results[0], BaseException):
                raise results[0]  # a replayed exception, its first time
            return results[0]

        if is_async:

            @functools.wraps(fn)
            async def acall(*args: P.args, **kwargs: P.kwargs) -> R:
                results: list[Any] = [None]

                async def run(claim: Claimed | None, held: Lease | None) -> Ran | AppFailed:
                    with running(the_store(), claim, held, policy, _ALLOWLIST, watch):
                        try:
                            value = await fn(*args, **kwargs)  # type: ignore[misc]
                        except Exception as exc:
                            return raised(exc, results)
                    return returned(value, results)

                watch = observer.start("", {}, prefix)
                outcome = await adrive(
                    steps(args, kwargs, watch),
                    the_store(),
                    run,
                    store_timeout=store_timeout,
                    watch=watch,
                )
                return cast(R, settled(outcome, results))

            acall.observer = observer  # type: ignore[attr-defined]
            return cast(Callable[P, R], acall)

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            results: list[Any] = [None]

            def run(claim: Claimed | None, held: Lease | None) -> Ran | AppFailed:
                with running(the_store(), claim, held, policy, _ALLOWLIST, watch):
                    try:
                        value = fn(*args, **kwargs)
                    except Exception as exc:
                        return raised(exc, results)
                return returned(value, results)

            watch = observer.start("", {}, prefix)
            outcome = drive(steps(args, kwargs, watch), the_store(), run, watch=watch)
            return cast(R, settled(outcome, results))

        call.observer = observer  # type: ignore[attr-defined]
        return call

    return decorate


def _rebuilt_exception(
    kind: str, body: bytes, allowed: tuple[type[BaseException], ...]
) -> BaseException:
    for cls in allowed:
        if f"{cls.__module__}:{cls.__qualname__}" == kind:
            return cls(*json.loads(body))
    return OncelyError(f"the stored exception {kind} is not among replay_exceptions")
