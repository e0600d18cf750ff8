"""Claim and complete latency of oncely's stores, called directly, 32 concurrent clients.

    python stores.py --seconds 3 --concurrency 32 --store memory=memory: \
        --store sqlite=sqlite:/tmp/x.db --store 'redis=redis://127.0.0.1:6379/0 prefix=b:'
    python stores.py --side sync ...   # the sync side: 32 threads (or both: --side both)
    python stores.py --store 'redis-1=redis://127.0.0.1:6379/0 prefix=b: lanes=1' ...
                                       # async Redis with 1 round trip in flight (default 4)

run.py runs it pinned to the server's core and reads the JSON it prints. Three phases per store:

- claim (new key): every call wins a key never claimed before (INSERT);
- complete: completes the claim just won, with a 250-byte JSON response (UPDATE);
- claim (replay): every call meets a completed record and gets it back, response included.

Each phase runs ``--seconds`` with ``--concurrency`` tasks on one event loop (the async side,
``open_async_store``) or as many threads (the sync side, ``open_store``); latencies are per call,
from the call to its result, so they include waiting behind the other 31 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from oncely import Claimed, Store, StoredResponse, open_async_store, open_store

RESPONSE = StoredResponse(
    status=201,
    headers=(("content-type", "application/json"), ("location", "/payments/pay_0123456789")),
    body=json.dumps(
        {
            "id": "pay_0123456789abcdef0123456789abcdef",
            "object": "payment",
            "status": "succeeded",
            "amount": 2599,
            "currency": "EUR",
            "customer": "cus_8f2b6c1d4e",
            "description": "Order 10482: 2x coffee beans 1kg, express shipping",
            "created": "2026-01-01T00:00:00+00:00",
        }
    ).encode(),
)
FINGERPRINT = "v1:" + "ab" * 32
TTL = 24 * 3600.0
TOMBSTONE_TTL = 7 * 24 * 3600.0


def _summary(samples: list[float], seconds: float) -> dict[str, float]:
    if not samples:
        return {"calls": 0, "per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(samples)
    return {
        "calls": len(ordered),
        "per_s": len(ordered) / seconds,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


async def _bench(url: str, options: dict[str, Any], seconds: float, concurrency: int) -> dict:
    options = dict(options)
    lanes = options.pop("lanes", None)
    store = open_async_store(url, **options)
    if lanes is not None:
        # Benchmark-only: how many round trips the store's natural batching keeps in flight
        # (stores/_async/_io.py's Batcher); the stores have no option for it.
        batcher = getattr(store, "_batcher", None)
        if batcher is None or not hasattr(batcher, "lanes"):
            raise SystemExit(f"lanes={lanes}: this store has no batcher with lanes")
        batcher.lanes = int(lanes)
    run = secrets.token_hex(4)
    claims: list[float] = []
    completes: list[float] = []
    replays: list[float] = []
    lost: list[str] = []
    try:
        # Connect (and create the schema) before timing anything.
        warm = await store.claim(f"{run}-warm", FINGERPRINT, lease=60.0)
        if isinstance(warm, Claimed):
            await store.complete(warm, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)

        async def fresh(worker: int, deadline: float) -> None:
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                t0 = time.perf_counter()
                claim = await store.claim(f"{run}-{worker}-{n}", FINGERPRINT, lease=60.0)
                t1 = time.perf_counter()
                if not isinstance(claim, Claimed):
                    lost.append("a new key was not won")
                    continue
                done = await store.complete(claim, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)
                t2 = time.perf_counter()
                if not done:
                    lost.append("a claim could not complete")
                claims.append(t1 - t0)
                completes.append(t2 - t1)

        start = time.perf_counter()
        await asyncio.gather(*(fresh(w, start + seconds) for w in range(concurrency)))
        fresh_seconds = time.perf_counter() - start

        keys = [f"{run}-replay-{w}" for w in range(concurrency)]
        for key in keys:
            claim = await store.claim(key, FINGERPRINT, lease=60.0)
            assert isinstance(claim, Claimed)
            await store.complete(claim, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)

        async def replay(key: str, deadline: float) -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                found = await store.claim(key, FINGERPRINT, lease=60.0)
                replays.append(time.perf_counter() - t0)
                if isinstance(found, Claimed):
                    lost.append("a completed key was claimed again")

        start = time.perf_counter()
        await asyncio.gather(*(replay(key, start + seconds) for key in keys))
        replay_seconds = time.perf_counter() - start
    finally:
        await store.aclose()
    return {
        "claim_new": _summary(claims, fresh_seconds),
        "complete": _summary(completes, fresh_seconds),
        "claim_replay": _summary(replays, replay_seconds),
        "problems": sorted(set(lost)),
    }


def _threads(count: int, work: Callable[[int], None]) -> float:
    """Run ``work(i)`` in ``count`` threads at once; the seconds they took."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _bench_sync(url: str, options: dict[str, Any], seconds: float, concurrency: int) -> dict:
    """The same three phases on the sync side, one thread per client."""
    store: Store = open_store(url, **options)
    run = secrets.token_hex(4)
    claims: list[float] = []
    completes: list[float] = []
    replays: list[float] = []
    lost: list[str] = []
    try:
        warm = store.claim(f"{run}-warm", FINGERPRINT, lease=60.0)
        if isinstance(warm, Claimed):
            store.complete(warm, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)
        deadline = time.perf_counter() + seconds

        def fresh(worker: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                t0 = time.perf_counter()
                claim = store.claim(f"{run}-{worker}-{n}", FINGERPRINT, lease=60.0)
                t1 = time.perf_counter()
                if not isinstance(claim, Claimed):
                    lost.append("a new key was not won")
                    continue
                if not store.complete(claim, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL):
                    lost.append("a claim could not complete")
                claims.append(t1 - t0)
                completes.append(time.perf_counter() - t1)

        fresh_seconds = _threads(concurrency, fresh)
        keys = [f"{run}-replay-{w}" for w in range(concurrency)]
        for key in keys:
            claim = store.claim(key, FINGERPRINT, lease=60.0)
            assert isinstance(claim, Claimed)
            store.complete(claim, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)
        deadline = time.perf_counter() + seconds

        def replay(worker: int) -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                found = store.claim(keys[worker], FINGERPRINT, lease=60.0)
                replays.append(time.perf_counter() - t0)
                if isinstance(found, Claimed):
                    lost.append("a completed key was claimed again")

        replay_seconds = _threads(concurrency, replay)
    finally:
        store.close()
    return {
        "claim_new": _summary(claims, fresh_seconds),
        "complete": _summary(completes, fresh_seconds),
        "claim_replay": _summary(replays, replay_seconds),
        "problems": sorted(set(lost)),
    }


def _parse_store(text: str) -> tuple[str, str, dict[str, Any]]:
    name, _, rest = text.partition("=")
    url, *pairs = rest.split()
    return name, url, dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--store", action="append", default=[], help="NAME=URL [OPTION=VALUE]")
    parser.add_argument("--side", choices=["async", "sync", "both"], default="async")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    sides = ["async", "sync"] if args.side == "both" else [args.side]
    for text, side in [(text, side) for text in args.store for side in sides]:
        name, url, options = _parse_store(text)
        if args.side == "both":
            name = f"{name} ({side})"
        try:
            if side == "sync":
                outcome = _bench_sync(url, options, args.seconds, args.concurrency)
            elif args.loop == "uvloop":
                import uvloop

                outcome = uvloop.run(_bench(url, options, args.seconds, args.concurrency))
            else:
                outcome = asyncio.run(_bench(url, options, args.seconds, args.concurrency))
        except Exception as exc:
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        results[name] = outcome
    print(json.dumps(results))


if __name__ == "__main__":
    main()
