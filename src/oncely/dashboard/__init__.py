"""A live dashboard of oncely's decisions: an ASGI app to mount, fed by an ``on_decision`` hook.

    from oncely.dashboard import Dashboard

    dashboard = Dashboard(store=store)                       # the store: in-flight keys, stats()
    app = IdempotencyMiddleware(app, store=store, on_decision=dashboard.record)
    # and serve ``dashboard`` (an ASGI app) under a path of yours, e.g. Starlette's
    # Mount("/dashboard", app=dashboard)

The page (no build step, nothing fetched from elsewhere) shows decisions per second by outcome,
the replay ratio, the keys in flight and their leases (from ``store.stats()``), recent conflicts
and payload mismatches (hashed keys only), the store's latency p50/p99 (from
``Decision.store_seconds``) and any ``panels`` given: name -> a callable (sync or async)
answering a JSON object (the reference service's demo adds its ledger audit).

It is live over server-sent events (``events``), with a polling fallback (``snapshot.json``).
Memory is bounded: per-second counts for ``window`` seconds, the last ``recent`` conflicts and
the last ``samples`` store latencies. It shows hashed keys and tenants only; still, mount it
where only operators can reach it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from importlib import resources
from typing import Any

from ..events import OUTCOMES, AsyncInspectable, Decision, Inspectable

__all__ = ["Dashboard", "Panel"]

Panel = Callable[[], Awaitable[Mapping[str, Any]] | Mapping[str, Any]]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Outcomes listed among "recent conflicts and mismatches".
NOTABLE = frozenset({"in_flight", "payload_mismatch", "lease_lost", "store_unavailable"})


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Dashboard:
    """Aggregates decisions in memory (bounded) and serves them as a live page (ASGI)."""

    def __init__(
        self,
        *,
        store: object | None = None,
        panels: Mapping[str, Panel] | None = None,
        window: int = 300,
        recent: int = 50,
        samples: int = 4096,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.panels = dict(panels or {})
        self.interval = interval
        self._clock = clock
        self._window = window
        self._seconds: deque[tuple[int, Counter[str]]] = deque(maxlen=window)
        self._totals: Counter[str] = Counter()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._latency: deque[float] = deque(maxlen=samples)
        self._stats: tuple[float, Any] = (float("-inf"), None)
        self._page = resources.files(__package__).joinpath("page.html").read_text("utf-8")

    # The hook ---------------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        """The ``on_decision`` hook: count one decision (a few dict updates, no I/O)."""
        now = self._clock()
        second = int(now)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append((second, Counter()))
        self._seconds[-1][1][decision.outcome] += 1
        self._totals[decision.outcome] += 1
        if decision.store_seconds > 0:
            self._latency.append(decision.store_seconds)
        if decision.outcome in NOTABLE:
            self._recent.append(
                {
                    "at": now,
                    "outcome": decision.outcome,
                    "route": decision.route,
                    "method": decision.method,
                    "status": decision.status,
                    "key_hash": decision.key_hash,
                    "tenant_hash": decision.tenant_hash,
                }
            )

    # What the page shows ----------------------------------------------------------------------

    async def _store_stats(self) -> dict[str, Any] | None:
        """The store's stats, at most once a second whatever the number of viewers."""
        at, cached = self._stats
        now = time.monotonic()
        if now - at < 1.0:
            return cached  # type: ignore[no-any-return]
        store = self.store
        shown: dict[str, Any] | None = None
        try:
            if isinstance(store, AsyncInspectable) and inspect.iscoroutinefunction(store.stats):
                stats = await store.stats(limit=10)
            elif isinstance(store, Inspectable):
                stats = await asyncio.to_thread(store.stats, limit=10)
            else:
                stats = None
            if stats is not None:
                shown = {
                    "in_flight": stats.in_flight,
                    "completed": stats.completed,
                    "tombstones": stats.tombstones,
                    "expired": stats.expired,
                    "oldest_lease_left": stats.oldest_lease_left,
                    "keys": [
                        {
                            "key_hash": k.key_hash,
                            "attempt": k.attempt,
                            "lease_left": k.lease_left,
                            "age": k.age,
                        }
                        for k in stats.in_flight_keys
                    ],
                }
        except Exception as exc:  # the store is down: the page says so and carries on
            shown = {"error": f"{type(exc).__name__}: {exc}"}
        self._stats = (now, shown)
        return shown

    async def _panels(self) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        for name, panel in self.panels.items():
            try:
                value = panel()
                shown[name] = dict(await value if inspect.isawaitable(value) else value)
            except Exception as exc:
                shown[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return shown

    async def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready values."""
        now = self._clock()
        last = int(now)
        counts = {second: c for second, c in self._seconds}
        span = min(self._window, 120)
        series = [
            {"t": s, **{o: counts[s][o] for o in counts.get(s, {})}}
            for s in range(last - span + 1, last + 1)
        ]
        executed, replayed = self._totals["executed"], self._totals["replayed"]
        latency = list(self._latency)
        p50, p99 = _percentile(latency, 0.5), _percentile(latency, 0.99)
        previous = counts.get(last - 1, Counter())
        return {
            "now": now,
            "outcomes": list(OUTCOMES),
            "totals": dict(self._totals),
            "total": sum(self._totals.values()),
            "per_second": sum(previous.values()),
            "series": series,
            "replay_ratio": replayed / (executed + replayed) if executed + replayed else None,
            "latency_ms": {
                "p50": None if p50 is None else p50 * 1000,
                "p99": None if p99 is None else p99 * 1000,
                "samples": len(latency),
            },
            "recent": list(reversed(self._recent)),
            "store": await self._store_stats(),
            "panels": await self._panels(),
        }

    # The ASGI app -----------------------------------------------------------------------------

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        root = scope.get("root_path", "")
        path = scope.get("path", "/")
        if root and path.startswith(root):
            path = path[len(root) :]  # Starlette's Mount keeps the whole path
        path = path.rstrip("/")
        if path == "":
            page = self._page.replace("__BASE__", json.dumps(root.rstrip("/")))
            await _respond(send, 200, "text/html; charset=utf-8", page.encode())
        elif path == "/snapshot.json":
            body = json.dumps(await self.snapshot()).encode()
            await _respond(send, 200, "application/json", body)
        elif path == "/events":
            await self._events(receive, send)
        else:
            problem = {"type": "about:blank", "title": "Not Found", "status": 404}
            await _respond(send, 404, "application/problem+json", json.dumps(problem).encode())

    async def _events(self, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await send(
                {"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True}
            )
            while not gone.is_set():
                data = json.dumps(await self.snapshot())
                chunk = f"data: {data}\n\n".encode()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                try:
                    async with asyncio.timeout(self.interval):
                        await gone.wait()
                except TimeoutError:
                    pass
            await send({"type": "http.response.body", "body": b""})
        except OSError:
            pass  # the viewer went away mid-send
        finally:
            watcher.cancel()


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"cache-control", b"no-store")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
