"""Every decision as one :class:`~oncely.events.Decision`, built and emitted here for every surface.

    adapter: observer.start(method, route) ─► a Watch (None: nobody listens, nothing is timed)
    driver:  times each store operation into the Watch, notes the claim's attempt and the app's
             answer, and once the flow has an outcome ─► observer.emit(watch.decided(outcome))
    a request refused before the flow (missing or malformed key, no tenant, too large)
             ─► observer.refused(watch, problem)

Nobody listens when no ``on_decision`` hook is set and the ``oncely.decisions`` logger is not
enabled for INFO: then :meth:`Observer.start` returns None and a request pays one check.

Hooks are called in order, in the request's own context (so the request's trace span is the
current one). A hook that raises is counted (:attr:`Observer.hook_failures`, and by any hook
beside it with a ``hook_failed`` method, such as :class:`oncely.metrics.Metrics`) and logged;
it never reaches the request. An async hook under a sync surface (WSGI, a sync ``@idempotent``)
is run to its end on one event loop thread of oncely's own.

Keys and tenants are reported as keyed hashes (:func:`oncely._keys.key_hash`), never raw.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from ._errors import (
    ConfigurationError,
    KeyInFlight,
    KeyReused,
    MalformedKey,
    MissingKey,
    MissingTenant,
    ProblemError,
    RequestTooLarge,
    ResponseNotReplayable,
    StoreUnavailable,
)
from ._flow import AppFailed, Failed, Fresh, Outcome, PassThrough, Ran, Refuse, Replay
from ._keys import key_hash, tenant_hash
from .events import Decision, DecisionHook, StoreOperation, Surface
from .events import Outcome as OutcomeName

__all__ = [
    "UNMATCHED",
    "Observer",
    "Watch",
    "hooks_of",
    "key_hash",
    "route_template",
    "store_kind",
    "tenant_hash",
]

log = logging.getLogger("oncely")
decisions_log = logging.getLogger("oncely.decisions")

#: The route label of a request whose route has no template (no ``Route`` matched it and the
#: framework did not say): a bounded label, never the raw path.
UNMATCHED = "unmatched"


def store_kind(store: object) -> str:
    """ "memory", "sqlite", "postgresql", "redis", or a user store's class name."""
    if isinstance(store, str):  # a store URL
        scheme = store.split(":", 1)[0].lower()
        return {"postgres": "postgresql", "rediss": "redis"}.get(scheme, scheme)
    kind = getattr(store, "kind", None)
    if isinstance(kind, str):
        return kind
    name = type(store).__name__
    base = name.removeprefix("Async").removesuffix("Store").lower()
    if base in ("memory", "sqlite", "redis"):
        return base
    if base == "postgres":
        return "postgresql"
    return name


def _routes_of(app: object) -> Any:
    """The routes of a Starlette-like app, through up to a few middleware that wrap it."""
    for _ in range(8):
        routes = getattr(app, "routes", None)
        if routes is not None:
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _framework_template(raw: Mapping[str, Any], app: object) -> str | None:
    """The route template a Starlette (or FastAPI) app has for this request, before it routes.

    The app routes after the middleware, and not at all for a replay or a refusal; so the
    template is found the way the app will find it: its routes' own ``matches`` (mounts
    followed), as starlette-exporter does. Duck-typed: nothing is imported.
    """
    route = raw.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if "wsgi.version" in raw:
        return _werkzeug_template(raw, app)
    routes = _routes_of(raw.get("app")) if "app" in raw else None
    if routes is None and app is not None:
        routes = _routes_of(app)
    if routes is None:
        return None
    return _matched(routes, raw)


#: Route kinds whose match depends on the scope's type, path, root path and method only (a
#: ``Host`` route reads the headers, a route of a kind unknown here may read anything).
_PLAIN_ROUTES = frozenset({"Route", "APIRoute", "WebSocketRoute", "APIWebSocketRoute", "Mount"})
_CACHED_PATHS = 1024  # per routes object; past it the cache starts again (ids in paths)
_CACHED_APPS = 64
#: id(routes) -> (routes, how many, cacheable, (type, path, root_path, method) -> template)
_route_cache: dict[int, tuple[Any, int, bool, dict[tuple[Any, ...], str | None]]] = {}


def _plain(routes: Iterable[Any], depth: int = 0) -> bool:
    for route in routes:
        if type(route).__name__ not in _PLAIN_ROUTES:
            return False
        inner = getattr(route, "routes", None) if type(route).__name__ == "Mount" else None
        if inner is not None and (depth > 8 or not _plain(inner, depth + 1)):
            return False
    return True


def _matched(routes: Any, raw: Mapping[str, Any]) -> str | None:
    """:func:`_match`, its answer kept per scope type, path, root path and method when every
    route's match depends on those alone (the routes object is held, so its id is not reused;
    a route added or removed at its top level starts its cache again)."""
    try:
        size = len(routes)
    except TypeError:
        return _match(routes, dict(raw), "")
    cached = _route_cache.get(id(routes))
    if cached is None or cached[0] is not routes or cached[1] != size:
        if len(_route_cache) >= _CACHED_APPS:
            _route_cache.clear()
        cached = (routes, size, _plain(routes), {})
        _route_cache[id(routes)] = cached
    if not cached[2]:
        return _match(routes, dict(raw), "")
    paths = cached[3]
    key = (raw.get("type"), raw.get("path"), raw.get("root_path"), raw.get("method"))
    try:
        return paths[key]
    except KeyError:
        pass
    found = _match(routes, dict(raw), "")
    if len(paths) >= _CACHED_PATHS:
        paths.clear()
    paths[key] = found
    return found


def _url_map_of(app: object) -> Any:
    """The werkzeug URL map of a Flask-like app (or of its bound ``wsgi_app``), through up to a
    few middleware that wrap it."""
    for _ in range(8):
        url_map = getattr(app, "url_map", None)
        if url_map is not None:
            return url_map
        owner = getattr(app, "__self__", None)  # app.wsgi_app, wrapped in place
        if owner is not None and getattr(owner, "url_map", None) is not None:
            return owner.url_map
        app = getattr(app, "app", None) or getattr(app, "wsgi_app", None)
        if app is None:
            return None
    return None


def _werkzeug_template(environ: Mapping[str, Any], app: object) -> str | None:
    """The rule (``/orders/<int:order_id>``) Flask (werkzeug) routes this request to: the
    request's own ``url_rule`` when the app already made one, else the app's URL map asked the
    way the app will ask it. Duck-typed: nothing is imported."""
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    if isinstance(rule, str):
        return rule
    url_map = _url_map_of(app)
    if url_map is None:
        return None
    try:
        found, _ = url_map.bind_to_environ(environ).match(return_rule=True)
    except Exception:  # NotFound, MethodNotAllowed, a redirect: the app answers, not a route
        return None
    rule = getattr(found, "rule", None)
    return rule if isinstance(rule, str) else None


def _match(routes: Iterable[Any], scope: dict[str, Any], prefix: str) -> str | None:
    for route in routes:
        matches = getattr(route, "matches", None)
        path = getattr(route, "path", None)
        if matches is None or not isinstance(path, str):
            continue
        try:
            match, child = matches(scope)
        except Exception:  # a route of a kind we do not know how to ask: skip it
            continue
        if getattr(match, "name", "") != "FULL":
            continue
        inner = getattr(route, "routes", None)
        if inner is not None and type(route).__name__ == "Mount":
            found = _match(inner, {**scope, **child}, prefix + path)
            return found if found is not None else prefix + path + "/{path}"
        return prefix + path
    return None


def route_template(raw: Mapping[str, Any], configured: str | None, app: object = None) -> str:
    """A request's route label: the framework's template (Starlette, FastAPI: from the scope,
    or from the routes of ``app``, the app the middleware wraps; Flask: the werkzeug rule),
    else the pattern of the ``Route`` that matched, else :data:`UNMATCHED`. Never the raw path
    (ids would make the label set unbounded)."""
    try:
        found = _framework_template(raw, app)
    except Exception:
        found = None
    if found is not None:
        return found
    return configured if configured is not None else UNMATCHED


def hooks_of(on_decision: DecisionHook | Iterable[DecisionHook] | None) -> tuple[DecisionHook, ...]:
    if on_decision is None:
        return ()
    if callable(on_decision):
        return (on_decision,)
    hooks: tuple[object, ...] = tuple(on_decision)
    for hook in hooks:
        if not callable(hook):
            raise ConfigurationError(
                f"on_decision must be a callable or a sequence of callables, not {hook!r}"
            )
    return hooks  # type: ignore[return-value]  # each one is callable


_OUTCOME_OF_PROBLEM: dict[type[ProblemError], OutcomeName] = {
    KeyInFlight: "in_flight",
    KeyReused: "payload_mismatch",
    ResponseNotReplayable: "not_replayable",
    StoreUnavailable: "store_unavailable",
    MissingKey: "missing_key",
    MalformedKey: "malformed_key",
    MissingTenant: "missing_tenant",
    RequestTooLarge: "too_large",
}


def _problem_outcome(problem: ProblemError) -> OutcomeName:
    for cls in type(problem).__mro__:
        if cls in _OUTCOME_OF_PROBLEM:
            return _OUTCOME_OF_PROBLEM[cls]
    return "store_unavailable" if problem.status >= 500 else "malformed_key"


class Watch:
    """One request or call as it is decided: the store's time, the claim, the app's answer."""

    __slots__ = (
        "attempt",
        "emitted",
        "kept_size",
        "method",
        "observer",
        "operations",
        "ran",
        "route",
        "started",
        "storage_key",
        "store_seconds",
        "tenant",
    )

    def __init__(self, observer: Observer, method: str, route: str) -> None:
        self.observer, self.method, self.route = observer, method, route
        self.started = _perf_counter()
        self.operations: list[StoreOperation] = []
        self.store_seconds = 0.0
        self.attempt: int | None = None
        self.ran: Ran | AppFailed | None = None
        self.kept_size: int | None = None
        self.storage_key: str | None = None
        self.tenant: str | None = None
        self.emitted = False

    def operation(self, name: str, wall: float, began: float, *, failed: bool) -> None:
        seconds = _perf_counter() - began
        self.store_seconds += seconds
        self.operations.append(StoreOperation(name, wall, seconds, failed))

    def _status(self, outcome: Outcome) -> int | None:
        if isinstance(outcome, Replay):
            return outcome.response.status
        if isinstance(outcome, Refuse):
            return outcome.error.status
        ran = self.ran
        if isinstance(ran, AppFailed):
            ran = ran.response if ran.started or ran.response is not None else None
            if ran is None:
                if isinstance(outcome, Failed) and outcome.response is not None:
                    return outcome.response.status
                return 500
        return ran.status if ran is not None else None

    def decided(self, outcome: Outcome) -> Decision:
        """The decision ``outcome`` comes to."""
        size: int | None = None
        name: OutcomeName
        if isinstance(outcome, Fresh):  # the two common outcomes first, and their status
            if outcome.superseded or outcome.lost_lease:
                name = "lease_lost"
            elif outcome.store_error is not None:
                name = "store_unavailable"
            elif outcome.stored or outcome.deferred:
                name, size = "executed", self.kept_size
            else:
                name = "released_error"  # an error status, not kept: the key was freed
            ran = self.ran
            if isinstance(ran, Ran):
                return self._decision(name, ran.status, size)
        elif isinstance(outcome, Replay):
            response = outcome.response
            return self._decision("replayed", response.status, len(response.body))
        elif isinstance(outcome, Refuse):
            name = _problem_outcome(outcome.error)
        elif isinstance(outcome, Failed):
            if outcome.store_error is not None:
                name = "store_unavailable"
            elif outcome.response is not None:
                name, size = "executed", len(outcome.response.body)
            else:
                name = "released_error"
        else:
            assert isinstance(outcome, PassThrough)
            name = "store_unavailable"  # fail_open: the app ran unprotected
        status = self._status(outcome)
        return self._decision(name, status, size)

    def refused(self, problem: ProblemError) -> Decision:
        """The decision for a request refused before the flow."""
        return self._decision(_problem_outcome(problem), problem.status, None)

    def _decision(self, name: OutcomeName, status: int | None, size: int | None) -> Decision:
        observer = self.observer
        self.emitted = True
        return _hashing(
            name,
            self.route,
            observer.surface,
            observer.store,
            self.method,
            self.attempt,
            status if observer.surface != "function" else None,
            self.store_seconds,
            _perf_counter() - self.started,
            size,
            tuple(self.operations),
            self.storage_key,
            self.tenant,
        )


_perf_counter = time.perf_counter
_hashing = Decision._hashing


_WARNING_OUTCOMES = frozenset({"store_unavailable", "lease_lost"})


_MESSAGE = "oncely %s %s %s %s -> %s key=%s tenant=%s attempt=%s %.1f ms"
_LOG_LINE = 0  # set below: the line of log_decision's record, what %(lineno)d shows


def log_decision(decision: Decision) -> None:
    """The decision's one log line on ``oncely.decisions``, its fields in ``extra``.

    The record is made and handed to the logger's handlers as ``Logger.log`` would, less the
    walk up the stack for the caller (always this function): the record factory, the logger's
    filters, its handlers and its ancestors' all apply."""
    level = logging.WARNING if decision.outcome in _WARNING_OUTCOMES else logging.INFO
    if not decisions_log.isEnabledFor(level):
        return
    key, tenant = decision.key_hash, decision.tenant_hash
    status, attempt = decision.status, decision.attempt
    record = logging.getLogRecordFactory()(
        decisions_log.name,
        level,
        __file__,
        _LOG_LINE,
        _MESSAGE,
        (
            decision.surface,
            decision.method or "call",
            decision.route,
            status if status is not None else "-",
            decision.outcome,
            key or "-",
            tenant or "-",
            attempt if attempt is not None else "-",
            decision.total_seconds * 1000,
        ),
        None,
        "log_decision",
    )
    fields = record.__dict__
    fields["outcome"] = decision.outcome
    fields["route"] = decision.route
    fields["surface"] = decision.surface
    fields["store"] = decision.store
    fields["method"] = decision.method
    fields["status"] = status
    fields["attempt"] = attempt
    fields["duration"] = decision.total_seconds
    fields["store_duration"] = decision.store_seconds
    fields["response_size"] = decision.response_size
    fields["key_hash"] = key
    fields["tenant_hash"] = tenant
    decisions_log.handle(record)


_LOG_LINE = log_decision.__code__.co_firstlineno


class _HookLoop:
    """One event loop on a daemon thread, for async hooks under sync surfaces."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, awaitable: Awaitable[object]) -> None:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="oncely-hooks", daemon=True).start()
                cls._loop = loop
            loop = cls._loop

        async def wrapped() -> None:
            await awaitable

        asyncio.run_coroutine_threadsafe(wrapped(), loop).result()


class Observer:
    """The ``on_decision`` hooks of one surface, and the count of their failures."""

    __slots__ = ("hook_failures", "hooks", "store", "surface")

    def __init__(
        self,
        on_decision: DecisionHook | Iterable[DecisionHook] | None,
        surface: Surface,
        store: object,
    ) -> None:
        self.hooks = hooks_of(on_decision)
        self.surface: Surface = surface
        self.store = store_kind(store)
        #: How many times a hook raised (each failure is also logged on ``oncely``).
        self.hook_failures = 0

    def start(
        self, method: str, raw: Mapping[str, Any], route: str | None, app: object = None
    ) -> Watch | None:
        """A watch for one request (``raw``: its ASGI scope or WSGI environ; ``route``: the
        pattern of the Route that matched; ``app``: the app the middleware wraps), or None
        when nobody listens."""
        if self.hooks or decisions_log.isEnabledFor(logging.INFO):
            return Watch(self, method, route_template(raw, route, app))
        return None

    def _failed(self, hook: DecisionHook, exc: Exception) -> None:
        self.hook_failures += 1
        log.error(
            "oncely: the on_decision hook %s failed: %s: %s",
            getattr(hook, "__qualname__", type(hook).__qualname__),
            type(exc).__name__,
            exc,
        )
        for other in self.hooks:
            counted = getattr(other, "hook_failed", None)
            if counted is not None and other is not hook:
                try:
                    counted()
                except Exception:
                    log.exception("oncely: a hook_failed counter failed")

    def emit(self, decision: Decision) -> None:
        """Log ``decision`` and call every hook with it (sync surfaces)."""
        log_decision(decision)
        for hook in self.hooks:
            try:
                result = hook(decision)
                if result is not None and inspect.isawaitable(result):
                    _HookLoop.run(result)
            except Exception as exc:
                self._failed(hook, exc)

    async def aemit(self, decision: Decision) -> None:
        """Log ``decision`` and call every hook with it, awaiting async ones."""
        log_decision(decision)
        for hook in self.hooks:
            try:
                result = hook(decision)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self._failed(hook, exc)

    def refused(self, watch: Watch | None, problem: ProblemError) -> None:
        """Emit the decision for a request refused before its flow (if not emitted yet)."""
        if watch is not None and not watch.emitted:
            self.emit(watch.refused(problem))

    async def arefused(self, watch: Watch | None, problem: ProblemError) -> None:
        if watch is not None and not watch.emitted:
            await self.aemit(watch.refused(problem))
