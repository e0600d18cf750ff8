"""The middleware's own cost, in process: µs per request on the memory store, no HTTP.

    python benchmarks/overhead.py               # 30 rounds of 2,000 requests per case
    python benchmarks/overhead.py --rounds 10 --requests 1000 --cpu   # on a shared machine
    python benchmarks/overhead.py --rounds 10 --requests 500 --profile new

A trivial ASGI app (it reads the body and answers 201 JSON with a Location) is called directly
with ASGI messages, bare and behind ``IdempotencyMiddleware(store=AsyncMemoryStore())``. For
each round the bare app and the middleware run the same number of requests, alternated, and the
cost per request is the difference of their times over that number. Printed: the median and
the standard deviation over rounds, for new keys (every request a key never sent) and replays
(16 completed keys, cycled). ``--profile new|replay`` prints a cProfile of that case instead.
``--cpu`` times by the process's CPU clock: on a machine shared with other work it leaves out
the time the benchmark waited for a core (on a quiet machine the two should agree).

Latest numbers (Python 3.11.7, 2 cores shared with other work, load average 3 to 4; each the
best median of 5 runs of ``--rounds 10 --requests 1000 --cpu``, the stdev of that run, and the
range of the 5 medians), against the request path before it was cut down, runs alternated:

    case       now                          before
    new keys   42.0 µs (stdev 0.6; 42-49)   61.0 µs (stdev 0.9; 61-72)
    replays    19.5 µs (stdev 0.3; 19-20)   25.6 µs (stdev 0.3; 26-28)

By the wall clock (best of 3, the same machine): new keys 45.4 µs (stdev 3.1) against 63.5,
replays 19.3 µs (stdev 0.7) against 25.7.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from oncely import tenant_from_header
from oncely.asgi import IdempotencyMiddleware
from oncely.stores.memory import AsyncMemoryStore

Message = MutableMapping[str, Any]
App = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]], Any], Awaitable[None]]

BODY = json.dumps(
    {
        "amount": 1999,
        "currency": "EUR",
        "customer": "cus_8e03978e40d5",
        "description": "Order 1234: two tickets, seats 14 and 15, row F",
        "metadata": {"order_id": "ord_1234", "channel": "web", "campaign": "winter"},
        "payment_method": {"type": "card", "last4": "4242", "exp_month": 12, "exp_year": 2030},
        "capture": True,
        "statement_descriptor": "TICKETS",
    },
    separators=(",", ":"),
).encode()
ANSWER = b'{"id":"pay_1","status":"succeeded","amount":1999,"currency":"EUR"}'
ANSWER_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(ANSWER)).encode()),
    (b"location", b"/payments/pay_1"),
]


async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """The endpoint: reads its body and answers 201 with JSON and a Location."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 201, "headers": ANSWER_HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def _scope(key: bytes) -> dict[str, Any]:
    # The headers a real client sends (as uvicorn hands them over: lower-case names).
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/payments",
        "raw_path": b"/payments",
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"wrk"),
            (b"accept", b"*/*"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"x-tenant-id", b"tenant-1"),
            (b"idempotency-key", key),
        ],
    }


_REQUEST: Message = {"type": "http.request", "body": BODY, "more_body": False}


async def _receive() -> Message:
    return _REQUEST


async def _send(message: Message) -> None:
    return None


# Wall-clock time by default; --cpu times by the process's CPU clock instead, which leaves out
# the time it waited for a core (on a machine shared with other work).
_clock = time.perf_counter


async def _run(target: App, scopes: list[dict[str, Any]]) -> float:
    """Seconds to serve every scope, one after another."""
    receive, send, clock = _receive, _send, _clock
    start = clock()
    for scope in scopes:
        await target(scope, receive, send)
    return clock() - start


class Case:
    """New keys or replays: the scopes of each round."""

    def __init__(self, mode: str, requests: int) -> None:
        self.mode, self.requests, self.counter = mode, requests, 0
        self.mw = IdempotencyMiddleware(
            app, store=AsyncMemoryStore(), tenant=tenant_from_header("X-Tenant-Id")
        )
        self.replay_keys = [f"replay-{i:02d}".encode() for i in range(16)]

    async def warm(self) -> None:
        for key in self.replay_keys:
            await self.mw(_scope(key), _receive, _send)

    def scopes(self) -> list[dict[str, Any]]:
        if self.mode == "replay":
            keys = self.replay_keys
            return [_scope(keys[i % len(keys)]) for i in range(self.requests)]
        start, self.counter = self.counter, self.counter + self.requests
        return [_scope(f"new-{n:09d}".encode()) for n in range(start, self.counter)]


async def measure(mode: str, rounds: int, requests: int) -> list[float]:
    """µs per request that the middleware adds, one value per round."""
    case = Case(mode, requests)
    await case.warm()
    await _run(case.mw, case.scopes())  # warm-up round
    costs: list[float] = []
    gc.collect()
    for _ in range(rounds):
        bare_scopes, mw_scopes = case.scopes(), case.scopes()
        bare = await _run(app, bare_scopes)
        protected = await _run(case.mw, mw_scopes)
        costs.append((protected - bare) / requests * 1e6)
    return costs


async def profile(mode: str, requests: int) -> None:
    case = Case(mode, requests)
    await case.warm()
    scopes = case.scopes()
    profiler = cProfile.Profile()
    profiler.enable()
    await _run(case.mw, scopes)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--profile", choices=("new", "replay"))
    parser.add_argument(
        "--cpu", action="store_true", help="time by the process's CPU clock, not the wall clock"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.requests < 1:
        parser.error("--rounds must be at least 2 and --requests at least 1")
    if args.profile:
        asyncio.run(profile(args.profile, args.requests))
        return 0
    global _clock
    if args.cpu:
        _clock = time.process_time
    print(
        f"oncely middleware overhead, memory store, {args.rounds} rounds x {args.requests}"
        f" ({'CPU' if args.cpu else 'wall'} clock)"
    )
    print(f"Python {sys.version.split()[0]}; µs per request over the bare app")
    for mode, label in (("new", "new keys"), ("replay", "replays")):
        costs = asyncio.run(measure(mode, args.rounds, args.requests))
        print(
            f"  {label:9s} median {statistics.median(costs):6.1f} µs   "
            f"stdev {statistics.stdev(costs):5.1f} µs   "
            f"min {min(costs):6.1f}   max {max(costs):6.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
