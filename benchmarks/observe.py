"""What watching every decision costs: requests/s with metrics and decision logging on and off.

    .venv/bin/python benchmarks/observe.py --quick     # 5 rounds of 1 s per mode
    .venv/bin/python benchmarks/observe.py             # 15 rounds of 2 s per mode
    .venv/bin/python benchmarks/observe.py --server    # uvicorn + wrk, 5 rounds of 5 s per mode

In one process and one run, the light handler (a JSON 201) behind ``oncely.asgi`` on the memory
store is called straight through ASGI (no server, no sockets: the worst case for overhead,
since nothing else takes time). Modes alternate round by round, so a machine that slows down
slows every mode alike:

- ``off``: no ``on_decision`` hook, ``oncely.decisions`` not enabled (nothing is built);
- ``metrics``: ``oncely.metrics.Metrics`` as the hook;
- ``metrics+logs``: the hook, and one JSON line per decision (``oncely.logs.JSONFormatter``)
  to a file.

With ``--server``, each mode is its own uvicorn server instead (one worker, uvloop, httptools,
no access log, pinned to CPU 0 where ``taskset`` exists) and wrk, another process pinned to
CPU 1, loads it with ``load.lua`` (32 connections); rounds alternate the servers in the same way.

Each mode runs with new keys (claim, run, complete) and with replays (claim finds the answer).
Prints requests/s per mode (median of the rounds, and the spread min-max) and the cost of each
mode against ``off``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
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


def make_app(mode: str, tenant_header: str = "X-Tenant") -> IdempotencyMiddleware:
    hooks = [] if mode == "off" else [Metrics(registry=CollectorRegistry())]
    return IdempotencyMiddleware(
        handler, store="memory:", tenant=tenant_from_header(tenant_header), on_decision=hooks
    )


def build() -> IdempotencyMiddleware:
    """The app of one ``--server`` mode, for ``uvicorn --factory observe:build``."""
    mode = os.environ["OBSERVE_MODE"]
    logging_for(mode, os.environ["OBSERVE_LOG"])
    return make_app(mode, tenant_header="X-Tenant-Id")


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


MODES = ["off", "metrics", "metrics+logs"]
HERE = os.path.dirname(os.path.abspath(__file__))
REPLAY_KEYS = 16


def _lua_body() -> bytes:
    """The body load.lua sends, so the answers sent before a replay round have its fingerprint."""
    with open(os.path.join(HERE, "load.lua")) as f:
        text = f.read()
    return text.split("body = [[", 1)[1].split("]]", 1)[0].encode()


def _pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") else argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(port: int, key: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Idempotency-Key": key, "X-Tenant-Id": "acme"}
        headers["Content-Type"] = "application/json"
        conn.request("POST", "/payments", body=_lua_body(), headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def _start(mode: str, log_dir: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {
        **os.environ,
        "OBSERVE_MODE": mode,
        "OBSERVE_LOG": os.path.join(log_dir, f"{mode}.log"),
        "PYTHONPATH": HERE,
    }
    argv = [sys.executable, "-m", "uvicorn", "--factory", "observe:build", "--port", str(port)]
    argv += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    server = subprocess.Popen(_pinned(0, argv), env=env, cwd=HERE)
    for _ in range(200):
        try:
            if _post(port, f"warmup-{MODES.index(mode)}") == 201:
                return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit(f"the {mode} server did not start")


def _wrk(port: int, seconds: float, replay: bool, nonce: str) -> float:
    if replay:
        for n in range(REPLAY_KEYS):
            _post(port, f"{nonce}-{n}")
    argv = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", os.path.join(HERE, "load.lua")]
    argv += [f"http://127.0.0.1:{port}", "--", "replay" if replay else "new", nonce]
    argv += [str(REPLAY_KEYS), "acme"]
    out = subprocess.run(_pinned(1, argv), capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    result = json.loads(line[6:])
    if result["status_errors"]:
        raise SystemExit(f"wrk saw non-2xx answers: {result}")
    errors = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors"))
    if errors or result["status_errors"] or result["timeouts"]:
        raise SystemExit(f"wrk saw errors: {result}")
    return float(result["requests"]) / (result["duration_us"] / 1e6)


def servers(rounds: int, seconds: float) -> dict[tuple[str, bool], list[float]]:
    if shutil.which("wrk") is None:
        raise SystemExit("--server needs wrk (apt-get install -y wrk)")
    log_dir = tempfile.mkdtemp(prefix="oncely-observe-")
    started = {m: _start(m, log_dir) for m in MODES}
    results: dict[tuple[str, bool], list[float]] = {(m, r): [] for m in MODES for r in (0, 1)}
    try:
        for round_ in range(rounds):
            for replay in (False, True):
                for mode in MODES if round_ % 2 == 0 else reversed(MODES):
                    nonce = f"m{MODES.index(mode)}-{round_}-{secrets.token_hex(3)}"
                    port = started[mode][1]
                    results[(mode, replay)].append(_wrk(port, seconds, replay, nonce))
    finally:
        for server, _ in started.values():
            server.terminate()
            server.wait(10)
    logged = os.path.getsize(os.path.join(log_dir, "metrics+logs.log"))
    print(f"decision log of metrics+logs: {logged} bytes")
    return results


def report(rounds: int, seconds: float, results: dict[tuple[str, bool], list[float]]) -> None:
    print(f"{rounds} rounds of {seconds:g} s per mode; requests/s, median (min-max)")
    for replay in (False, True):
        print("replays" if replay else "new keys")
        base = statistics.median(results[("off", replay)])
        for mode in MODES:
            values = results[(mode, replay)]
            median = statistics.median(values)
            cost = (1 - median / base) * 100
            print(
                f"  {mode:<13} {median:8.0f} ({min(values):.0f}-{max(values):.0f})"
                f"  {cost:+5.1f} % vs off"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds of 1 s per mode")
    parser.add_argument("--server", action="store_true", help="uvicorn servers loaded by wrk")
    parser.add_argument("--rounds", type=int, help="rounds per mode")
    parser.add_argument("--seconds", type=float, help="seconds per round")
    args = parser.parse_args()
    if args.server:
        rounds, seconds = args.rounds or 5, args.seconds or 5.0
        report(rounds, seconds, servers(rounds, seconds))
        return
    rounds, seconds = (5, 1.0) if args.quick else (15, 2.0)
    rounds, seconds = args.rounds or rounds, args.seconds or seconds
    modes = MODES
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
    report(rounds, seconds, results)


if __name__ == "__main__":
    asyncio.run(main())
