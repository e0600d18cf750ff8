"""What watching every decision costs: requests/s with metrics and decision logging on and off.

    .venv/bin/python benchmarks/observe.py --quick     # 5 rounds of 1 s per mode
    .venv/bin/python benchmarks/observe.py             # 15 rounds of 2 s per mode

In one process and one run, the light handler (a JSON 201) behind ``oncely.asgi`` on the memory
store is called straight through ASGI (no server, no sockets: the worst case for overhead,
since nothing else takes time). Modes alternate round by round, so a machine that slows down
slows every mode alike:

- ``off``: no ``on_decision`` hook, ``oncely.decisions`` not enabled (nothing is built);
- ``metrics``: ``oncely.metrics.Metrics`` as the hook;
- ``metrics+logs``: the hook, and one JSON line per decision (``oncely.logs.JSONFormatter``)
  to a file.

Each mode runs with new keys (claim, run, complete) and with replays (claim finds the answer).
Prints requests/s per mode (median of the rounds, and the spread min-max) and the cost of each
mode against ``off``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from collections.abc import MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry

from oncely import tenant_from_header
from oncely.asgi import IdempotencyMiddleware
from oncely.logs import JSONFormatter
from oncely.metrics import Metrics

BODY = b'{"amount":100,"currency":"EUR"}'


async def handler(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id":"pay_1","status":"ok"}'})


def make_app(mode: str) -> IdempotencyMiddleware:
    hooks = [] if mode == "off" else [Metrics(registry=CollectorRegistry())]
    return IdempotencyMiddleware(
        handler, store="memory:", tenant=tenant_from_header("X-Tenant"), on_decision=hooks
    )


async def rate(app: IdempotencyMiddleware, seconds: float, replay: bool, salt: str) -> float:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    n = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(100):
            key = f"{salt}-replay" if replay else f"{salt}-{n}"
            scope = {
                "type": "http",
                "method": "POST",
                "path": "/payments",
                "query_string": b"",
                "headers": [
                    (b"idempotency-key", key.encode()),
                    (b"x-tenant", b"acme"),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(BODY)).encode()),
                ],
            }
            await app(scope, receive, send)
            n += 1
        sent.clear()
    return n / (time.perf_counter() - start)


def logging_for(mode: str, path: str) -> logging.Handler | None:
    logger = logging.getLogger("oncely")
    if mode != "metrics+logs":
        logger.setLevel(logging.WARNING)
        return None
    handler = logging.FileHandler(path)
    handler.setFormatter(JSONFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds of 1 s per mode")
    args = parser.parse_args()
    rounds, seconds = (5, 1.0) if args.quick else (15, 2.0)
    modes = ["off", "metrics", "metrics+logs"]
    apps = {m: make_app(m) for m in modes}
    results: dict[tuple[str, bool], list[float]] = {(m, r): [] for m in modes for r in (0, 1)}
    log_path = os.path.join(tempfile.mkdtemp(prefix="oncely-observe-"), "decisions.log")
    for round_ in range(rounds):
        for replay in (False, True):
            for mode in modes if round_ % 2 == 0 else reversed(modes):
                handler = logging_for(mode, log_path)
                try:
                    salt = f"{mode}-{round_}"
                    results[(mode, replay)].append(await rate(apps[mode], seconds, replay, salt))
                finally:
                    if handler is not None:
                        logging.getLogger("oncely").removeHandler(handler)
                        handler.close()
    print(f"{rounds} rounds of {seconds:g} s per mode; requests/s, median (min-max)")
    for replay in (False, True):
        print("replays" if replay else "new keys")
        base = statistics.median(results[("off", replay)])
        for mode in modes:
            values = results[(mode, replay)]
            median = statistics.median(values)
            cost = (1 - median / base) * 100
            print(
                f"  {mode:<13} {median:8.0f} ({min(values):.0f}-{max(values):.0f})"
                f"  {cost:+5.1f} % vs off"
            )


if __name__ == "__main__":
    asyncio.run(main())
