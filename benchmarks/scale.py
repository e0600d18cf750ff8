"""Does a store's cost grow with the work it holds? Claims and replays with N records already
there against an empty store; a purge of N expired records under live traffic; bytes per record.

    .venv/bin/python benchmarks/scale.py                       # 1,000,000 records per store
    .venv/bin/python benchmarks/scale.py --records 100000 --store sqlite --seconds 2

For each durable store (SQLite, PostgreSQL, Redis; ``--store`` picks):

1. fills a store of its own (own file, schema or key prefix) with N completed records through
   the store's own API (claim + complete, 128 at once, so batching packs the fill), each with a
   1 KiB response body, and reports bytes per record (SQLite: the file; Postgres:
   ``pg_total_relation_size``; Redis: ``used_memory``) and what a day at 1,000 req/s takes;
2. runs the phases of ``stores.py`` (claim new, complete, replay; 32 clients) on an empty store and
   on the full one, alternated ``--rounds`` times, and reports each side's median and the ratio;
3. fills another store with N records that expire at once, then runs live claim + complete
   traffic alone, and again while ``purge(limit=--purge-batch)`` runs in a loop until nothing is
   left, paced as ``oncely purge`` paces it (``--purge-pause``: ``auto``, a pause as long as the
   batch took, or seconds; repeat the flag to compare, each on a fresh fill): the live p99
   alone and during the purge, and how long the purge took.

Everything it wrote is removed at the end. The machine it runs on is shared: read the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from oncely import AsyncStore, Claimed, StoredResponse, open_async_store
from stores import FINGERPRINT, RESPONSE, TOMBSTONE_TTL, TTL, _bench, _summary

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DAY = 24 * 3600 * 1000  # records a day at 1,000 requests per second
#: The fill's response: the headers of stores.py's, a 1 KiB body.
KIB = StoredResponse(
    status=RESPONSE.status,
    headers=RESPONSE.headers,
    body=RESPONSE.body[:-1] + b', "note": "' + b"x" * (1024 - len(RESPONSE.body) - 12) + b'"}',
)
assert len(KIB.body) == 1024, len(KIB.body)


class Target:
    """One store of its own: where it lives, how to measure it, how to remove it."""

    def __init__(self, kind: str, scratch: Path, run: str, name: str) -> None:
        self.kind, self.name = kind, f"scale_{run}_{name}"
        if kind == "sqlite":
            self.path = scratch / f"{self.name}.db"
            self.url, self.options = f"sqlite:{self.path}", {}
        elif kind == "postgres":
            self.url, self.options = PG_URL, {"schema": self.name}
        else:
            self.url, self.options = REDIS_URL, {"prefix": f"{self.name}:"}

    def open(self) -> AsyncStore:
        return open_async_store(self.url, **self.options)

    async def size(self) -> int:
        if self.kind == "sqlite":
            return sum(
                p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.exists()
            )
        if self.kind == "postgres":
            import psycopg

            async with await psycopg.AsyncConnection.connect(PG_URL) as conn:
                cur = await conn.execute(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relkind = 'r'",
                    (self.name,),
                )
                row = await cur.fetchone()
                return int(row[0]) if row else 0
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            info = await client.info("memory")
            return int(info["used_memory"])
        finally:
            await client.aclose()

    async def remove(self) -> None:
        if self.kind == "sqlite":
            for p in self.path.parent.glob(self.path.name + "*"):
                p.unlink(missing_ok=True)
        elif self.kind == "postgres":
            import psycopg

            async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        else:
            import redis.asyncio as redis

            client = redis.Redis.from_url(REDIS_URL)
            try:
                batch = [k async for k in client.scan_iter(match=f"{self.name}:*", count=5000)]
                for at in range(0, len(batch), 5000):
                    await client.unlink(*batch[at : at + 5000])
            finally:
                await client.aclose()


async def fill(target: Target, records: int, *, ttl: float, tombstone_ttl: float) -> float:
    """N completed records through the store's API; the seconds it took."""
    store = target.open()
    queue = iter(range(records))
    began = time.perf_counter()

    async def worker() -> None:
        for n in queue:
            claim = await store.claim(f"fill-{n}", FINGERPRINT, lease=60.0)
            assert isinstance(claim, Claimed), claim
            await store.complete(claim, KIB, ttl=ttl, tombstone_ttl=tombstone_ttl)

    try:
        await asyncio.gather(*(worker() for _ in range(128)))
    finally:
        await store.aclose()
    return time.perf_counter() - began


async def live(store: AsyncStore, stop: asyncio.Event, concurrency: int) -> list[float]:
    """Claim + complete of new keys until ``stop``: each pair's seconds."""
    run = secrets.token_hex(4)
    samples: list[float] = []

    async def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            claim = await store.claim(f"live-{run}-{worker}-{n}", FINGERPRINT, lease=60.0)
            assert isinstance(claim, Claimed), claim
            await store.complete(claim, RESPONSE, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)
            samples.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(w) for w in range(concurrency)))
    return samples


async def purge_under_load(
    target: Target, seconds: float, concurrency: int, batch: int, pause: float | None
) -> dict[str, Any]:
    store = target.open()
    try:
        stop = asyncio.Event()
        task = asyncio.ensure_future(live(store, stop, concurrency))
        await asyncio.sleep(seconds)
        stop.set()
        alone = await task
        stop = asyncio.Event()
        task = asyncio.ensure_future(live(store, stop, concurrency))
        began, purged, batches = time.perf_counter(), 0, 0
        while True:
            t0 = time.perf_counter()
            n = await store.purge(limit=batch)
            purged, batches = purged + n, batches + 1
            if n < batch:
                break
            await asyncio.sleep(time.perf_counter() - t0 if pause is None else pause)
        purge_seconds = time.perf_counter() - began
        stop.set()
        during = await task
    finally:
        await store.aclose()
    return {
        "alone": _summary(alone, seconds),
        "during": _summary(during, purge_seconds),
        "purged": purged,
        "batches": batches,
        "purge_seconds": purge_seconds,
    }


def _median(rounds: list[dict[str, Any]], phase: str, field: str) -> float:
    return statistics.median(r[phase][field] for r in rounds)


async def compare(kind: str, args: argparse.Namespace, empty: Target, full: Target) -> None:
    """Bytes per record from the fill of ``full``; claims and replays, empty against full."""
    before = await full.size() if kind == "redis" else 0
    took = await fill(full, args.records, ttl=TTL, tombstone_ttl=TOMBSTONE_TTL)
    per = (await full.size() - before) / args.records
    print(
        f"{kind}: filled {args.records:,} records in {took:.0f} s "
        f"({args.records / took:,.0f}/s); {per:,.0f} bytes per record, "
        f"{per * DAY / 1e9:,.0f} GB for a day at 1,000 req/s"
    )
    sides: dict[str, list[dict[str, Any]]] = {"empty": [], "full": []}
    for round_ in range(args.rounds):
        order = (empty, full) if round_ % 2 == 0 else (full, empty)
        for target in order:
            side = "empty" if target is empty else "full"
            sides[side].append(
                await _bench(target.url, target.options, args.seconds, args.concurrency)
            )
    for phase, label in (("claim_new", "claim new"), ("claim_replay", "replay")):
        e, f = (_median(sides[s], phase, "per_s") for s in ("empty", "full"))
        e99, f99 = (_median(sides[s], phase, "p99_ms") for s in ("empty", "full"))
        spread = [r[phase]["per_s"] for r in sides["empty"] + sides["full"]]
        print(
            f"  {label:<9} empty {e:8,.0f}/s p99 {e99:6.2f} ms | {args.records:,} records "
            f"{f:8,.0f}/s p99 {f99:6.2f} ms | full/empty {f / e:4.2f} "
            f"(all runs {min(spread):,.0f}-{max(spread):,.0f}/s)"
        )


async def one_store(kind: str, args: argparse.Namespace, scratch: Path, run: str) -> None:
    empty, full, expired = (Target(kind, scratch, run, n) for n in ("empty", "full", "expired"))
    try:
        if not args.skip_compare:
            await compare(kind, args, empty, full)
        for pause in [] if args.skip_purge else args.purge_pause or [None]:
            await fill(expired, args.records, ttl=0.001, tombstone_ttl=0.0)
            await asyncio.sleep(1.0)
            p = await purge_under_load(
                expired, args.seconds, args.concurrency, args.purge_batch, pause
            )
            if kind == "redis":  # records carry their own expiry (PEXPIREAT): Redis drops them
                print("  (Redis drops expired records itself; purge only scans what is left)")
            paced = "auto" if pause is None else f"{pause:g} s"
            print(
                f"  purge of {p['purged']:,} expired records (batches of {args.purge_batch:,}, "
                f"pause {paced}): {p['purge_seconds']:.1f} s in {p['batches']:,} batches; "
                f"live claim+complete p99 {p['alone']['p99_ms']:.2f} ms alone, "
                f"{p['during']['p99_ms']:.2f} ms during the purge "
                f"({p['alone']['per_s']:,.0f}/s alone, {p['during']['per_s']:,.0f}/s during)"
            )
    finally:
        for target in (empty, full, expired):
            await target.remove()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--store", action="append", choices=["sqlite", "postgres", "redis"])
    parser.add_argument("--seconds", type=float, default=3.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3, help="empty/full alternations")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--purge-batch", type=int, default=1000, help="records per purge batch")
    parser.add_argument(
        "--purge-pause",
        action="append",
        type=lambda t: None if t == "auto" else float(t),
        help="auto (default: as long as the batch took) or seconds; repeat to compare",
    )
    parser.add_argument("--skip-compare", action="store_true", help="only the purge")
    parser.add_argument("--skip-purge", action="store_true", help="only the size and the compare")
    args = parser.parse_args()
    if args.records < 1:
        parser.error("--records must be at least 1")
    run = secrets.token_hex(3)
    with tempfile.TemporaryDirectory(prefix="oncely-scale-") as scratch:
        for kind in args.store or ["sqlite", "postgres", "redis"]:
            await one_store(kind, args, Path(scratch), run)


if __name__ == "__main__":
    asyncio.run(main())
