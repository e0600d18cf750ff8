"""The chaos demo: thousands of payments through a faulty network and a crashing server, audited.

    python -m oncely_payments.demo [--intents 2000] [--concurrency 32] [--store URL] [--seed N]

Theory of operation
-------------------
The demo starts the payments service as a subprocess on 127.0.0.1 and puts an asyncio proxy
(``chaos.FaultyNetwork``) between it and many concurrent clients::

    clients ───────► FaultyNetwork ───────────────────► python -m oncely_payments ──► ledger + keys
    retry, same key  drops answers after the server       SIGKILLed mid-request, restarted
    until 201 / 402  acted, delays, sends requests twice  card network fails now and then

Each intent is one payment a client means to make: a tenant (API key), a customer of its own,
an amount and an Idempotency-Key. Its client sends it until a final answer: 201, or 402 for a
declined card. 409 (a duplicate in flight), 503, closed connections and timeouts are retried with
the same key, after an exponential backoff with full jitter that honours ``Retry-After``. Some
intents open with a burst of concurrent copies of their first request; some requests get a short
client timeout, so that the client gives up while the server goes on.

Meanwhile the server is SIGKILLed at random points of the run, each time while requests are
inside it, and restarted on the same database. At the end ``audit.audit`` compares the ledger
(through the API) and the card network's records with what the clients intended and were told.
Any problem, any answer other than 201, 402, 409 or 503, or a crash that did not happen makes
the demo exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .audit import ApiLedger, AuditReport, Intent, Kind, Outcome, audit, card_network_charges
from .chaos import LOOPBACK, Faults, FaultyNetwork, ServiceProcess

__all__ = ["DemoConfig", "DemoResult", "Stats", "main", "parse_args", "plan", "run", "summary"]


@dataclass(frozen=True)
class DemoConfig:
    intents: int = 6000
    concurrency: int = 32
    tenants: int = 4
    decline_rate: float = 0.1  # of intents
    flaky_rate: float = 0.1  # of intents
    burst_rate: float = 0.03  # of intents
    burst_size: int = 5
    drop_rate: float = 0.05  # of requests, and so on below
    delay_rate: float = 0.05
    max_delay: float = 0.3
    duplicate_rate: float = 0.05
    timeout_rate: float = 0.05
    crashes: int = 3
    store: str | None = None  # None: a SQLite file in the work directory
    seed: int | None = None  # None: drawn at random, and shown
    card_latency_ms: float = 20.0
    card_failure_rate: float = 0.03
    lease: float = 3.0
    ttl: float = 3600.0
    max_attempts: int = 100  # per intent
    intent_deadline: float = 120.0  # seconds per intent
    workdir: Path | None = None  # None: a temporary directory, removed at the end
    keep: bool = False  # keep the service (and its dashboard) up after the audit, until Ctrl-C


@dataclass
class Stats:
    """What the clients saw, counted as it happens."""

    finished: int = 0  # intents with a final answer (or given up)
    requests: int = 0
    retries: int = 0
    replays: int = 0  # answers with Idempotent-Replayed: true
    conflicts: int = 0  # 409
    unavailable: int = 0  # 503
    unexpected: int = 0  # any other status but 201 and 402
    client_timeouts: int = 0
    connection_errors: int = 0
    crashes: int = 0
    cut_by_crashes: int = 0  # requests inside the server when it was killed
    traffic_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Configuration and plan


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a rate between 0 and 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="oncely demo",
        description="Payments through a faulty network and a crashing server, then an audit. "
        "Exits 1 if any payment was lost, doubled or answered inconsistently.",
        epilog="examples (python -m oncely_payments.demo and make demo ARGS='...' take the\n"
        "same flags):\n"
        "  oncely demo --intents 500 --crashes 3\n"
        "  oncely demo --store postgresql://postgres@127.0.0.1:5432/app\n"
        "  oncely demo --keep      # the dashboard stays up after the audit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_argument_group("size")
    size.add_argument("--intents", type=_positive, default=d.intents, help="payments to make")
    size.add_argument("--concurrency", type=_positive, default=d.concurrency, help="clients")
    size.add_argument("--tenants", type=_positive, default=d.tenants, help="API keys")
    mix = p.add_argument_group("customers and bursts (rates of intents, 0-1)")
    mix.add_argument("--decline-rate", type=_rate, default=d.decline_rate, help="cus_decline_*")
    mix.add_argument("--flaky-rate", type=_rate, default=d.flaky_rate, help="cus_flaky_*")
    mix.add_argument("--burst-rate", type=_rate, default=d.burst_rate)
    mix.add_argument("--burst-size", type=_positive, default=d.burst_size, help="copies at once")
    net = p.add_argument_group("network and crashes (rates of requests, 0-1)")
    net.add_argument("--drop-rate", type=_rate, default=d.drop_rate, help="answers lost")
    net.add_argument("--delay-rate", type=_rate, default=d.delay_rate)
    net.add_argument("--max-delay", type=_seconds, default=d.max_delay, help="seconds")
    net.add_argument("--duplicate-rate", type=_rate, default=d.duplicate_rate, help="sent twice")
    net.add_argument("--timeout-rate", type=_rate, default=d.timeout_rate, help="short timeouts")
    net.add_argument("--crashes", type=_count, default=d.crashes, help="SIGKILLs of the server")
    svc = p.add_argument_group("service")
    svc.add_argument("--store", default=d.store, help="postgresql://...; default SQLite")
    svc.add_argument("--card-latency-ms", type=float, default=d.card_latency_ms)
    svc.add_argument("--card-failure-rate", type=_rate, default=d.card_failure_rate)
    svc.add_argument("--lease", type=_seconds, default=d.lease, help="seconds")
    svc.add_argument("--ttl", type=_seconds, default=d.ttl, help="seconds")
    p.add_argument("--seed", type=int, default=d.seed, help="default: random, and shown")
    p.add_argument("--workdir", type=Path, default=d.workdir, help="keep the database and logs")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the service and its dashboard up after the audit, until Ctrl-C",
    )
    a = p.parse_args(argv)
    if a.decline_rate + a.flaky_rate > 1:
        p.error("--decline-rate and --flaky-rate add up to more than 1")
    if a.store and not a.store.lower().startswith(("sqlite:", "postgresql:", "postgres:")):
        p.error(f"--store {a.store!r}: the demo runs on sqlite:PATH or postgresql://...")
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    return DemoConfig(**{k: v for k, v in vars(a).items() if k in names})


def plan(cfg: DemoConfig, rng: random.Random, run_id: str) -> list[Intent]:
    """The run's intents: a customer of its own each, on tenants unique to the run."""
    tenants = [f"sk_demo_{run_id}_{t}" for t in range(cfg.tenants)]
    intents = []
    for n in range(cfg.intents):
        draw = rng.random()
        if draw < cfg.decline_rate:
            kind, prefix = Kind.DECLINE, "cus_decline"
        elif draw < cfg.decline_rate + cfg.flaky_rate:
            kind, prefix = Kind.FLAKY, "cus_flaky"
        else:
            kind, prefix = Kind.NORMAL, "cus"
        intents.append(
            Intent(
                number=n,
                tenant=rng.choice(tenants),
                key=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                customer=f"{prefix}_{run_id}_{n}",
                amount=rng.randint(100, 100_000),
                kind=kind,
                burst=cfg.burst_size if rng.random() < cfg.burst_rate else 1,
            )
        )
    return intents


# ---------------------------------------------------------------------------------------------
# The clients


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0  # an HTTP-date: the backoff alone decides


class Clients:
    """Sends every intent until it has a final answer, and writes down what it was told."""

    BACKOFF_BASE = 0.05
    BACKOFF_CAP = 2.0
    TIMEOUT = 15.0
    SHORT_TIMEOUT = (0.005, 0.15)  # seconds, drawn for a --timeout-rate share of requests

    def __init__(
        self,
        cfg: DemoConfig,
        rng: random.Random,
        stats: Stats,
        client: httpx.AsyncClient,
        outcomes: dict[int, Outcome],
    ) -> None:
        self.cfg, self.rng, self.stats, self.client = cfg, rng, stats, client
        self.outcomes = outcomes

    async def run_all(self, intents: Sequence[Intent]) -> None:
        todo = iter(intents)

        async def client() -> None:
            for intent in todo:
                await self.pay(intent)
                self.stats.finished += 1

        await asyncio.gather(*(client() for _ in range(self.cfg.concurrency)))

    async def pay(self, intent: Intent) -> None:
        outcome = self.outcomes.setdefault(intent.number, Outcome())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.intent_deadline
        for attempt in range(self.cfg.max_attempts):
            if attempt:
                self.stats.retries += 1
            copies = intent.burst if attempt == 0 else 1
            waits = await asyncio.gather(*(self.send(intent, outcome) for _ in range(copies)))
            if outcome.status is not None or loop.time() >= deadline:
                break
            # Full jitter (a random wait up to the exponential cap), but never before the
            # server's Retry-After.
            backoff = self.rng.uniform(0, min(self.BACKOFF_CAP, self.BACKOFF_BASE * 2**attempt))
            await asyncio.sleep(max(backoff, *waits))
        if outcome.status is None:
            outcome.problems.append(
                f"intent {intent.number} ({intent.customer}): no final answer after "
                f"{outcome.requests} requests"
            )

    async def send(self, intent: Intent, outcome: Outcome) -> float:
        """Send the intent's request once; the seconds the server asked to wait."""
        self.stats.requests += 1
        outcome.requests += 1
        timeout = self.TIMEOUT
        if self.rng.random() < self.cfg.timeout_rate:
            timeout = self.rng.uniform(*self.SHORT_TIMEOUT)
        try:
            response = await self.client.post(
                "/payments", content=intent.body(), headers=intent.headers(), timeout=timeout
            )
        except httpx.TimeoutException:
            self.stats.client_timeouts += 1
            return 0.0
        except httpx.TransportError:
            self.stats.connection_errors += 1
            return 0.0
        if response.headers.get("idempotent-replayed") == "true":
            self.stats.replays += 1
        status = response.status_code
        if status in (201, 402):
            self._final(intent, outcome, response)
        elif status == 409:
            self.stats.conflicts += 1
        elif status == 503:
            self.stats.unavailable += 1
        else:
            self.stats.unexpected += 1
            outcome.problems.append(
                f"intent {intent.number} ({intent.customer}): unexpected {status}: "
                f"{response.text[:300]}"
            )
            if status < 500:  # the request itself is wrong: the same request cannot succeed
                outcome.status = status
        return _retry_after(response)

    def _final(self, intent: Intent, outcome: Outcome, response: httpx.Response) -> None:
        status, where = response.status_code, f"intent {intent.number} ({intent.customer})"
        try:
            body = response.json()
        except ValueError:
            body = None
        # 201 answers with the payment; 402 with a problem that carries the failed payment.
        payment = body.get("payment") if status == 402 and isinstance(body, dict) else body
        if not isinstance(payment, dict):
            payment = {}
        payment_id = payment.get("id")
        want = {
            "amount": intent.amount,
            "currency": intent.currency,
            "customer": intent.customer,
            "status": "succeeded" if status == 201 else "failed",
        }
        if status != intent.final_status:
            outcome.problems.append(f"{where}: answered {status}, expected {intent.final_status}")
        if {k: payment.get(k) for k in want} != want or not isinstance(payment_id, str):
            outcome.problems.append(f"{where}: {status} with {body!r}, expected {want!r}")
            return
        location = response.headers.get("location")
        if location != f"/payments/{payment_id}":
            outcome.problems.append(f"{where}: Location {location!r} for {payment_id}")
        outcome.ids_seen.add(payment_id)
        if outcome.status is None:
            outcome.status, outcome.payment_id = status, payment_id


# ---------------------------------------------------------------------------------------------
# The crashes


def crash_points(count: int, rng: random.Random) -> list[float]:
    """Shares of the intents finished at which to crash: random, spread over the run."""
    lo, hi = 0.1, 0.85
    width = (hi - lo) / max(count, 1)
    return [lo + width * (i + rng.uniform(0.15, 0.85)) for i in range(count)]


async def crash_loop(
    cfg: DemoConfig,
    rng: random.Random,
    stats: Stats,
    service: ServiceProcess,
    network: FaultyNetwork,
    done: asyncio.Event,
    say: Callable[[str], None],
) -> None:
    """SIGKILL the service at random points while requests are inside it, and restart it."""
    for point in crash_points(cfg.crashes, rng):
        while stats.finished < point * cfg.intents:
            if done.is_set():
                return
            await asyncio.sleep(0.01)
        # Wait (a bounded while) for requests inside the server, then a random moment more,
        # so that the kill lands inside handlers: in a phase, or during the card network call.
        for _ in range(500):
            if network.in_flight or done.is_set():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0, 2 * cfg.card_latency_ms / 1000))
        inside = network.in_flight
        await service.kill()
        stats.crashes += 1
        stats.cut_by_crashes += inside
        await asyncio.sleep(rng.uniform(0.05, 0.5))  # down a moment: connections are refused
        took = await service.start()
        network.upstream_port = service.port
        say(
            f"SIGKILL {stats.crashes} at {stats.finished}/{cfg.intents} intents with {inside} "
            f"requests inside the server; back on port {service.port} in {took:.1f} s"
        )


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class DemoResult:
    config: DemoConfig
    seed: int
    store: str
    workdir: Path
    intents: list[Intent]
    outcomes: dict[int, Outcome]
    stats: Stats
    network: FaultyNetwork
    report: AuditReport
    elapsed: float
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.ok


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="oncely-demo-") as tmp:
        yield Path(tmp)


def service_command(cfg: DemoConfig, store: str, workdir: Path) -> list[str]:
    """``python -m oncely_payments`` with the demo's settings (the port is added at start)."""
    return [
        sys.executable,
        "-m",
        "oncely_payments",
        "--store",
        store,
        "--host",
        LOOPBACK,
        "--card-latency-ms",
        repr(cfg.card_latency_ms),
        "--card-failure-rate",
        repr(cfg.card_failure_rate),
        "--card-network-db",
        str(workdir / "card-network.db"),
        "--ttl",
        repr(cfg.ttl),
        "--lease",
        repr(cfg.lease),
        "--demo-status",
        str(workdir / STATUS_FILE),
    ]


STATUS_FILE = "demo-status.json"


def write_status(workdir: Path, **status: object) -> None:
    """What the dashboard's audit panel reads: the demo's progress, then the audit's verdict."""
    path = workdir / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status), "utf-8")
    tmp.replace(path)


async def run(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    """Start the service, send every intent through the faults, audit: the whole demo."""
    console = console or Console()
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(32)
    rng = random.Random(seed)
    run_id = secrets.token_hex(4)  # not from the seed: runs on one database never meet
    intents = plan(cfg, rng, run_id)
    outcomes: dict[int, Outcome] = {}
    stats = Stats()
    faults = Faults(
        drop=cfg.drop_rate,
        delay=cfg.delay_rate,
        max_delay=cfg.max_delay,
        duplicate=cfg.duplicate_rate,
    )
    network = FaultyNetwork(faults, random.Random(rng.random()))
    log: list[str] = []
    began = time.monotonic()
    with _workdir(cfg.workdir) as workdir:
        store = cfg.store or f"sqlite:{workdir / 'payments.db'}"
        console.print(
            f"[bold]oncely payments demo[/]: {cfg.intents} payments, {cfg.concurrency} clients, "
            f"{cfg.tenants} tenants, {cfg.crashes} crashes; seed {seed}; store {store}",
            highlight=False,
        )
        service = ServiceProcess(
            service_command(cfg, store, workdir), workdir / "service.log", workdir, fixed_port=True
        )
        write_status(workdir, intended=cfg.intents, finished=0)
        try:
            await service.start()
            console.print(f"dashboard: [bold]{service.url}/dashboard[/]", highlight=False)
            await network.start()
            network.upstream_port = service.port
            try:
                await _traffic(
                    cfg, rng, stats, service, network, intents, outcomes, console, log, workdir
                )
            finally:
                await network.close()
            with console.status("auditing the ledger and the card network"):
                limits = httpx.Limits(max_connections=16)
                async with httpx.AsyncClient(
                    base_url=service.url, timeout=30.0, limits=limits, trust_env=False
                ) as direct:
                    report = await audit(
                        intents,
                        outcomes,
                        ApiLedger(direct),
                        charges=card_network_charges(workdir / "card-network.db"),
                    )
            if stats.crashes < cfg.crashes:
                report.chaos.append(f"only {stats.crashes} of {cfg.crashes} crashes happened")
            write_status(
                workdir,
                intended=cfg.intents,
                finished=stats.finished,
                audit="passed" if report.ok else f"failed: {len(report.problems)} problems",
            )
            if cfg.keep:
                await _keep(service, console)
        finally:
            await service.stop()
    return DemoResult(
        cfg,
        seed,
        store,
        workdir,
        intents,
        outcomes,
        stats,
        network,
        report,
        time.monotonic() - began,
        log,
    )


async def _traffic(
    cfg: DemoConfig,
    rng: random.Random,
    stats: Stats,
    service: ServiceProcess,
    network: FaultyNetwork,
    intents: list[Intent],
    outcomes: dict[int, Outcome],
    console: Console,
    log: list[str],
    workdir: Path,
) -> None:
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    began = time.monotonic()
    progress = Progress(
        TextColumn("[bold blue]payments"),
        BarColumn(bar_width=None),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    live = Live(Group(progress, _Counters(stats, network)), console=console)

    def say(message: str) -> None:
        log.append(message)
        live.console.print(f"  {message}", highlight=False)

    async with httpx.AsyncClient(base_url=network.url, limits=limits, trust_env=False) as http:
        clients = Clients(cfg, random.Random(rng.random()), stats, http, outcomes)
        with live:
            bar = progress.add_task("payments", total=cfg.intents)
            crashes = asyncio.create_task(
                crash_loop(cfg, random.Random(rng.random()), stats, service, network, done, say)
            )
            sending = asyncio.create_task(clients.run_all(intents))
            try:
                written = 0.0
                while not sending.done():
                    progress.update(bar, completed=stats.finished)
                    if time.monotonic() - written >= 1.0:
                        write_status(workdir, intended=cfg.intents, finished=stats.finished)
                        written = time.monotonic()
                    await asyncio.wait(
                        {sending} if crashes.done() else {sending, crashes}, timeout=0.1
                    )
                    if crashes.done() and not crashes.cancelled() and crashes.exception():
                        break
                done.set()
                await crashes  # a restart under way finishes first; its failure is raised
                await sending
            finally:
                for task in (crashes, sending):
                    task.cancel()
                await asyncio.gather(crashes, sending, return_exceptions=True)
                stats.traffic_seconds = time.monotonic() - began
                progress.update(bar, completed=stats.finished)
    if not console.is_terminal:
        console.line()  # rich leaves the last line of a live display open on a file or pipe


async def _keep(service: ServiceProcess, console: Console) -> None:
    """Keep the service up for a look at its dashboard, until Ctrl-C."""
    console.print(
        f"the service stays up: [bold]{service.url}/dashboard[/] (Ctrl-C to stop; the audit "
        "follows)",
        highlight=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)


class _Counters:
    """The line under the progress bar: what the clients and the network went through so far."""

    def __init__(self, stats: Stats, network: FaultyNetwork) -> None:
        self.stats, self.network = stats, network

    def __rich__(self) -> Text:
        s, n = self.stats, self.network
        return Text(
            f"requests {s.requests} · retries {s.retries} · replays {s.replays} · "
            f"409s {s.conflicts} · 503s {s.unavailable} · dropped {n.dropped} · "
            f"timeouts {s.client_timeouts} · kills {s.crashes}",
            style="dim",
        )


# ---------------------------------------------------------------------------------------------
# The table and the verdict


def summary(result: DemoResult) -> Table:
    """The final table: what was intended, what the faults did, what the audit found."""
    s, r, n, cfg = result.stats, result.report, result.network, result.config
    kinds = {kind: sum(1 for i in result.intents if i.kind is kind) for kind in Kind}
    bursts = sum(1 for i in result.intents if i.burst > 1)
    secs = max(s.traffic_seconds, 1e-9)
    table = Table(title=f"oncely payments demo · seed {result.seed}", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("", style="dim")

    def bad(count: int) -> str:
        return f"[bold red]{count}[/]" if count else "[bold green]0[/]"

    rows = [
        (
            "payments intended",
            str(len(result.intents)),
            f"{kinds[Kind.NORMAL]} normal, {kinds[Kind.DECLINE]} declined, "
            f"{kinds[Kind.FLAKY]} flaky; {cfg.tenants} tenants",
        ),
        ("requests sent", str(s.requests), f"{cfg.concurrency} concurrent clients"),
        ("retries", str(s.retries), "same key, backoff with full jitter"),
        ("replays served", str(s.replays), "Idempotent-Replayed: true"),
        ("409 in flight", str(s.conflicts), "a duplicate was running"),
        ("503 unavailable", str(s.unavailable), "card network down, flaky customers"),
        ("responses dropped", str(n.dropped), "after the server acted"),
        ("client timeouts", str(s.client_timeouts), "the client gave up, the server went on"),
        ("connection errors", str(s.connection_errors), "server down or killed mid-request"),
        ("sent twice by the network", str(n.duplicated), ""),
        ("delayed by the network", str(n.delayed), f"up to {cfg.max_delay:g} s"),
        ("duplicate bursts", str(bursts), f"{cfg.burst_size} copies at once"),
        ("crashes survived", str(s.crashes), f"SIGKILL; {s.cut_by_crashes} requests inside"),
        ("payments in the ledger", str(r.payments), f"{r.charges} card network charges"),
        ("duplicates found", bad(len(r.duplicates)), "intents with more than one payment"),
        ("lost", bad(len(r.lost)), "intents with no payment"),
        ("other problems", bad(len(r.problems) - len(r.duplicates) - len(r.lost)), ""),
        ("throughput", f"{len(result.intents) / secs:.1f}", "intents/s"),
        ("", f"{s.requests / secs:.1f}", "requests/s"),
        ("time", f"{s.traffic_seconds:.1f} s", f"{result.elapsed:.1f} s with start and audit"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def verdict(result: DemoResult, console: Console) -> int:
    """Print the table and the audit's findings; the exit status (0 when all is well)."""
    console.print(summary(result))
    report = result.report
    if report.ok:
        console.print(
            f"[bold green]audit passed[/]: {len(result.intents)} payments, each took effect "
            "exactly once, and every client was told so.",
            highlight=False,
        )
        return 0
    console.print(f"[bold red]audit failed[/]: {len(report.problems)} problems", highlight=False)
    for problem in report.problems[:20]:
        console.print(f"  - {problem}", markup=False, highlight=False)
    if len(report.problems) > 20:
        console.print(f"  ... and {len(report.problems) - 20} more", highlight=False)
    if result.config.workdir is None:
        console.print("Run again with --workdir DIR to keep the database and the service's log.")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    console = Console()
    try:
        result = asyncio.run(run(cfg, console))
    except RuntimeError as exc:
        console.print(f"[bold red]demo failed[/]: {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130
    return verdict(result, console)


if __name__ == "__main__":
    sys.exit(main())
