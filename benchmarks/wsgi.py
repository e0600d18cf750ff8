"""WSGI and decorator throughput: Flask under gunicorn with and without oncely, and an empty
function with and without ``@idempotent``, on SQLite, PostgreSQL and Redis.

    .venv/bin/python benchmarks/wsgi.py [--seconds 5] [--threads 8] [--connections 16]

Run by hand from the project's virtualenv (``make test`` installs flask and gunicorn there);
needs ``wrk`` (``apt-get install -y wrk``). For each store: gunicorn (one worker, threads)
serves ``benchmarks/wsgi_app.py`` bare and behind the middleware; wrk sends new keys, then
replays (``load.lua``). Then one thread calls an empty function in a loop, bare and decorated
with a new key per call, and again with one key (every call a replay). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
# The body wrk sends (load.lua), so the keys sent before the replays have its fingerprint.
LOAD_BODY = re.search(r"body = \[\[(.*?)\]\]", (HERE / "load.lua").read_text()).group(1)  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def gunicorn(target: str, store: str, prefix: str, threads: int) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "BENCH_TARGET": target, "BENCH_STORE": store, "BENCH_PREFIX": prefix}
    env["PYTHONPATH"] = str(HERE)
    command = [
        str(BIN / "gunicorn"), "--workers", "1", "--threads", str(threads),
        "--bind", f"127.0.0.1:{port}", "wsgi_app:app",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                httpx.get(url, timeout=1)
                break
            time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def wrk(url: str, mode: str, nonce: str, seconds: float, connections: int) -> float:
    if mode == "replay":  # the keys the replays cycle over, sent once first
        for i in range(16):
            httpx.post(
                f"{url}/payments",
                content=LOAD_BODY,
                headers={"Idempotency-Key": f"{nonce}-{i}", "X-Tenant-Id": "acme",
                         "Content-Type": "application/json"},
            )  # fmt: skip
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-s", str(HERE / "load.lua"),
         url, "--", mode, nonce, "16", "acme"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"^BENCH (\{.*\})$", done.stdout, re.M)
    assert match is not None, done.stdout
    result = json.loads(match.group(1))
    return float(result["requests"] / (result["duration_us"] / 1e6))


def calls_per_second(fn: Callable[[int], object], seconds: float) -> float:
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(50):
            fn(n)
            n += 1
    return n / elapsed


def decorator_rates(store: str, options: dict[str, str], seconds: float) -> tuple[float, ...]:
    from oncely import idempotent, open_store

    opened = open_store(store, **options)
    nonce = secrets.token_hex(4)

    def empty(n: int) -> None:
        return None

    new = idempotent(store=opened, prefix=f"bench.{nonce}", key=lambda n: n)(empty)
    same = idempotent(store=opened, prefix=f"bench.{nonce}.same", key=lambda n: "one")(empty)
    try:
        return (
            calls_per_second(empty, seconds),
            calls_per_second(new, seconds),
            calls_per_second(same, seconds),
        )
    finally:
        opened.close()


def clean_up(prefix: str) -> None:
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    prefix = f"bench_wsgi_{secrets.token_hex(4)}"
    scratch = HERE / ".scratch"
    scratch.mkdir(exist_ok=True)
    stores = {
        "sqlite": (f"sqlite:{scratch / (prefix + '.db')}", {}),
        "postgres": (PG_URL, {"schema": prefix}),
        "redis": (REDIS_URL, {"prefix": f"{prefix}:"}),
    }
    rows = []
    try:
        with gunicorn("bare", "", prefix, args.threads) as url:
            bare = {m: wrk(url, m, secrets.token_hex(4), args.seconds, args.connections)
                    for m in ("new", "replay")}  # fmt: skip
        for name, (store, options) in stores.items():
            with gunicorn("oncely", store, prefix, args.threads) as url:
                rates = {m: wrk(url, m, secrets.token_hex(4), args.seconds, args.connections)
                         for m in ("new", "replay")}  # fmt: skip
            calls = decorator_rates(store, options, args.seconds)
            rows.append((name, rates, calls))
    finally:
        clean_up(prefix)
    print(f"| WSGI (gunicorn, 1 worker, {args.threads} threads; req/s) | new keys | replays |")
    print("|---|---:|---:|")
    print(f"| Flask bare | {bare['new']:,.0f} | {bare['replay']:,.0f} |")
    for name, rates, _ in rows:
        print(f"| Flask + oncely.wsgi, {name} | {rates['new']:,.0f} | {rates['replay']:,.0f} |")
    print()
    print("| empty function (calls/s, one thread) | bare | @idempotent, new keys | replays |")
    print("|---|---:|---:|---:|")
    for name, _, (plain, new, same) in rows:
        print(f"| {name} | {plain:,.0f} | {new:,.0f} | {same:,.0f} |")


if __name__ == "__main__":
    main()
