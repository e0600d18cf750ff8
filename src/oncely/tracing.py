"""OpenTelemetry spans for every decision (``pip install 'oncely[otel]'``, the API only).

    from oncely.tracing import Tracing
    app = IdempotencyMiddleware(app, store=..., tenant=..., on_decision=Tracing())

Under the request's span (the current one when the hook runs: the ASGI or WSGI request's, or
the caller's for ``@idempotent``): a child span per store operation, ``oncely.claim``,
``oncely.complete``, ``oncely.release``, ``oncely.record_phase``, with the times the driver
measured, and ``oncely.replay`` for a replayed answer. Attributes: ``oncely.outcome``,
``oncely.route``, ``oncely.surface``, ``oncely.store``, ``oncely.key_hash``,
``oncely.attempt``, ``oncely.conflict`` (in_flight, payload_mismatch) and
``oncely.response_size``. A conflict or a mismatch is an attribute, not an error: only a store
operation that failed sets its span's status to ERROR. The request's span gets
``oncely.outcome`` too.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, TracerProvider

from .events import Decision

__all__ = ["Tracing"]

_CONFLICTS = frozenset({"in_flight", "payload_mismatch"})


class Tracing:
    """An ``on_decision`` hook that records the decision's spans."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("oncely", tracer_provider=tracer_provider)

    def __call__(self, decision: Decision) -> None:
        attributes: dict[str, str | int] = {
            "oncely.outcome": decision.outcome,
            "oncely.route": decision.route,
            "oncely.surface": decision.surface,
            "oncely.store": decision.store,
        }
        if decision.key_hash is not None:
            attributes["oncely.key_hash"] = decision.key_hash
        if decision.attempt is not None:
            attributes["oncely.attempt"] = decision.attempt
        parent = trace.get_current_span()
        if parent.is_recording():
            parent.set_attribute("oncely.outcome", decision.outcome)
        end = 0
        for op in decision.operations:
            start = int(op.started * 1e9)
            end = start + int(op.seconds * 1e9)
            span = self.tracer.start_span(
                f"oncely.{op.name}", start_time=start, attributes=attributes
            )
            if op.name == "claim" and decision.outcome in _CONFLICTS:
                span.set_attribute("oncely.conflict", decision.outcome)
            if op.name == "complete" and decision.response_size is not None:
                span.set_attribute("oncely.response_size", decision.response_size)
            if op.failed:
                span.set_status(Status(StatusCode.ERROR, "the store failed this operation"))
            span.end(end_time=end)
        if decision.outcome == "replayed":
            span = self.tracer.start_span(
                "oncely.replay", start_time=end or None, attributes=attributes
            )
            if decision.response_size is not None:
                span.set_attribute("oncely.response_size", decision.response_size)
            span.end(end_time=max(end, time.time_ns()))
