"""Prometheus metrics for every decision (``pip install 'oncely[metrics]'``).

    from oncely.metrics import Metrics
    metrics = Metrics(store=store)              # registers on prometheus_client's REGISTRY
    app = IdempotencyMiddleware(app, store=store, tenant=..., on_decision=metrics)

=========================================== ========= ===========================================
name                                        type      labels
=========================================== ========= ===========================================
``oncely_decisions_total``                  counter   outcome (one of OUTCOMES), route, surface
``oncely_store_operation_duration_seconds`` histogram store, operation (100 µs to 1 s buckets)
``oncely_stored_response_size_bytes``       histogram surface
``oncely_hook_failures_total``              counter   (the hooks beside this one that raised)
``oncely_in_flight_keys``                   gauge     store (only for a store with ``stats()``)
=========================================== ========= ===========================================

Labels are bounded: routes are templates (never raw paths), outcomes come from
:data:`oncely.events.OUTCOMES`. ``oncely_in_flight_keys`` asks the store at scrape time
(:class:`~oncely.events.Inspectable`); for an async store call ``await metrics.refresh()``
before rendering. Under gunicorn with several workers use prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``): the counters and histograms are summed across workers by
``MultiProcessCollector``; register ``metrics.in_flight`` on the registry you render, since the
store is shared and any one worker's answer is the whole truth.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ._observe import store_kind
from .events import OUTCOMES, AsyncInspectable, Decision, Inspectable

__all__ = ["OPERATION_BUCKETS", "SIZE_BUCKETS", "InFlightCollector", "Metrics"]

OPERATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
SIZE_BUCKETS = tuple(float(4**n) for n in range(3, 12))  # 64 B to 4 MiB


class InFlightCollector(Collector):
    """``oncely_in_flight_keys{store}``, from the store's ``stats()`` at scrape time."""

    def __init__(self, store: object) -> None:
        self.store, self.kind = store, store_kind(store)
        self.last: int | None = None

        self.is_async = inspect.iscoroutinefunction(getattr(store, "stats", None))

    async def refresh(self) -> None:
        if self.is_async:
            store: AsyncInspectable = self.store  # type: ignore[assignment]
            self.last = (await store.stats(limit=0)).in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = self.last
        if not self.is_async:
            store: Inspectable = self.store  # type: ignore[assignment]
            value = store.stats(limit=0).in_flight
        gauge = GaugeMetricFamily(
            "oncely_in_flight_keys", "Keys claimed and not yet completed", labels=["store"]
        )
        if value is not None:
            gauge.add_metric([self.kind], value)
        yield gauge


class Metrics:
    """An ``on_decision`` hook that counts decisions into Prometheus metrics."""

    def __init__(
        self, *, registry: CollectorRegistry = REGISTRY, store: object | None = None
    ) -> None:
        self.decisions = Counter(
            "oncely_decisions",
            "Idempotency decisions, by outcome",
            ["outcome", "route", "surface"],
            registry=registry,
        )
        self.operations = Histogram(
            "oncely_store_operation_duration_seconds",
            "Time a decision waited on one store operation",
            ["store", "operation"],
            buckets=OPERATION_BUCKETS,
            registry=registry,
        )
        self.sizes = Histogram(
            "oncely_stored_response_size_bytes",
            "Bytes of the responses kept for replay",
            ["surface"],
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.hook_failures = Counter(
            "oncely_hook_failures", "on_decision hooks that raised", registry=registry
        )
        self._counters: dict[tuple[str, str, str], Counter] = {}
        self._timers: dict[str, dict[str, Histogram]] = {}  # store -> operation -> child
        self._sizes: dict[str, Histogram] = {}
        self.in_flight: InFlightCollector | None = None
        if store is not None and callable(getattr(store, "stats", None)):
            self.in_flight = InFlightCollector(store)
            registry.register(self.in_flight)

    async def refresh(self) -> None:
        """Ask an async store how many keys are in flight (before rendering the metrics)."""
        if self.in_flight is not None:
            await self.in_flight.refresh()

    def hook_failed(self) -> None:
        self.hook_failures.inc()

    def __call__(self, decision: Decision) -> None:
        # The labelled children are kept, bound once per label set: ``labels()`` costs more
        # than the count itself, so a decision is one ``inc()`` and one ``observe()`` per store
        # operation (and one for the size of an answer kept).
        outcome = decision.outcome
        labels = (outcome, decision.route, decision.surface)
        counter = self._counters.get(labels)
        if counter is None:
            if outcome not in OUTCOMES:
                return  # a bounded label set: nothing else is counted
            counter = self._counters[labels] = self.decisions.labels(*labels)
        counter.inc()
        operations = decision.operations
        if operations:
            store = decision.store
            timers = self._timers.get(store)
            if timers is None:
                timers = self._timers[store] = {}
            for op in operations:
                timer = timers.get(op.name)
                if timer is None:
                    timer = timers[op.name] = self.operations.labels(store, op.name)
                timer.observe(op.seconds)
        if outcome == "executed":
            size = decision.response_size
            if size is not None:
                sizes = self._sizes.get(decision.surface)
                if sizes is None:
                    sizes = self._sizes[decision.surface] = self.sizes.labels(decision.surface)
                sizes.observe(size)
