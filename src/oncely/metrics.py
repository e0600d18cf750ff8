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
import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client import metrics as prometheus_metrics
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ._errors import StoreUnavailable
from ._observe import store_kind
from .events import OUTCOMES, AsyncInspectable, CountingHook, Inspectable, Outcome, Surface

__all__ = ["OPERATION_BUCKETS", "SIZE_BUCKETS", "InFlightCollector", "Metrics"]

log = logging.getLogger("oncely")

_bound_label: Callable[[float], str] = floatToGoString  # how prometheus-client writes a bound

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
            try:
                self.last = (await store.stats(limit=0)).in_flight
            except StoreUnavailable as exc:
                self.last = None
                self._unknown(exc)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = self.last
        if not self.is_async:
            store: Inspectable = self.store  # type: ignore[assignment]
            try:
                value = store.stats(limit=0).in_flight
            except StoreUnavailable as exc:
                value = None
                self._unknown(exc)
        gauge = GaugeMetricFamily(
            "oncely_in_flight_keys", "Keys claimed and not yet completed", labels=["store"]
        )
        if value is not None:
            gauge.add_metric([self.kind], value)
        yield gauge

    def _unknown(self, exc: StoreUnavailable) -> None:
        """The store cannot say: the gauge has no sample this scrape, and the other metrics
        still render (a scrape that fails whole would hide the outage it should show)."""
        log.warning("oncely: oncely_in_flight_keys left out of this scrape: %s", exc)


class _Family:
    """One counter or histogram as plain numbers per label set, for :class:`_Counts`.

    ``cells`` maps label values to (when the set was first counted, its numbers): a counter's
    ``[count]``, a histogram's ``[sum, count of each bucket ..., count over the last bound]``
    (per bucket, not cumulative; summed when rendered)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        buckets: Sequence[float] | None = None,
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.buckets = tuple(buckets) if buckets is not None else None
        self.cells: dict[tuple[str, ...], tuple[float, list[float]]] = {}

    def cell(self, values: tuple[str, ...]) -> list[float]:
        """The numbers of ``values``, made (zero) when first asked; under the lock."""
        made = self.cells.get(values)
        if made is None:
            size = 1 if self.buckets is None else len(self.buckets) + 2
            made = self.cells[values] = (time.time(), [0.0] * size)
        return made[1]

    def render(self, cells: dict[tuple[str, ...], tuple[float, list[float]]]) -> Metric:
        """The family Prometheus renders: the same samples as prometheus-client's own."""
        created = getattr(prometheus_metrics, "_use_created", True)
        if self.buckets is None:
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
            for values, (made, (count,)) in cells.items():
                counter.add_metric(values, count, created=made if created else None)
            return counter
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, (made, (total, *counts)) in cells.items():
            running, buckets = 0.0, []
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                buckets.append((_bound_label(bound), running))
            histogram.add_metric(values, buckets, total)
            if created:
                labelled = dict(zip(self.labels, values, strict=True))
                histogram.samples.append(Sample(f"{self.name}_created", labelled, made))
        return histogram


class _Counts(Collector):
    """What one :class:`Metrics` counted, given to Prometheus at scrape time."""

    def __init__(self, lock: threading.Lock, families: Sequence[_Family]) -> None:
        self.lock, self.families = lock, families

    def describe(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.render({})

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            snapshots = [
                {values: (made, list(cell)) for values, (made, cell) in family.cells.items()}
                for family in self.families
            ]
        for family, cells in zip(self.families, snapshots, strict=True):
            yield family.render(cells)


def _multiprocess() -> bool:
    """Whether prometheus-client's metrics write to its multiprocess files (it decides so once,
    from ``PROMETHEUS_MULTIPROC_DIR``, when it is imported)."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


_DECISIONS = ("oncely_decisions", "Idempotency decisions, by outcome")
_OPERATIONS = (
    "oncely_store_operation_duration_seconds",
    "Time a decision waited on one store operation",
)
_SIZES = ("oncely_stored_response_size_bytes", "Bytes of the responses kept for replay")


class Metrics(CountingHook):
    """An ``on_decision`` hook that counts decisions into Prometheus metrics.

    Alone on a surface (with the decision log off) it counts straight from the request, no
    :class:`~oncely.events.Decision` built (:class:`~oncely.events.CountingHook`).

    In one process a decision is counted as plain numbers under one lock, which the registry
    reads at scrape time: one call per decision, where prometheus-client's own metrics cost
    several calls and a lock for each number. Under prometheus-client's multiprocess mode its
    own metrics are used, since only they write to the files it shares between processes.
    """

    def __init__(
        self, *, registry: CollectorRegistry = REGISTRY, store: object | None = None
    ) -> None:
        self.hook_failures = Counter(
            "oncely_hook_failures", "on_decision hooks that raised", registry=registry
        )
        self._lock = threading.Lock()
        self._decisions = _Family(*_DECISIONS, ["outcome", "route", "surface"])
        self._operations = _Family(*_OPERATIONS, ["store", "operation"], OPERATION_BUCKETS)
        self._sizes = _Family(*_SIZES, ["surface"], SIZE_BUCKETS)
        # What each label set counts into, found once per label set and kept.
        self._counted: dict[tuple[str, str, str], list[float]] = {}
        self._timed: dict[tuple[str, str], list[float]] = {}
        self._kept: dict[str, list[float]] = {}
        self._shared: _Shared | None = None
        if _multiprocess():
            self._shared = _Shared(registry)
        else:
            registry.register(_Counts(self._lock, (self._decisions, self._operations, self._sizes)))
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

    def count(
        self,
        outcome: Outcome,
        route: str,
        surface: Surface,
        store: str,
        size: int | None,
        operations: Sequence[tuple[str, float]],
    ) -> None:
        if self._shared is not None:
            self._shared.count(outcome, route, surface, store, size, operations)
            return
        labels = (outcome, route, surface)
        with self._lock:
            counted = self._counted.get(labels)
            if counted is None:
                if outcome not in OUTCOMES:
                    return  # a bounded label set: nothing else is counted
                counted = self._counted[labels] = self._decisions.cell(labels)
            counted[0] += 1
            for name, seconds in operations:
                timed = self._timed.get((store, name))
                if timed is None:
                    timed = self._timed[(store, name)] = self._operations.cell((store, name))
                timed[0] += seconds
                timed[1 + bisect_left(OPERATION_BUCKETS, seconds)] += 1  # first bound >= it
            if size is not None:
                kept = self._kept.get(surface)
                if kept is None:
                    kept = self._kept[surface] = self._sizes.cell((surface,))
                kept[0] += size
                kept[1 + bisect_left(SIZE_BUCKETS, size)] += 1


class _Shared:
    """The same metrics as prometheus-client's own, which its multiprocess mode shares; each
    labelled child bound once (``labels()`` costs more than the count itself)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(*_DECISIONS, ["outcome", "route", "surface"], registry=registry)
        self.operations = Histogram(
            *_OPERATIONS, ["store", "operation"], buckets=OPERATION_BUCKETS, registry=registry
        )
        self.sizes = Histogram(*_SIZES, ["surface"], buckets=SIZE_BUCKETS, registry=registry)
        self._counted: dict[tuple[str, str, str], Callable[[], None]] = {}
        self._timed: dict[tuple[str, str], Callable[[float], None]] = {}
        self._kept: dict[str, Callable[[float], None]] = {}

    def count(
        self,
        outcome: Outcome,
        route: str,
        surface: Surface,
        store: str,
        size: int | None,
        operations: Sequence[tuple[str, float]],
    ) -> None:
        labels = (outcome, route, surface)
        inc = self._counted.get(labels)
        if inc is None:
            if outcome not in OUTCOMES:
                return  # a bounded label set: nothing else is counted
            inc = self._counted[labels] = self.decisions.labels(*labels).inc
        inc()
        for name, seconds in operations:
            observe = self._timed.get((store, name))
            if observe is None:
                observe = self._timed[(store, name)] = self.operations.labels(store, name).observe
            observe(seconds)
        if size is not None:
            kept = self._kept.get(surface)
            if kept is None:
                kept = self._kept[surface] = self.sizes.labels(surface).observe
            kept(size)
