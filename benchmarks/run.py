"""Throughput of oncely against the bare app and its peers, under wrk on loopback.

    python3 benchmarks/run.py --quick        # 1 round of 3 s per target and mode
    python3 benchmarks/run.py                # 3 rounds of 10 s (prints its duration first)
    python3 benchmarks/run.py --only oncely --only asgi-idempotency-header:memory

Creates its own virtualenv (benchmarks/.venv: oncely from this checkout, uvicorn, the peers from
PyPI) and re-runs itself inside it. Then:

1. starts one uvicorn server per target (one worker, no access log, uvloop, pinned to CPU 0);
2. for each mode (new keys, replays) and round: wrk (pinned to CPU 1) loads bare, target 1, bare,
   target 2, ..., bare; each target's ratio is against the mean of the bare runs on either side;
3. calls every oncely store directly with 32 concurrent clients (claim and complete latency);
4. profiles oncely on SQLite under load with py-spy;
5. prints the tables and writes them to benchmarks/results.md.

Scratch files (SQLite databases, server logs, raw results, the raw profile) go to
benchmarks/.scratch/; records in PostgreSQL and Redis live under a per-run prefix and are
removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
SCRATCH = HERE / ".scratch"
LOAD_SCRIPT = HERE / "load.lua"

REQUIREMENTS = [
    ["-e", f"{ROOT}[postgres,redis]"],
    ["uvicorn", "starlette", "uvloop", "httptools", "py-spy", "fastapi", "pydantic"],
    ["fastapi-idempotency", "fastapi-idempotency-key[sqlite,redis]"],
    ["idemkit[asgi,redis,postgres]", "fastidempotent[sqlite,redis,postgres]"],
    ["sqlalchemy[asyncio]"],  # fastidempotent's SQL backends need greenlet, which it omits
]
# Installed without dependencies: it pins redis<5, which oncely's extra (redis>=5) excludes. Its
# Redis backend uses nothing that changed; its fastapi import is satisfied by the line above.
NO_DEPS = ["asgi-idempotency-header"]
PEERS = [
    "asgi-idempotency-header",
    "fastapi-idempotency",
    "fastapi-idempotency-key",
    "idemkit",
    "fastidempotent",
]

MODES = {
    "new": "New keys: every request carries an Idempotency-Key never seen before",
    "replay": "Replays: every request repeats one of --replay-keys (16) completed requests",
}
# The goals of issue 11 (speed), as ratios to bare at the contract endpoint; and, on every store
# and in both modes, ahead of every peer in the same run.
GOALS = {
    ("new", "memory"): 0.9,
    ("new", "sqlite"): 0.8,
    ("new", "redis"): 0.8,
    ("new", "postgres"): 0.7,
    ("replay", "memory"): 3.0,
    ("replay", "sqlite"): 2.5,
    ("replay", "redis"): 2.0,
    ("replay", "postgres"): 1.5,
}
STORES = ("memory", "sqlite", "redis", "postgres")
ENDPOINTS = {
    "contract": "POST /payments on FastAPI: the 325-byte JSON payment validated by a pydantic "
    "model, one INSERT + COMMIT in the app's own SQLite ledger (WAL, synchronous=NORMAL; a plain "
    "`def` endpoint, run in FastAPI's thread pool, one connection per process under a lock), "
    "answered 201 by a pydantic response model with a Location",
    "light": "POST /payments on Starlette: the 325-byte JSON payment parsed and checked by hand, "
    "nothing written, answered 201 JSON with a Location",
}
SERVER_CPU, LOAD_CPU = "0", "1"
NOISY = 0.2  # cores of other work during a run that make it worth repeating
FIRST_PORT = 18400


# The benchmark's own environment -----------------------------------------------------------


def ensure_venv(reinstall: bool) -> None:
    stamp = VENV / ".bench-requirements"
    wanted = json.dumps([REQUIREMENTS, NO_DEPS])
    if VENV_PYTHON.exists() and stamp.exists() and stamp.read_text() == wanted and not reinstall:
        return
    print(f"setting up {VENV.relative_to(ROOT)} (oncely from {ROOT}, peers from PyPI) ...")
    if not VENV_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *(arg for group in REQUIREMENTS for arg in group)], check=True)
    subprocess.run([*pip, "--no-deps", *NO_DEPS], check=True)
    stamp.write_text(wanted)


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


# Settings ----------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    duration: float
    connections: int
    store_seconds: float
    profile_seconds: float
    calibrate_seconds: float
    replay_keys: int
    handler_us: float
    endpoint: str
    tries: int
    workers: bool
    redis_lanes: list[int]
    pin: bool
    http: str
    loop: str
    pg_url: str
    redis_url: str
    modes: list[str]
    only: list[str]
    peers: bool
    profile: bool
    profile_store: str
    profile_only: bool
    stores: bool
    output: Path
    quick: bool
    wait_quiet: float
    deadline: float | None  # epoch seconds: start no round that would end after it
    clean_up: bool
    argv: list[str]
    planned_rounds: int | None = None  # set when --deadline cut the run short


def parse_args(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s; shorter extras")
    parser.add_argument("--rounds", type=int, help="rounds per target and mode (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of load per run (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--replay-keys", type=int, default=16)
    parser.add_argument(
        "--handler-us",
        type=float,
        default=0.0,
        metavar="US",
        help="extra CPU the endpoint burns per payment, to model a heavier handler",
    )
    parser.add_argument(
        "--endpoint",
        choices=sorted(ENDPOINTS),
        default="contract",
        help="contract (default): FastAPI + pydantic + one SQLite ledger row per payment; "
        "light: Starlette, JSON checked by hand, nothing written",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="instead of the peers: oncely on SQLite and PostgreSQL with 2 uvicorn workers "
        "against 1 (written to .scratch/workers.md unless --output)",
    )
    parser.add_argument(
        "--redis-lanes",
        metavar="N,N,...",
        help="instead of the peers: oncely on Redis with each of these lane counts (round trips "
        "in flight at once), new keys unless --mode (written to .scratch/lanes.md unless --output)",
    )
    parser.add_argument(
        "--tries",
        type=int,
        default=3,
        metavar="N",
        help=f"runs during which other work took over {NOISY} cores are repeated, up to N "
        "tries in all (default 3); the last try counts",
    )
    parser.add_argument(
        "--deadline",
        metavar="HH:MM",
        help="UTC, today: start no round that would end after it (rounds cover every mode)",
    )
    parser.add_argument("--mode", action="append", choices=sorted(MODES), dest="modes")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TARGET[:STORE]",
        help="run only these targets (repeatable); bare always runs",
    )
    parser.add_argument("--no-peers", action="store_true", help="oncely and bare only")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--profile-store", default="sqlite", choices=["memory", "sqlite", "postgres", "redis"]
    )
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="only the profile (written to .scratch/profile-STORE.md unless --output)",
    )
    parser.add_argument("--no-store-latency", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other work on the machine to stop",
    )
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--reinstall", action="store_true", help="reinstall the benchmark venv")
    parser.add_argument(
        "--clean-up",
        action="store_true",
        help="only remove what an interrupted run left in PostgreSQL, Redis and .scratch/",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    lanes = [int(n) for n in args.redis_lanes.split(",")] if args.redis_lanes else []
    if args.workers and lanes:
        parser.error("--workers and --redis-lanes are separate runs")
    special = "workers" if args.workers else "lanes" if lanes else None
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return Settings(
        rounds=args.rounds or (1 if quick else 3),
        duration=args.duration or (3.0 if quick else 10.0),
        connections=args.connections,
        store_seconds=1.0 if quick else 3.0,
        profile_seconds=5.0 if quick else 15.0,
        calibrate_seconds=2.0 if quick else 5.0,
        replay_keys=args.replay_keys,
        handler_us=args.handler_us,
        endpoint=args.endpoint,
        tries=max(1, args.tries),
        workers=args.workers,
        redis_lanes=lanes,
        pin=not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1,
        http=args.http,
        loop=loop,
        pg_url=args.pg_url,
        redis_url=args.redis_url,
        modes=args.modes or (["new"] if lanes else ["new", "replay"]),
        only=args.only,
        peers=not args.no_peers and special is None,
        profile=not args.no_profile and special is None,
        profile_store=args.profile_store,
        profile_only=args.profile_only,
        stores=not args.no_store_latency and special is None,
        output=args.output
        or (
            SCRATCH / f"profile-{args.profile_store}.md"
            if args.profile_only
            else SCRATCH / f"{special}.md"
            if special
            else HERE / "results.md"
        ),
        quick=quick,
        wait_quiet=args.wait_quiet,
        deadline=_deadline(args.deadline) if args.deadline else None,
        clean_up=args.clean_up,
        argv=argv,
    )


def _deadline(text: str) -> float:
    hours, _, minutes = text.partition(":")
    now = datetime.datetime.now(datetime.UTC)
    return now.replace(hour=int(hours), minute=int(minutes), second=0, microsecond=0).timestamp()


# Services and targets ----------------------------------------------------------------------


def service_problems(settings: Settings) -> dict[str, str]:
    """store -> why it cannot be used in this run (absent from the dict: usable)."""
    problems: dict[str, str] = {}
    try:
        import redis

        redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2).ping()
    except Exception as exc:
        problems["redis"] = f"Redis not reachable at {settings.redis_url} ({type(exc).__name__})"
    try:
        import psycopg

        psycopg.connect(settings.pg_url, connect_timeout=2).close()
    except Exception as exc:
        problems["postgres"] = f"PostgreSQL not reachable ({type(exc).__name__})"
    return problems


def oncely_problem(store: str) -> str | None:
    module = {"postgres": "oncely.stores.postgres", "redis": "oncely.stores.redis"}.get(store)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} cannot be imported ({exc})"
    return None


def selected(target: str, store: str, only: list[str]) -> bool:
    if not only:
        return True
    for pattern in only:
        name, _, wanted_store = pattern.partition(":")
        if name in (target, "*") and wanted_store in ("", store):
            return True
    return False


def make_targets(
    settings: Settings, targets: dict[str, tuple[str, ...]], prefix: str, problems: dict[str, str]
) -> list[Server]:
    """The servers to load besides the bare app, in the order of app.py's TARGETS."""
    wanted: list[tuple[str, str, int, dict[str, str], str]] = []
    if settings.workers:
        # The same server with 1 and with 2 uvicorn workers; bare too, for what the ledger
        # (one SQLite file for both workers) costs them.
        wanted.append(("bare", "none", 2, {}, "2 workers"))
        for store in ("sqlite", "postgres"):
            for workers in (1, 2):
                wanted.append(
                    ("oncely", store, workers, {}, f"{workers} worker" + "s" * (workers > 1))
                )
    elif settings.redis_lanes:
        for lanes in settings.redis_lanes:
            wanted.append(
                ("oncely", "redis", 1, {"BENCH_REDIS_LANES": str(lanes)}, f"lanes {lanes}")
            )
    else:
        for target, stores in targets.items():
            if target == "bare" or (target != "oncely" and not settings.peers):
                continue
            wanted += [(target, store, 1, {}, "") for store in stores]
    servers = []
    port = FIRST_PORT + 1
    for target, store, workers, env, variant in wanted:
        if not selected(target, store, settings.only):
            continue
        slug = re.sub(r"[^a-z0-9]+", "_", f"{target}_{store}_{variant}").strip("_")
        server = Server(target, store, port, f"{prefix}_{slug}", workers, env, variant)
        port += 1
        server.problem = problems.get(store) or (
            oncely_problem(store) if target == "oncely" else None
        )
        servers.append(server)
    return servers


# Servers -----------------------------------------------------------------------------------


@dataclass
class Server:
    target: str
    store: str
    port: int
    prefix: str
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)  # more of app.py's BENCH_* settings
    variant: str = ""  # what sets this server apart from another of the same target and store
    replay_nonce: str = field(default_factory=lambda: f"r{secrets.token_hex(4)}")
    proc: subprocess.Popen[bytes] | None = None
    problem: str | None = None
    duplicates: int | None = None  # ledger rows whose Idempotency-Key another row has too

    @property
    def name(self) -> str:
        base = self.target if self.target == "bare" else f"{self.target}:{self.store}"
        return f"{base} ({self.variant})" if self.variant else base

    @property
    def log(self) -> Path:
        return SCRATCH / f"server-{self.port}.log"

    @property
    def ledger(self) -> Path:
        """The contract endpoint's SQLite ledger (app.py's _sqlite_path("ledger"))."""
        return SCRATCH / f"{self.prefix}-ledger.db"


def ledger_duplicates(server: Server) -> int | None:
    """Payments made more than once for one Idempotency-Key, over the whole run (warm-up too)."""
    if not server.ledger.exists():
        return None
    import sqlite3

    with contextlib.closing(sqlite3.connect(server.ledger, timeout=30.0)) as conn:
        row = conn.execute(
            "SELECT count(*) - count(DISTINCT idempotency_key) FROM payments"
            " WHERE idempotency_key IS NOT NULL"
        ).fetchone()
    return int(row[0])


def pinned(cpu: str, command: list[str], settings: Settings) -> list[str]:
    return ["taskset", "-c", cpu, *command] if settings.pin else command


def start(server: Server, settings: Settings, http_impl: str) -> None:
    env = {
        **os.environ,
        "BENCH_TARGET": server.target,
        "BENCH_STORE": server.store,
        "BENCH_SCRATCH": str(SCRATCH),
        "BENCH_PREFIX": server.prefix,
        "BENCH_PG_URL": settings.pg_url,
        "BENCH_REDIS_URL": settings.redis_url,
        "BENCH_HANDLER_US": f"{settings.handler_us:g}",
        "BENCH_ENDPOINT": settings.endpoint,
        **server.env,
    }
    command = [
        str(VENV_PYTHON),
        "-m",
        "uvicorn",
        "app:build",
        "--factory",
        "--app-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--loop",
        settings.loop,
        "--http",
        http_impl,
    ]
    if server.workers > 1:
        command += ["--workers", str(server.workers)]
    with server.log.open("wb") as log:
        server.proc = subprocess.Popen(
            pinned(SERVER_CPU, command, settings), env=env, stdout=log, stderr=subprocess.STDOUT
        )


def stop(server: Server) -> None:
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def handler_runs(server: Server) -> int:
    """How often the handler ran: the ledger's rows for the contract endpoint (one per run,
    written by every worker to the same file), else the counter of the process that answers."""
    status, body = request(server.port, "GET", "/_bench")
    if status != 200:
        raise RuntimeError(f"{server.name}: GET /_bench answered {status}")
    answer = json.loads(body)
    runs: int = answer.get("ledger_rows", answer["handler_runs"])
    return runs


def payment_body() -> bytes:
    """The body load.lua sends, read from it so that both always agree."""
    match = re.search(r"body = \[\[(.*?)\]\]", LOAD_SCRIPT.read_text(), re.S)
    assert match is not None, "load.lua has no body = [[...]]"
    return match.group(1).encode()


def ready(server: Server, replay_keys: int, timeout: float = 60.0) -> None:
    """Wait for the server, then send the replay keys once and a few hundred fresh keys."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc is not None and server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"exited at start: {' | '.join(tail)}")
        try:
            handler_runs(server)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("did not start listening within 60 s") from None
            time.sleep(0.2)
    body = payment_body()
    headers = {"Content-Type": "application/json", "X-Tenant-Id": "acme"}
    keys = [f"{server.replay_nonce}-{i}" for i in range(replay_keys)]
    keys += [f"warm-{secrets.token_hex(4)}-{i}" for i in range(300)]
    keys.append(keys[0])  # the first replay
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        for key in keys:
            conn.request(
                "POST", "/payments", body=body, headers={**headers, "Idempotency-Key": key}
            )
            response = conn.getresponse()
            answer = response.read()
            if response.status != 201:
                detail = answer[:200].decode(errors="replace")
                raise RuntimeError(f"warm-up got {response.status}: {detail}")
    finally:
        conn.close()


# Load --------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    mode: str
    round: int
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    handler_runs: int
    other_cpu: float  # cores busy with anything but this server, wrk and the database servers
    server_us: float  # CPU time of the server process per request, all threads
    store_us: float  # CPU time of the Redis and PostgreSQL servers per request


# CPU accounting: how busy the machine was with work that is not part of the measurement. ------

_TICKS = os.sysconf("SC_CLK_TCK")
_STORE_SERVERS = ("redis-server", "postgres")


def _busy_ticks() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def _process_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def _tree_ticks(pid: int) -> int:
    """CPU ticks of a process and all its descendants (uvicorn's workers are its children)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(_process_ticks(member) for member in tree)


def _store_server_ticks() -> dict[int, int]:
    ticks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(_STORE_SERVERS):
                ticks[int(entry.name)] = _process_ticks(int(entry.name))
    return ticks


class CpuMeter:
    """Cores used by everything except the server under test, wrk and the database servers."""

    def __init__(self, pid: int | None, tree: bool = False) -> None:
        self.pid = pid
        self.ticks = _tree_ticks if tree else _process_ticks
        self.start = time.monotonic()
        self.busy = _busy_ticks()
        self.server = 0 if pid is None else self.ticks(pid)
        self.stores = _store_server_ticks()
        self.children = _children_ticks()

    def server_seconds(self) -> float:
        return 0.0 if self.pid is None else (self.ticks(self.pid) - self.server) / _TICKS

    def store_seconds(self) -> float:
        """CPU time of the Redis and PostgreSQL servers (all of them) since the start."""
        now = _store_server_ticks()
        return sum(max(0, ticks - self.stores.get(pid, 0)) for pid, ticks in now.items()) / _TICKS

    def other_cores(self) -> float:
        elapsed = time.monotonic() - self.start
        busy = _busy_ticks() - self.busy
        ours = 0 if self.pid is None else self.ticks(self.pid) - self.server
        ours += _children_ticks() - self.children
        # Database backends come and go (one process per PostgreSQL connection): count what
        # each process still alive used since the start.
        for pid, ticks in _store_server_ticks().items():
            ours += max(0, ticks - self.stores.get(pid, 0))
        return max(0.0, (busy - ours) / _TICKS / elapsed)


def _children_ticks() -> int:
    usage = os.times()
    return round((usage.children_user + usage.children_system) * _TICKS)


def wait_quiet(settings: Settings) -> None:
    """Wait (up to --wait-quiet seconds) until other work uses under a tenth of a core."""
    deadline = time.monotonic() + settings.wait_quiet
    while time.monotonic() < deadline:
        meter = CpuMeter(None)
        time.sleep(0.5)
        if meter.other_cores() < 0.1:
            return


def wrk(server: Server, mode: str, settings: Settings, seconds: float) -> dict[str, Any]:
    nonce = server.replay_nonce if mode == "replay" else f"n{secrets.token_hex(6)}"
    command = [
        "wrk",
        "-t1",
        f"-c{settings.connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LOAD_SCRIPT),
        f"http://127.0.0.1:{server.port}",
        "--",
        mode,
        nonce,
        str(settings.replay_keys),
        "acme",
    ]
    done = subprocess.run(
        pinned(LOAD_CPU, command, settings),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[len("BENCH ") :])
            return result
    raise RuntimeError(f"wrk printed no result: {done.stdout[-300:]} {done.stderr[-300:]}")


def measure(
    server: Server, mode: str, round_: int, settings: Settings, seconds: float | None = None
) -> Run:
    """One run of wrk; repeated (up to --tries in all) when other work took over NOISY cores."""
    for _ in range(settings.tries):
        run = _measure_once(server, mode, round_, settings, seconds or settings.duration)
        if run.other_cpu <= NOISY:
            break
    return run


def _measure_once(
    server: Server, mode: str, round_: int, settings: Settings, seconds: float
) -> Run:
    wait_quiet(settings)
    before = handler_runs(server)
    meter = CpuMeter(None if server.proc is None else server.proc.pid, tree=server.workers > 1)
    raw = wrk(server, mode, settings, seconds)
    other, server_s, store_s = meter.other_cores(), meter.server_seconds(), meter.store_seconds()
    after = handler_runs(server)
    errors = sum(
        raw[name]
        for name in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return Run(
        server=server.name,
        mode=mode,
        round=round_,
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        requests=raw["requests"],
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=errors,
        handler_runs=after - before,
        other_cpu=other,
        server_us=server_s / max(1, raw["requests"]) * 1e6,
        store_us=store_s / max(1, raw["requests"]) * 1e6,
    )


def pick_http(settings: Settings, log: list[str]) -> tuple[str, dict[str, float]]:
    if settings.http != "auto":
        return settings.http, {}
    seen: dict[str, float] = {}
    for offset, impl in enumerate(("h11", "httptools")):
        server = Server("bare", "none", FIRST_PORT - 10 + offset, "calibrate")
        start(server, settings, impl)
        try:
            ready(server, settings.replay_keys)
            seen[impl] = measure(server, "new", 0, settings, settings.calibrate_seconds).rps
        finally:
            stop(server)
    best = max(seen, key=lambda impl: seen[impl])
    log.append(
        "HTTP parser: "
        + ", ".join(f"{impl} {rps:,.0f} req/s" for impl, rps in seen.items())
        + f" on the bare app; using {best}"
    )
    return best, seen


Ratios = dict[tuple[str, str], list[float]]


def load_runs(
    bare: Server, targets: list[Server], settings: Settings
) -> tuple[list[Run], Ratios, Ratios]:
    """Every run, and per (target, mode) the ratio to bare of each round: of req/s, and of
    server CPU per request (bare's over the target's), which other work on the machine
    disturbs far less."""
    runs: list[Run] = []
    ratios: Ratios = defaultdict(list)
    cpu_ratios: Ratios = defaultdict(list)
    if not targets:
        return runs, ratios, cpu_ratios
    started = time.monotonic()
    for round_ in range(settings.rounds):
        # A round covers every mode, so a run stopped by --deadline has whole rounds of both.
        if round_ and settings.deadline is not None:
            per_round = (time.monotonic() - started) / round_
            if time.time() + per_round > settings.deadline:
                print(f"  --deadline: stopping after {round_} of {settings.rounds} rounds")
                settings.planned_rounds, settings.rounds = settings.rounds, round_
                break
        for mode in settings.modes:
            order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
            before = measure(bare, mode, round_, settings)
            runs.append(before)
            for server in order:
                run = measure(server, mode, round_, settings)
                after = measure(bare, mode, round_, settings)
                runs += [run, after]
                ratio = run.rps / statistics.mean([before.rps, after.rps])
                ratios[server.name, mode].append(ratio)
                bare_us = statistics.mean([before.server_us, after.server_us])
                cpu_ratios[server.name, mode].append(bare_us / max(run.server_us, 1e-9))
                print(
                    f"  {mode:6} round {round_ + 1}: {server.name:32} {run.rps:8,.0f} req/s "
                    f"{ratio:5.2f}x bare (bare {before.rps:,.0f} / {after.rps:,.0f}); "
                    f"{run.server_us:4.0f} us CPU/request; other work "
                    f"{max(before.other_cpu, run.other_cpu, after.other_cpu):.2f} cores",
                    flush=True,
                )
                before = after
    return runs, ratios, cpu_ratios


def serve_and_load(
    bare: Server, targets: list[Server], settings: Settings, http_impl: str
) -> tuple[list[Run], Ratios, Ratios]:
    """Start every server, warm it up, run the load, stop them all."""
    runnable = [s for s in targets if s.problem is None]
    try:
        for server in [bare, *runnable]:
            start(server, settings, http_impl)
        for server in [bare, *runnable]:
            try:
                ready(server, settings.replay_keys)
            except Exception as exc:
                server.problem = f"{exc}"
                print(f"  {server.name} failed: {exc}")
                stop(server)
        if bare.problem is not None:
            raise SystemExit(f"the bare app did not start: {bare.problem}")
        result = load_runs(bare, [s for s in runnable if s.problem is None], settings)
        for server in runnable:
            if server.problem is None and server.target != "bare":
                with contextlib.suppress(Exception):
                    server.duplicates = ledger_duplicates(server)
        return result
    finally:
        for server in [bare, *targets]:
            stop(server)


# Store latency and profile -----------------------------------------------------------------


def store_latency(settings: Settings, problems: dict[str, str], prefix: str) -> dict[str, Any]:
    stores = [
        "memory=memory:",
        f"sqlite=sqlite:{SCRATCH / f'{prefix}-latency.db'}",
    ]
    if "redis" not in problems and oncely_problem("redis") is None:
        stores.append(f"redis={settings.redis_url} prefix={prefix}_latency:")
    if "postgres" not in problems and oncely_problem("postgres") is None:
        stores.append(f"postgres={settings.pg_url} schema={prefix}_latency")
    command = [
        str(VENV_PYTHON),
        str(HERE / "stores.py"),
        "--seconds",
        str(settings.store_seconds),
        "--concurrency",
        "32",
        "--loop",
        settings.loop,
    ]
    for store in stores:
        command += ["--store", store]
    done = subprocess.run(
        pinned(SERVER_CPU, command, settings), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {"all stores": {"error": done.stderr.strip().splitlines()[-1:]}}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def profile(settings: Settings, http_impl: str, prefix: str) -> dict[str, Any]:
    """py-spy samples of oncely on one store while wrk sends new keys."""
    store = settings.profile_store
    server = Server("oncely", store, FIRST_PORT - 20, f"{prefix}_profile")
    raw = SCRATCH / f"profile-oncely-{store}.txt"
    start(server, settings, http_impl)
    try:
        ready(server, settings.replay_keys)
        assert server.proc is not None
        spy = subprocess.Popen(
            [
                str(VENV / "bin" / "py-spy"),
                "record",
                "--pid",
                str(server.proc.pid),
                "--duration",
                f"{settings.profile_seconds:g}",
                "--rate",
                "250",
                "--format",
                "raw",
                "--threads",
                "--full-filenames",
                "--nonblocking",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threads_before = _thread_ticks(server.proc.pid)
        load = wrk(server, "new", settings, settings.profile_seconds + 1)
        threads_after = _thread_ticks(server.proc.pid)
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.exists():
            return {"error": err.decode(errors="replace").strip().splitlines()[-1:]}
    finally:
        stop(server)
    summary = summarize_profile(raw.read_text())
    summary["rps"] = load["requests"] / (load["duration_us"] / 1e6)
    requests = max(1, load["requests"])
    summary["thread_us"] = {
        name: (threads_after.get(name, 0) - threads_before.get(name, 0)) / _TICKS / requests * 1e6
        for name in threads_after
    }
    summary["raw"] = str(raw.relative_to(ROOT))
    return summary


LOOP_THREAD = "event loop thread"
WORKER_THREADS = "worker threads (SQLite store's executor, FastAPI's thread pool)"


def _thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks of the server's event-loop thread and of all its other threads together."""
    ticks = {LOOP_THREAD: 0, WORKER_THREADS: 0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = LOOP_THREAD if task.name == str(pid) else WORKER_THREADS
        ticks[name] += _task_ticks(pid, task.name)
    return ticks


def _task_ticks(pid: int, tid: str) -> int:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*):(?P<line>\d+)\)$")


def _bucket(path: str, func: str, worker: bool) -> str | None:
    """Which part of the stack a frame belongs to; None for the stdlib and drivers."""
    if path == str(HERE / "app.py"):
        return "the endpoint itself (app.py: handler, ledger INSERT + COMMIT)"
    if "/fastapi/" in path:
        return "FastAPI (request parsing, dependencies, response model, thread-pool hand-off)"
    if "/pydantic/" in path or "/pydantic_core/" in path:
        return "pydantic (validation, serialization)"
    if "/oncely/" in path:
        module = path.rsplit("/oncely/", 1)[1]
        if module == "stores/sqlite.py":
            if worker:
                return "oncely SQLite statements + row decoding (worker thread)"
            return "oncely SQLite store, event-loop side (executor hand-off)"
        return {
            "asgi.py": "oncely middleware (asgi.py: headers, body, capture, replay)",
            "_fingerprint.py": "oncely fingerprint (canonical JSON + SHA-256)",
            "_keys.py": "oncely key parsing + storage key",
            "_flow.py": "oncely flow + driver (_flow.py, _drive.py)",
            "_drive.py": "oncely flow + driver (_flow.py, _drive.py)",
            "_codec.py": "oncely record codec",
            "stores/memory.py": "oncely memory store",
            "stores/_rules.py": "oncely memory store",
            "_attempt.py": "oncely middleware (asgi.py: headers, body, capture, replay)",
            "stores/redis.py": "oncely Redis store, with redis-py under it",
            "stores/postgres.py": "oncely PostgreSQL store, with psycopg and its pool under it",
        }.get(module, f"oncely {module}")
    if "/starlette/" in path:
        return "Starlette (routing, Request, JSONResponse, middleware stack)"
    if "/uvicorn/" in path:
        return "uvicorn protocol + httptools parsing"
    return None


def summarize_profile(text: str) -> dict[str, Any]:
    """Attribute each sample to the innermost frame that belongs to a named part of the stack."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        worker = any(
            "concurrent/futures/thread.py" in frame
            or ("anyio/_backends/" in frame and "WorkerThread" in frame)
            for frame in frames
        )
        threads[WORKER_THREADS if worker else LOOP_THREAD] += count
        total += count
        owner = "event loop, sockets, other (asyncio/uvloop, stdlib)"
        for frame in reversed(frames):
            match = _FRAME.match(frame)
            if match is None:
                continue
            bucket = _bucket(match["file"], match["func"], worker)
            if bucket is not None:
                owner = bucket
                break
        buckets[owner] += count
        leaf = _FRAME.match(frames[-1])
        if leaf is not None:
            path = leaf["file"]
            short = path.split("/site-packages/")[-1].split("/src/")[-1].split("/lib/python3")[-1]
            leaves[f"{leaf['func']} ({short.lstrip('/')}:{leaf['line']})"] += count
    return {
        "samples": total,
        "buckets": buckets.most_common(),
        "threads": threads.most_common(),
        "leaves": leaves.most_common(12),
    }


# Clean-up ----------------------------------------------------------------------------------


def clean_up(settings: Settings, prefix: str, problems: dict[str, str]) -> None:
    if "redis" not in problems:
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(settings.redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start_ in range(0, len(keys), 1000):
                client.delete(*keys[start_ : start_ + 1000])
            client.close()
    if "postgres" not in problems:
        with contextlib.suppress(Exception):
            import psycopg
            from psycopg import sql

            with psycopg.connect(settings.pg_url, autocommit=True) as conn:
                schemas = conn.execute(
                    "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", (prefix,)
                ).fetchall()
                for (name,) in schemas:
                    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
                tables = conn.execute(
                    "SELECT schemaname, tablename FROM pg_tables WHERE starts_with(tablename, %s)",
                    (prefix,),
                ).fetchall()
                for schema, name in tables:
                    conn.execute(
                        sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(
                            sql.Identifier(schema), sql.Identifier(name)
                        )
                    )
    for path in SCRATCH.glob(f"{prefix}*.db*"):
        path.unlink()


def _clean_up_leftovers(settings: Settings) -> int:
    problems = service_problems(settings)
    clean_up(settings, "oncelybench_", problems)
    print("removed every oncelybench_* schema, table, Redis key and SQLite file")
    return 0


# Report ------------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip()


def machine(settings: Settings, problems: dict[str, str]) -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    rev = _command("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = _command("git", "-C", str(ROOT), "status", "--porcelain", "--", "src")
    servers = []
    if "redis" not in problems:
        with contextlib.suppress(Exception):
            import redis

            servers.append(
                f"Redis {redis.Redis.from_url(settings.redis_url).info()['redis_version']}"
            )
    if "postgres" not in problems:
        with contextlib.suppress(Exception):
            import psycopg

            with psycopg.connect(settings.pg_url) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                servers.append(f"PostgreSQL {row[0] if row else '?'}")
    wrk_version = _command("wrk", "-v").splitlines()[0].split(" [")[0]
    return [
        f"- Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {cpu}, {os.cpu_count()} cores, {memory}, Linux {platform.release()}",
        f"- Python {platform.python_version()}; oncely {_version('oncely')} at {rev}"
        + (" with uncommitted changes in src/" if dirty else ""),
        f"- uvicorn {_version('uvicorn')}, starlette {_version('starlette')}, "
        f"uvloop {_version('uvloop')}, httptools {_version('httptools')}, {wrk_version}"
        + (f", {', '.join(servers)}" if servers else ""),
        "- Peers: " + ", ".join(f"{peer} {_version(peer)}" for peer in PEERS),
    ]


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def report(
    settings: Settings,
    http_impl: str,
    notes: list[str],
    runs: list[Run],
    ratios: Ratios,
    cpu_ratios: Ratios,
    servers: list[Server],
    latency: dict[str, Any] | None,
    prof: dict[str, Any] | None,
    problems: dict[str, str],
) -> str:
    title = (
        "oncely with 2 uvicorn workers against 1"
        if settings.workers
        else "oncely's Redis store by lane count"
        if settings.redis_lanes
        else "oncely benchmark results"
    )
    out = [
        f"# {title}",
        "",
        "Made by `benchmarks/run.py`; how it measures, and what the peers do and do not do: "
        "`benchmarks/README.md`.",
        "",
    ]
    if settings.workers:
        out += [*workers_summary(servers, runs, ratios, settings), ""]
    elif settings.redis_lanes:
        out += [*lanes_summary(servers, runs, ratios, settings), ""]
    else:
        out += [*summary(servers, runs, ratios, settings), ""]
    out += [*noise(servers, runs, ratios, settings), "", "## How, where, when", ""]
    out += machine(settings, problems)
    workers = "1 or 2 workers (on the same CPUs)" if settings.workers else "1 worker"
    pinning = (
        f"server (uvicorn, and everything it runs) pinned to CPU {SERVER_CPU}, "
        f"wrk to CPU {LOAD_CPU}; PostgreSQL and Redis unpinned"
        if settings.pin
        else "no CPU pinning"
    )
    out += [
        f"- Load: wrk, 1 thread, {settings.connections} connections, on 127.0.0.1; "
        f"{settings.rounds} round(s) of {settings.duration:g} s per target and mode, each target "
        "between two runs of the bare app; the ratio is the target's req/s over the mean of "
        "those two, and the table shows the median over rounds",
        f"- Server: uvicorn, {workers}, "
        f"--no-access-log, --loop {settings.loop}, --http {http_impl}; {pinning}",
        f"- Endpoint (`--endpoint {settings.endpoint}`): {ENDPOINTS[settings.endpoint]} "
        "(benchmarks/app.py)"
        + (f", plus {settings.handler_us:g} us of CPU per payment" if settings.handler_us else ""),
        f"- Command: `{' '.join(['python3 benchmarks/run.py', *settings.argv])}`",
    ]
    if settings.planned_rounds:
        out.append(
            f"- Cut short by --deadline: {settings.rounds} of {settings.planned_rounds} rounds"
        )
    out += [f"- {note}" for note in notes]
    if runs:
        other = sorted(r.other_cpu for r in runs)
        noisy = sum(1 for value in other if value > NOISY)
        out.append(
            f"- Other work on the machine during the runs (cores busy outside the server, wrk and "
            f"the database servers): median {statistics.median(other):.2f}, "
            f"max {other[-1]:.2f}; {noisy} of {len(other)} runs above {NOISY} (each such run "
            f"was tried up to {settings.tries} times in all; the last try counts)"
        )
    for mode in settings.modes:
        out += ["", f"## {MODES[mode]}", ""]
        out += [
            "| target | store | req/s | x bare | x bare, min-max | x bare by CPU | p50 ms "
            "| p99 ms | server CPU us/req | DB server CPU us/req | handler runs/req | errors "
            "| payments twice for one key | goal (x bare) |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for server in servers:
            mine = [r for r in runs if r.server == server.name and r.mode == mode]
            if server.problem is not None:
                out.append(
                    f"| {server.target} | {server.store} | - | - | - | - | - | - | - | - | - | - "
                    f"| - | skipped: {server.problem} |"
                )
                continue
            if not mine:
                continue
            rps = statistics.median(r.rps for r in mine)
            p50 = statistics.median(r.p50_ms for r in mine)
            p99 = statistics.median(r.p99_ms for r in mine)
            requests = sum(r.requests for r in mine)
            per_request = sum(r.handler_runs for r in mine) / requests if requests else 0.0
            errors = sum(r.errors for r in mine)
            cpu = statistics.median(r.server_us for r in mine)
            db = (
                f"{statistics.median(r.store_us for r in mine):.0f}"
                if server.store in ("postgres", "redis")
                else "-"
            )
            if server.target == "bare" and not server.variant:
                out.append(
                    f"| **bare** | - | {rps:,.0f} | 1.00 | - | 1.00 | {_ms(p50)} | {_ms(p99)} "
                    f"| {cpu:.0f} | - | {per_request:.2f} | {errors} | - | |"
                )
                continue
            got = ratios[server.name, mode]
            ratio = statistics.median(got)
            by_cpu = statistics.median(cpu_ratios[server.name, mode])
            goal = ""
            if server.target == "oncely" and not server.variant and (mode, server.store) in GOALS:
                wanted = GOALS[mode, server.store]
                verdict = "met" if ratio >= wanted else "not met"
                goal = f"≥{wanted:g}x: {verdict} ({ratio:.3f})"
            name = f"**{server.target}**" if server.target == "oncely" else server.target
            if server.variant:
                name += f" ({server.variant})"
            twice = "-" if server.duplicates is None else f"{server.duplicates}"
            out.append(
                f"| {name} | {server.store} | {rps:,.0f} | {ratio:.2f} "
                f"| {min(got):.2f}-{max(got):.2f} | {by_cpu:.2f} | {_ms(p50)} | {_ms(p99)} "
                f"| {cpu:.0f} | {db} | {per_request:.2f} | {errors} | {twice} | {goal} |"
            )
        out += [""]
        out += ahead_of_peers(servers, ratios, mode)
    if latency is not None:
        out += ["", "## Store calls, 32 concurrent clients on one event loop", ""]
        out += [
            f"oncely's stores called directly (benchmarks/stores.py, {settings.store_seconds:g} s "
            "per phase, pinned like the server). Latency includes waiting behind the other 31.",
            "",
            "| store | claim, new key: p50 / p99 ms | complete: p50 / p99 ms | claim+complete/s "
            "| claim, completed key (replay): p50 / p99 ms | replays/s |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for store, result in latency.items():
            if "error" in result:
                out.append(f"| {store} | error: {result['error']} | | | | |")
                continue
            c, d, r = result["claim_new"], result["complete"], result["claim_replay"]
            out.append(
                f"| {store} | {_ms(c['p50_ms'])} / {_ms(c['p99_ms'])} "
                f"| {_ms(d['p50_ms'])} / {_ms(d['p99_ms'])} | {c['per_s']:,.0f} "
                f"| {_ms(r['p50_ms'])} / {_ms(r['p99_ms'])} | {r['per_s']:,.0f} |"
            )
            if result.get("problems"):
                out.append(f"| {store} | problems: {'; '.join(result['problems'])} | | | | |")
    if prof is not None:
        out += ["", f"## Where the time goes: oncely on {settings.profile_store}, new keys", ""]
        if "error" in prof:
            out.append(f"py-spy failed: {prof['error']}")
        else:
            total = prof["samples"] or 1
            out += [
                f"py-spy, {settings.profile_seconds:g} s at 250 Hz while wrk sent new keys "
                f"({prof['rps']:,.0f} req/s under the profiler); {prof['samples']:,} samples of "
                "running threads. Each sample goes to the innermost frame of a named part of the "
                f"stack. Raw stacks: `{prof['raw']}` (collapsed format: flamegraph.pl, "
                "speedscope).",
                "",
                "| part of the stack | share of samples |",
                "|---|--:|",
            ]
            out += [f"| {name} | {count / total:.0%} |" for name, count in prof["buckets"]]
            out += ["", "| thread | share of samples | CPU us per request |", "|---|--:|--:|"]
            for name, count in prof["threads"]:
                us = prof["thread_us"].get(name, 0.0)
                out.append(f"| {name} | {count / total:.0%} | {us:.0f} |")
            out += ["", "Hottest leaf frames:", "", "| frame | share |", "|---|--:|"]
            out += [f"| `{name}` | {count / total:.1%} |" for name, count in prof["leaves"]]
    return "\n".join(out) + "\n"


STORE_NAMES = {"memory": "memory", "sqlite": "SQLite", "redis": "Redis", "postgres": "PostgreSQL"}


def _peers(servers: list[Server], ratios: Ratios, store: str, mode: str) -> dict[str, float]:
    return {
        s.target: statistics.median(ratios[s.name, mode])
        for s in servers
        if s.store == store
        and s.target not in ("oncely", "bare")
        and not s.variant
        and ratios.get((s.name, mode))
    }


def _median_us(runs: list[Run], name: str, mode: str) -> float | None:
    values = [r.server_us for r in runs if r.server == name and r.mode == mode]
    return statistics.median(values) if values else None


def summary(
    servers: list[Server], runs: list[Run], ratios: Ratios, settings: Settings
) -> list[str]:
    """The table of issue 11: oncely and the best peer per store and mode, with the goals."""
    out = [
        "## Summary",
        "",
        "Throughput over the bare app's, measured in this one run (median over rounds); goals "
        "from issue 11. Best peer: the peer with the highest ratio on that store in that mode.",
        "",
        "| store | new keys: oncely | best peer | replays: oncely | best peer |",
        "|---|--:|--:|--:|--:|",
    ]
    ahead: list[str] = []
    met = total = 0
    by_name = {s.name: s for s in servers}
    for store in STORES:
        cells: list[str] = []
        verdicts: list[str] = []
        for mode in ("new", "replay"):
            mine = ratios.get((f"oncely:{store}", mode))
            peers = _peers(servers, ratios, store, mode)
            goal = GOALS[mode, store]
            if mode not in settings.modes:
                cells += ["not run", "-"]
                continue
            if mine:
                ours = statistics.median(mine)
                total += 1
                met += ours >= goal
                # Three decimals where two would round a miss up to the goal (or a hit down).
                shown = f"{ours:.3f}" if round(ours, 2) == goal else f"{ours:.2f}"
                verdict = "met" if ours >= goal else "not met"
                cells.append(f"**{shown}x** (≥{goal:g}x: {verdict})")
            else:
                server = by_name.get(f"oncely:{store}")
                why = server.problem if server is not None and server.problem else "not run"
                cells.append(f"- ({why})")
            if peers:
                best = max(peers, key=lambda name: peers[name])
                cells.append(f"{peers[best]:.2f}x ({best})")
                if mine:
                    word = "new keys" if mode == "new" else "replays"
                    verdicts.append(
                        f"{word} {'ahead' if statistics.median(mine) > peers[best] else 'behind'}"
                    )
            else:
                cells.append("- (no peer)")
        out.append(f"| {STORE_NAMES[store]} | " + " | ".join(cells) + " |")
        if verdicts:
            ok = all(v.endswith("ahead") for v in verdicts)
            ahead.append(
                f"{STORE_NAMES[store]} {'met' if ok else 'not met'} ({', '.join(verdicts)})"
            )
    out += [""]
    if total:
        out.append(f"- Ratio goals met: {met} of {total}.")
    if ahead:
        out.append("- Ahead of every peer on every store: " + "; ".join(ahead) + ".")
    extra = []
    for store in STORES:
        parts = []
        for mode in settings.modes:
            ours, bare = _median_us(runs, f"oncely:{store}", mode), _median_us(runs, "bare", mode)
            if ours is not None and bare is not None:
                parts.append(f"{ours - bare:+,.0f}")
        if parts:
            extra.append(f"{STORE_NAMES[store]} {' / '.join(parts)}")
    bare_us = _median_us(runs, "bare", "new")
    if extra and bare_us is not None:
        out.append(
            f"- Server CPU per request, oncely minus bare (bare: {bare_us:,.0f} us), "
            f"{' / '.join('new keys' if m == 'new' else 'replays' for m in settings.modes)}: "
            + "; ".join(extra)
            + " us."
        )
    return out


def noise(servers: list[Server], runs: list[Run], ratios: Ratios, settings: Settings) -> list[str]:
    """How much other work ran, and how far the rounds spread."""
    if not runs:
        return []
    other = sorted(r.other_cpu for r in runs)
    noisy = sum(1 for value in other if value > NOISY)
    parts = [
        f"Noise: other work on the machine (cores busy outside the server, wrk and the database "
        f"servers) was median {statistics.median(other):.2f}, max {other[-1]:.2f} cores over "
        f"{len(other)} runs, {noisy} above {NOISY} after up to {settings.tries} tries each "
        f"(waiting up to {settings.wait_quiet:g} s for quiet before each run)."
    ]
    for mode in settings.modes:
        bare = [r.rps for r in runs if r.server == "bare" and r.mode == mode]
        if bare:
            mid = statistics.median(bare)
            parts.append(
                f"Bare app, {'new keys' if mode == 'new' else 'replays'}: {min(bare):,.0f}-"
                f"{max(bare):,.0f} req/s over {len(bare)} runs "
                f"({(max(bare) - min(bare)) / mid:.0%} of its median)."
            )
    if settings.rounds > 1:
        spreads = []
        for server in servers:
            for mode in settings.modes:
                got = ratios.get((server.name, mode))
                if got and len(got) > 1 and server.target == "oncely":
                    spreads.append(max(got) - min(got))
        if spreads:
            parts.append(
                f"oncely's ratios over {settings.rounds} rounds: spread (max - min) median "
                f"{statistics.median(spreads):.2f}, widest {max(spreads):.2f}."
            )
    else:
        parts.append("One round: no spread over rounds to show; read the ratios to ±0.1 or so.")
    return ["- " + " ".join(parts)]


def workers_summary(
    servers: list[Server], runs: list[Run], ratios: Ratios, settings: Settings
) -> list[str]:
    """2 uvicorn workers against 1: throughput and what the handler did."""
    out = [
        "## Two workers",
        "",
        "Each server's req/s over the bare app's (1 worker) in the same run, median over rounds; "
        "2 workers / 1 worker is the ratio of those. Handler runs are ledger rows (both workers "
        "write to one SQLite ledger file): new keys must make one payment per key, replays none.",
        "",
        "| store | mode | 1 worker: req/s (x bare) | 2 workers: req/s (x bare) | 2 workers / 1 "
        "| handler runs per request, 1 / 2 workers | payments twice for one key, 1 / 2 workers "
        "| errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    by_name = {s.name: s for s in servers}

    def cell(name: str, mode: str) -> tuple[str, float | None, str, str, int]:
        mine = [r for r in runs if r.server == name and r.mode == mode]
        if not mine:
            server = by_name.get(name)
            return (
                f"- ({server.problem})" if server and server.problem else "-",
                None,
                "-",
                "-",
                0,
            )
        rps = statistics.median(r.rps for r in mine)
        ratio = statistics.median(ratios[name, mode]) if ratios.get((name, mode)) else 1.0
        requests = sum(r.requests for r in mine)
        runs_per = sum(r.handler_runs for r in mine) / max(1, requests)
        server = by_name.get(name)
        twice = (
            "n/a"  # no idempotency layer: every replay is another payment
            if name.startswith("bare")
            else "-"
            if server is None or server.duplicates is None
            else str(server.duplicates)
        )
        return (
            f"{rps:,.0f} ({ratio:.2f}x)",
            ratio,
            f"{runs_per:.3f}",
            twice,
            sum(r.errors for r in mine),
        )

    for store, one, two in (
        ("none (bare)", "bare", "bare (2 workers)"),
        ("SQLite", "oncely:sqlite (1 worker)", "oncely:sqlite (2 workers)"),
        ("PostgreSQL", "oncely:postgres (1 worker)", "oncely:postgres (2 workers)"),
    ):
        for mode in settings.modes:
            a, b = cell(one, mode), cell(two, mode)
            factor = f"{b[1] / a[1]:.2f}" if a[1] and b[1] else "-"
            out.append(
                f"| {store} | {'new keys' if mode == 'new' else 'replays'} | {a[0]} | {b[0]} "
                f"| {factor} | {a[2]} / {b[2]} | {a[3]} / {b[3]} | {a[4] + b[4]} |"
            )
    where = (
        f"every worker of a server pinned to CPU {SERVER_CPU} with it, wrk on CPU {LOAD_CPU}: "
        "2 workers get no more CPU than 1, so this measures what a second process costs or saves "
        "(no idle CPU between requests, two SQLite writers, two connection pools)"
        if settings.pin
        else "no pinning: the workers, wrk and the database servers share every core"
    )
    out += [
        "",
        f"- Where: {where}.",
        "- Handler runs per request counts ledger rows over answered requests; a run ends with up "
        f"to {settings.connections} requests in flight whose payments are written but not "
        "counted as answered, so new keys read a little over 1.000. Payments twice for one key "
        "counts ledger rows sharing an Idempotency-Key, over the whole run and both modes.",
    ]
    return out


def lanes_summary(
    servers: list[Server], runs: list[Run], ratios: Ratios, settings: Settings
) -> list[str]:
    out = [
        "## Redis: round trips in flight (lanes)",
        "",
        "oncely's Redis store queues scripts while `lanes` pipelined round trips are out "
        "(stores/_async/_io.py's Batcher); set per server here with BENCH_REDIS_LANES, a "
        "benchmark-only override (the store has no option for it). Median over rounds.",
        "",
        "| lanes | mode | req/s | x bare | x bare, min-max | server CPU us/req "
        "| Redis CPU us/req | p50 ms | p99 ms | errors |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for server in servers:
        for mode in settings.modes:
            mine = [r for r in runs if r.server == server.name and r.mode == mode]
            got = ratios.get((server.name, mode))
            if not mine or not got or server.target == "bare":
                continue
            out.append(
                f"| {server.env.get('BENCH_REDIS_LANES', '?')} "
                f"| {'new keys' if mode == 'new' else 'replays'} "
                f"| {statistics.median(r.rps for r in mine):,.0f} | {statistics.median(got):.2f} "
                f"| {min(got):.2f}-{max(got):.2f} "
                f"| {statistics.median(r.server_us for r in mine):.0f} "
                f"| {statistics.median(r.store_us for r in mine):.0f} "
                f"| {_ms(statistics.median(r.p50_ms for r in mine))} "
                f"| {_ms(statistics.median(r.p99_ms for r in mine))} "
                f"| {sum(r.errors for r in mine)} |"
            )
    return out


def ahead_of_peers(servers: list[Server], ratios: Ratios, mode: str) -> list[str]:
    lines = []
    for store in ("memory", "sqlite", "postgres", "redis"):
        mine = ratios.get((f"oncely:{store}", mode))
        peers = _peers(servers, ratios, store, mode)
        if mine and peers:
            best = max(peers, key=lambda name: peers[name])
            ours = statistics.median(mine)
            verdict = "ahead of" if ours > peers[best] else "behind"
            lines.append(
                f"- {store}: oncely {ours:.2f}x is {verdict} the best peer, {best} "
                f"{peers[best]:.2f}x"
            )
    return lines


# Main --------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if not in_venv():
        ensure_venv(reinstall="--reinstall" in argv)
        argv = [a for a in argv if a != "--reinstall"]
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *argv])
    settings = parse_args(argv)
    # Stopping the run (Ctrl-C, or SIGTERM; a background job ignores SIGINT) still stops the
    # servers and removes the records, through the finally blocks below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if settings.clean_up:
        return _clean_up_leftovers(settings)
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    SCRATCH.mkdir(exist_ok=True)
    sys.path.insert(0, str(HERE))
    from app import TARGETS

    prefix = f"oncelybench_{secrets.token_hex(3)}"
    problems = service_problems(settings)
    notes: list[str] = []
    if os.getloadavg()[0] > 0.5:
        notes.append(f"Load average at the start: {os.getloadavg()[0]:.2f} (other work running)")
    targets = make_targets(settings, TARGETS, prefix, problems)
    bare = Server("bare", "none", FIRST_PORT, f"{prefix}_bare")
    if settings.profile_only:
        targets = []
    runnable = [s for s in targets if s.problem is None]
    per_run = settings.duration + 0.5
    load_seconds = len(settings.modes) * settings.rounds * (2 * len(runnable) + 1) * per_run
    print(
        f"{len(runnable)} targets, {len(settings.modes)} modes, {settings.rounds} round(s) of "
        f"{settings.duration:g} s: about {load_seconds / 60:.1f} min of load, plus start-up, "
        f"plus up to {settings.wait_quiet:g} s of waiting for quiet before each run and repeats "
        "of noisy runs"
    )
    for server in targets:
        if server.problem:
            print(f"  skipping {server.name}: {server.problem}")
    if settings.profile_only:
        http_impl = "httptools" if settings.http == "auto" else settings.http
    else:
        http_impl, _ = pick_http(settings, notes)
    print(notes[-1] if notes else f"HTTP parser: {http_impl}")
    runs: list[Run] = []
    ratios: Ratios = {}
    cpu_ratios: Ratios = {}
    latency = prof = None
    try:
        if not settings.profile_only:
            runs, ratios, cpu_ratios = serve_and_load(bare, targets, settings, http_impl)
        if settings.stores and not settings.profile_only:
            print("store latency ...", flush=True)
            latency = store_latency(settings, problems, prefix)
        if settings.profile:
            print("profile ...", flush=True)
            prof = profile(settings, http_impl, prefix)
    finally:
        clean_up(settings, prefix, problems)
    (SCRATCH / ("last-profile.json" if settings.profile_only else "last-run.json")).write_text(
        json.dumps(
            {
                "runs": [r.__dict__ for r in runs],
                "ratios": {f"{k[0]} {k[1]}": v for k, v in ratios.items()},
                "cpu_ratios": {f"{k[0]} {k[1]}": v for k, v in cpu_ratios.items()},
                "latency": latency,
                "profile": prof,
            },
            indent=1,
        )
    )
    text = report(
        settings,
        http_impl,
        notes,
        runs,
        ratios,
        cpu_ratios,
        [bare, *targets],
        latency,
        prof,
        problems,
    )
    settings.output.write_text(text)
    print()
    print(text)
    print(f"written to {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
