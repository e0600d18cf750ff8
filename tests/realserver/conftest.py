"""Real uvicorn servers on loopback, as subprocesses in their own process group.

``servers.start(name, lease=..., delay=..., workers=...)`` starts ``python -m uvicorn
tests.realserver.app:app`` on a free 127.0.0.1 port against the test's SQLite file and ledger,
and returns once it answers. Every server is stopped when the test ends, even a SIGSTOPped one;
each server's output goes to a log file, printed after the test (pytest shows it on failure).

``shared_store`` (PostgreSQL, then Redis) gives a test a store of its own on the real server: a
schema or a key prefix that no one else uses, removed after the test, once its servers are
stopped. Pass its URL and options to ``servers.start`` (or set them on ``servers``). ``proxy``
puts a :class:`StoreProxy` in front of that server (``shared_store.url_via(proxy.port)``), which
names the store's statements and scripts in what it counts (``STORE_LABELS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx
import pytest

from oncely import Record
from oncely.stores import AsyncStore
from oncely.stores import _redis_lua as redis_scripts
from oncely.stores.postgres import AsyncPostgresStore

from ..stores import backend_postgres, backend_redis
from .proxy import StoreProxy

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
STARTED = "Application startup complete."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """One uvicorn (its supervisor and workers, with ``workers > 1``) in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workers: int
    log_path: Path
    log_file: BinaryIO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process of this server (supervisor and workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def kill(self) -> None:
        """SIGKILL every process of this server and reap the one we started."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop politely, then by force; safe to call on a server that is already gone."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGCONT)
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        # Workers left behind by a killed supervisor, or a server that ignored SIGTERM.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.log_file.close()

    def started_workers(self) -> int:
        """How many worker processes have finished startup so far (restarts count too)."""
        return self.log().count(STARTED)


@dataclass
class Servers:
    """Starts servers that share one store (the test's SQLite file unless ``store`` is set) and
    one ledger; stops them all at the end."""

    tmp_path: Path
    db: Path
    ledger: Path
    started: list[Server] = field(default_factory=list)
    store: str | None = None
    store_options: dict[str, Any] = field(default_factory=dict)
    store_timeout: float | None = None

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:{self.db}"

    def start(self, name: str, **settings: Any) -> Server:
        """Start one server (settings as for :meth:`spawn`) and return once it answers."""
        server = self.spawn(name, **settings)
        wait_until_serving(server)
        return server

    def start_many(self, names: Iterable[str], **settings: Any) -> list[Server]:
        """Start one server per name, all at once, with the same settings (those of
        :meth:`spawn`); return once every one of them answers."""
        started = [self.spawn(name, **settings) for name in names]
        for server in started:
            wait_until_serving(server)
        return started

    def spawn(
        self,
        name: str,
        *,
        lease: float,
        delay: float = 0.0,
        workers: int = 1,
        hold: Path | None = None,
        store: str | None = None,
        store_options: Mapping[str, Any] | None = None,
        store_timeout: float | None = None,
    ) -> Server:
        """Start one server and return at once, before it answers; ``store``,
        ``store_options`` and ``store_timeout`` override the ones set on ``self`` for this
        server only."""
        port = free_port()
        log_path = self.tmp_path / f"server-{name}.log"
        options = self.store_options if store_options is None else store_options
        timeout = self.store_timeout if store_timeout is None else store_timeout
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "ONCELY_TEST_STORE": store or self.store_url,
                "ONCELY_TEST_STORE_OPTIONS": json.dumps(dict(options)),
                "ONCELY_TEST_STORE_TIMEOUT": "" if timeout is None else repr(timeout),
                "ONCELY_TEST_LEDGER": str(self.ledger),
                "ONCELY_TEST_LEASE": repr(lease),
                "ONCELY_TEST_DELAY": repr(delay),
                "ONCELY_TEST_HOLD": "" if hold is None else str(hold),
                "ONCELY_TEST_NAME": name,
            }
        )
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.realserver.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "1",
        ]
        if workers > 1:
            command += ["--workers", str(workers)]
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(name, proc, port, workers, log_path, log_file)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()

    def ledger_lines(self) -> list[dict[str, Any]]:
        """Every handler event so far: ``start`` and ``end`` lines, in the order written."""
        if not self.ledger.exists():
            return []
        text = self.ledger.read_text()
        complete = text[: text.rfind("\n") + 1]  # a line still being written is not read
        return [json.loads(line) for line in complete.splitlines() if line]

    def runs(self, key: str | None = None) -> list[dict[str, Any]]:
        """Handler runs (``start`` events), of one key or of all."""
        return [
            line
            for line in self.ledger_lines()
            if line["event"] == "start" and (key is None or line["key"] == key)
        ]

    def ends(self, key: str | None = None) -> list[dict[str, Any]]:
        return [
            line
            for line in self.ledger_lines()
            if line["event"] == "end" and (key is None or line["key"] == key)
        ]

    def records(self) -> list[dict[str, Any]]:
        """The store's rows as the test sees them (state, token, attempt, lease_until, ...)."""
        if not self.db.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.db, timeout=5)) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT key, fingerprint, state, token, attempt, lease_until, expires_at, "
                "response FROM oncely_records"
            ).fetchall()
        return [dict(row) for row in rows]

    def report(self) -> str:
        parts = []
        for server in self.started:
            parts.append(
                f"===== server {server.name} (pid {server.proc.pid}, port {server.port}, "
                f"exit {server.proc.returncode}) =====\n{server.log()}"
            )
        lines = self.ledger_lines()
        parts.append(f"===== ledger: {len(lines)} lines =====")
        parts.extend(json.dumps(line) for line in lines[:200])
        return "\n".join(parts)


def wait_until_serving(server: Server) -> None:
    """Until every worker has started and the server answers /health; fail with its log."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(
                    f"server {server.name} exited with {server.proc.returncode} during "
                    f"startup:\n{server.log()}"
                )
            if server.started_workers() >= server.workers:
                with contextlib.suppress(httpx.TransportError):
                    if client.get(server.url + "/health").status_code == 200:
                        return
            time.sleep(0.05)
    pytest.fail(f"server {server.name} did not start in {STARTUP_TIMEOUT} s:\n{server.log()}")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    made = Servers(tmp_path=tmp_path, db=tmp_path / "oncely.db", ledger=tmp_path / "ledger.jsonl")
    try:
        yield made
    finally:
        made.stop_all()
        # Shown by pytest when the test fails.
        print(made.report())


@dataclass
class SharedStore:
    """A store of the test's own on a real PostgreSQL (a schema) or Redis (a key prefix).

    ``url`` and ``options`` open it (add timeouts and pool sizes to ``options`` as needed);
    ``direct`` is the same store opened in the test process, to read records with.
    """

    kind: str  # "postgres" or "redis"
    url: str
    options: dict[str, Any]
    direct: AsyncStore

    @property
    def address(self) -> tuple[str, int]:
        """The real server's host and port."""
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or (
            5432 if self.kind == "postgres" else 6379
        )

    def url_via(self, port: int) -> str:
        """The same store reached through a proxy listening on 127.0.0.1:``port``.

        Through the proxy, PostgreSQL statements are not prepared: the proxy names a statement by
        the text its Parse carries, and a prepared statement is parsed once per connection.
        """
        parts = urlsplit(self.url)
        if "cluster" in parts.scheme:
            pytest.skip("a proxy in front of a Redis Cluster is not supported by these tests")
        netloc = parts.netloc.rpartition("@")
        userinfo = netloc[0] + netloc[1]
        if self.kind == "postgres":
            query = "&".join(q for q in (parts.query, "prepare_threshold=none") if q)
            parts = parts._replace(query=query)
        return parts._replace(netloc=f"{userinfo}127.0.0.1:{port}").geturl()

    async def record(self, key: str) -> Record | None:
        """The record under storage key ``key``, read straight from the server."""
        return await self.direct.get(key)


@pytest.fixture(params=["postgres", "redis"])
async def shared_store(
    request: pytest.FixtureRequest, servers: Servers
) -> AsyncIterator[SharedStore]:
    """A schema (PostgreSQL) or key prefix (Redis) of this test's own, removed afterwards; skips
    (fails under ONCELY_REQUIRE_SERVICES=1) when the server does not answer."""
    if request.param == "postgres":
        await backend_postgres.require_server()
        schema = backend_postgres.new_schema()
        store = AsyncPostgresStore(backend_postgres.URL, schema=schema, max_size=2)
        try:
            yield SharedStore("postgres", backend_postgres.URL, {"schema": schema}, store)
        finally:
            servers.stop_all()  # before their schema goes
            await store.aclose()
            await backend_postgres.drop_schema(schema)
    else:
        redis_store = await backend_redis.redis_store()
        try:
            yield SharedStore(
                "redis", backend_redis.REDIS_URL, {"prefix": redis_store.prefix}, redis_store
            )
        finally:
            servers.stop_all()
            await backend_redis.delete_prefix(redis_store.client, redis_store.prefix)
            await redis_store.aclose()


def sha1_of(script: str) -> bytes:
    """The SHA1 that EVALSHA names a Lua script by, as sent."""
    return hashlib.sha1(script.encode()).hexdigest().encode()


# What the proxy calls each store operation: a piece of its statement's text, or its script.
STORE_LABELS: dict[str, dict[bytes, str]] = {
    "postgres": {
        b"INSERT INTO": "claim",
        b"SET response = CASE WHEN state = 'in_flight'": "complete",
        b"SET lease_until = clock.now +": "renew",
        b"WITH gone AS": "release",
    },
    "redis": {
        sha1_of(redis_scripts.CLAIM): "claim",
        sha1_of(redis_scripts.COMPLETE): "complete",
        sha1_of(redis_scripts.RENEW): "renew",
        sha1_of(redis_scripts.RELEASE): "release",
    },
}


@pytest.fixture
def proxy(shared_store: SharedStore) -> Iterator[StoreProxy]:
    """A proxy in front of the shared store's server, stopped after the test."""
    with StoreProxy(
        shared_store.address, shared_store.kind, STORE_LABELS[shared_store.kind]
    ) as made:
        yield made
