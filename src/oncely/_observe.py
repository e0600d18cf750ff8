"""Every decision as one :class:`~oncely.events.Decision`, built and emitted here for every surface.

    adapter: observer.start(method, route) ─► a Watch (None: nobody listens, nothing is timed)
    driver:  times each store operation into the Watch, notes the claim's attempt and the app's
             answer, and once the flow has an outcome ─► observer.emit(watch.decided(outcome))
    a request refused before the flow (missing or malformed key, no tenant, too large)
             ─► observer.refused(watch, problem)

Nobody listens when no ``on_decision`` hook is set and the ``oncely.decisions`` logger is not
enabled for INFO: then :meth:`Observer.start` returns None and a request pays one check. When
the one hook is a :class:`~oncely.events.CountingHook` (``Metrics``) and the log is off, the
watch is a :class:`CountingWatch`: it counts into the hook itself and ``decided`` gives None.

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

from ._codec import Claimed, Existing
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
from ._flow import (
    AppFailed,
    Claim,
    Complete,
    Failed,
    Fresh,
    Outcome,
    PassThrough,
    Ran,
    RecordPhase,
    Refuse,
    Release,
    Replay,
)
from ._keys import key_hash, tenant_hash
from .events import CountingHook, Decision, DecisionHook, StoreOperation, Surface
from .events import Outcome as OutcomeName

__all__ = [
    "OP_NAMES",
    "UNMATCHED",
    "CountingWatch",
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
    global _last_routing
    if "route" in raw:
        path = getattr(raw["route"], "path", None)
        if isinstance(path, str):
            return path
    if "wsgi.version" in raw:
        return _werkzeug_template(raw, app)
    owner = raw.get("app")
    routing = _last_routing
    if routing is None or routing.owner is not owner or routing.app is not app:
        routing = _routings.get((id(owner), id(app)))
        if routing is None or routing.owner is not owner or routing.app is not app:
            routing = _Routing.of(owner, app)
        _last_routing = routing
    routes = routing.routes
    if routes is None:
        return None
    if routing.plain and len(routes) != routing.size:
        # a route added or removed: its answers start again
        routing = _last_routing = _Routing.of(owner, app)
        routes = routing.routes
        if routes is None:
            return None
    if not routing.plain:
        return _match(routes, dict(raw), "")
    key = (raw["type"], raw["path"], raw.get("root_path"), raw["method"])  # an ASGI scope's
    found = routing.templates.get(key, _UNKNOWN)
    if found is _UNKNOWN:
        found = _match(routes, dict(raw), "")
        if len(routing.templates) >= _CACHED_PATHS:
            routing.templates.clear()
        routing.templates[key] = found
    return found  # type: ignore[return-value]  # a template or None, never _UNKNOWN here


#: Route kinds whose match depends on the scope's type, path, root path and method only (a
#: ``Host`` route reads the headers, a route of a kind unknown here may read anything).
_PLAIN_ROUTES = frozenset({"Route", "APIRoute", "WebSocketRoute", "APIWebSocketRoute", "Mount"})
_CACHED_PATHS = 1024  # per app; past it the answers start again (ids in paths)
_CACHED_APPS = 64
_UNKNOWN = object()


class _Routing:
    """The routes a middleware's requests are matched against, and what they matched.

    Found once per (scope's app, wrapped app): the scope's app's routes (Starlette puts itself
    in the scope), else those of the app the middleware wraps, else none (a plain ASGI app,
    whose label is its ``Route`` pattern). The routes object is held; a route added to it or
    removed from it (its length changes) starts the answers again (a routes list replaced by
    another is not seen). When every route's match depends on the scope's type, path, root
    path and method alone, answers are kept by those.
    """

    __slots__ = ("app", "owner", "plain", "routes", "size", "templates")

    def __init__(self, owner: object, app: object, routes: Any) -> None:
        self.owner, self.app, self.routes = owner, app, routes
        try:
            self.size = len(routes) if routes is not None else 0
            self.plain = routes is not None and _plain(routes)
        except TypeError:  # routes that cannot say how many: matched each time
            self.size, self.plain = 0, False
        self.templates: dict[tuple[Any, ...], str | None] = {}

    @classmethod
    def of(cls, owner: object, app: object) -> _Routing:
        routes = _routes_of(owner) if owner is not None else None
        if routes is None and app is not None:
            routes = _routes_of(app)
        routing = cls(owner, app, routes)
        if len(_routings) >= _CACHED_APPS:
            _routings.clear()
        _routings[(id(owner), id(app))] = routing
        return routing


#: (id of the scope's app, id of the wrapped app) -> their routing (both held: ids not reused)
_routings: dict[tuple[int, int], _Routing] = {}
_last_routing: _Routing | None = None  # the routing asked last, asked first


def _plain(routes: Iterable[Any], depth: int = 0) -> bool:
    for route in routes:
        if type(route).__name__ not in _PLAIN_ROUTES:
            return False
        inner = getattr(route, "routes", None) if type(route).__name__ == "Mount" else None
        if inner is not None and (depth > 8 or not _plain(inner, depth + 1)):
            return False
    return True


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


#: The name a decision gives each kind of store operation.
OP_NAMES: dict[type, str] = {
    Claim: "claim",
    Complete: "complete",
    Release: "release",
    RecordPhase: "record_phase",
}


class Watch:
    """One request or call as it is decided: the store's time, the claim, the app's answer.

    The driver tells it each store operation (:meth:`operation`) and the app's answer
    (``ran``); once the flow has an outcome, :meth:`decided` gives the decision to emit."""

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
        "wall",
    )

    def __init__(self, observer: Observer, method: str, route: str) -> None:
        self.observer, self.method, self.route = observer, method, route
        self.started, self.wall = _perf_counter(), _time()
        self.operations: list[StoreOperation] = []
        self.store_seconds = 0.0
        self.attempt: int | None = None
        self.ran: Ran | AppFailed | None = None
        self.kept_size: int | None = None
        self.storage_key: str | None = None
        self.tenant: str | None = None
        self.emitted = False

    def operation(self, op: object, began: float, result: object) -> None:
        """A store operation ``op`` that began at ``began`` (``time.perf_counter()``) ended now
        with ``result``: what the store answered, or the exception it raised."""
        seconds = _perf_counter() - began
        self.store_seconds += seconds
        wall = self.wall + (began - self.started)
        failed = isinstance(result, Exception)
        self.operations.append(StoreOperation(OP_NAMES[type(op)], wall, seconds, failed))
        if not failed:
            self._note(op, result)

    def _note(self, op: object, result: object) -> None:
        """What a decision reports of a store operation's result: the attempt, the size kept."""
        if isinstance(result, Claimed):
            self.attempt = result.attempt
        elif isinstance(result, Existing):
            self.attempt = result.record.attempt
        elif isinstance(op, Complete) and result is not False:
            self.kept_size = len(op.response.body)

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

    def _named(self, outcome: Outcome) -> tuple[OutcomeName, int | None]:
        """The outcome's name, and the size a decision reports (the answer kept or replayed)."""
        if isinstance(outcome, Fresh):  # the two common outcomes first
            if outcome.superseded or outcome.lost_lease:
                return "lease_lost", None
            if outcome.store_error is not None:
                return "store_unavailable", None
            if outcome.stored or outcome.deferred:
                return "executed", self.kept_size
            return "released_error", None  # an error status, not kept: the key was freed
        if isinstance(outcome, Replay):
            return "replayed", len(outcome.response.body)
        if isinstance(outcome, Refuse):
            return _problem_outcome(outcome.error), None
        if isinstance(outcome, Failed):
            if outcome.store_error is not None:
                return "store_unavailable", None
            if outcome.response is not None:
                return "executed", len(outcome.response.body)
            return "released_error", None
        assert isinstance(outcome, PassThrough)
        return "store_unavailable", None  # fail_open: the app ran unprotected

    def decided(self, outcome: Outcome) -> Decision | None:
        """The decision ``outcome`` comes to, to emit (None: it is counted already)."""
        name, size = self._named(outcome)
        return self._decision(name, self._status(outcome), size)

    def refused(self, problem: ProblemError) -> Decision | None:
        """The decision for a request refused before the flow (None: counted already)."""
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


class CountingWatch(Watch):
    """The watch of a surface whose one hook is a :class:`~oncely.events.CountingHook` and
    whose decision log is off: each store operation's time and the outcome go straight to the
    hook's count when the request is decided; no Decision or StoreOperation is made, and the
    clock is read only around store operations."""

    __slots__ = ("timed",)

    def __init__(self, observer: Observer, route: str) -> None:
        self.observer, self.route = observer, route
        self.timed: list[tuple[str, float]] = []
        self.kept_size: int | None = None
        self.emitted = False

    def operation(self, op: object, began: float, result: object) -> None:
        kind = type(op)
        self.timed.append((OP_NAMES[kind], _perf_counter() - began))
        if kind is Complete and result is not False and not isinstance(result, Exception):
            self.kept_size = len(op.response.body)  # type: ignore[attr-defined]  # a Complete

    def decided(self, outcome: Outcome) -> None:
        name: OutcomeName
        if type(outcome) is Replay:  # the most frequent, named here without a call
            name, size = "replayed", None
        else:
            name, size = self._named(outcome)
        observer = self.observer
        self.emitted = True
        hook = observer.counting
        assert hook is not None  # a CountingWatch is made only for a counting hook
        try:
            hook.count(
                name,
                self.route,
                observer.surface,
                observer.store,
                size if name == "executed" else None,
                self.timed,
            )
        except Exception as exc:
            observer._failed(hook, exc)

    def refused(self, problem: ProblemError) -> None:
        self.decided(Refuse(problem))


_perf_counter = time.perf_counter
_time = time.time
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

    __slots__ = ("counting", "hook_failures", "hooks", "store", "surface")

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
        #: The one hook, when it only counts: it is told each decision straight from its watch.
        self.counting: CountingHook | None = None
        if len(self.hooks) == 1 and isinstance(self.hooks[0], CountingHook):
            self.counting = self.hooks[0]

    def start(
        self, method: str, raw: Mapping[str, Any], route: str | None, app: object = None
    ) -> Watch | None:
        """A watch for one request (``raw``: its ASGI scope or WSGI environ; ``route``: the
        pattern of the Route that matched; ``app``: the app the middleware wraps), or None
        when nobody listens."""
        if decisions_log.isEnabledFor(logging.INFO):
            return Watch(self, method, route_template(raw, route, app))
        if self.counting is not None:
            return CountingWatch(self, route_template(raw, route, app))
        if self.hooks:
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
            decision = watch.refused(problem)
            if decision is not None:
                self.emit(decision)

    async def arefused(self, watch: Watch | None, problem: ProblemError) -> None:
        if watch is not None and not watch.emitted:
            decision = watch.refused(problem)
            if decision is not None:
                await self.aemit(decision)
