"""The demo's bad weather: the service as a process to SIGKILL, and a network that misbehaves.

    service = ServiceProcess(command, log_path, cwd)      # python -m oncely_payments ...
    await service.start()                                  # a new free port; waits for /health
    network = FaultyNetwork(faults, rng)                   # an HTTP/1.1 proxy on 127.0.0.1
    await network.start(); network.upstream_port = service.port
    ...
    await service.kill(); await service.start(); network.upstream_port = service.port

Everything listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx

__all__ = ["LOOPBACK", "Faults", "FaultyNetwork", "ServiceProcess", "free_port"]

LOOPBACK = "127.0.0.1"
HEALTH_TIMEOUT = 30.0
READ_SIZE = 65_536


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """A server command in its own process group, started on a new free port each time.

    ``command`` is the argument list without the port: ``--port N`` is added at each start.
    With ``fixed_port`` every start reuses the first port drawn (the dashboard's URL stays).
    """

    def __init__(
        self, command: Sequence[str], log_path: Path, cwd: Path, *, fixed_port: bool = False
    ) -> None:
        self.command, self.log_path, self.cwd = list(command), log_path, cwd
        self.fixed_port = fixed_port
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> float:
        """Start the server; return once ``GET /health`` answers 200, with the seconds it took."""
        began = time.monotonic()
        self.port = self.port if self.fixed_port and self.port else free_port()
        self.starts += 1
        command = [*self.command, "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            log.write(f"----- start {self.starts}: {' '.join(command)}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() - began < HEALTH_TIMEOUT:
                if self.proc.returncode is not None:
                    await self.kill()
                    raise RuntimeError(f"the service exited at start:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        return time.monotonic() - began
                await asyncio.sleep(0.05)
        await self.kill()
        raise RuntimeError(
            f"the service was not healthy within {HEALTH_TIMEOUT:.0f} s:\n{self.log_tail()}"
        )

    async def kill(self) -> None:
        """SIGKILL every process of the server: no cleanup, no last words."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), timeout=10)
        self.proc = None

    async def stop(self) -> None:
        """Stop politely (SIGTERM), then by force after 5 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout=5)
        await self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Faults:
    """How often the network misbehaves, per request (rates between 0 and 1)."""

    drop: float = 0.0  # read the server's answer, then close the client's connection
    delay: float = 0.0  # hold the request, or its answer, up to ``max_delay`` seconds
    max_delay: float = 0.3
    duplicate: float = 0.0  # send the request to the server twice


class _Closed(Exception):
    """The other side closed the connection before a whole HTTP message arrived."""


def _put(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if data:
        writer.write(data)


async def _read_message(
    reader: asyncio.StreamReader, conn: h11.Connection
) -> tuple[h11.Request | h11.Response, bytes]:
    """One whole HTTP/1.1 message, head and body."""
    head: h11.Request | h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Request | h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return head, bytes(body)
        elif not isinstance(event, h11.InformationalResponse):
            raise _Closed(f"the connection ended at {event!r}")


_Broken = (_Closed, h11.ProtocolError, OSError)


class FaultyNetwork:
    """An HTTP/1.1 proxy on 127.0.0.1, one request per connection, unreliable on purpose.

    Each request opens its own connection to the server. At the configured rates the network
    delays a request or its answer; sends a request to the server twice (the copy's answer is
    read and thrown away); and drops an answer: it reads the server's whole response, so the
    server has acted, then closes the client's connection without sending a byte. While the
    server is down or dies mid-request, the client's connection is closed the same way.
    """

    def __init__(self, faults: Faults, rng: random.Random) -> None:
        self.faults, self.rng = faults, rng
        self.upstream_port = 0
        self.in_flight = 0  # requests the server has and has not answered yet
        self.dropped = self.delayed = self.duplicated = self.upstream_failures = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the network first"
        port: int = self._server.sockets[0].getsockname()[1]
        return f"http://{LOOPBACK}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0, backlog=1024)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _spawn(self, job: asyncio.Task[None]) -> None:
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Run each connection as a task of our own, so that close() can cancel it.
        self._spawn(asyncio.create_task(self._serve(reader, writer)))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = h11.Connection(h11.SERVER)
            try:
                request, body = await _read_message(reader, conn)
            except _Broken:
                return
            assert isinstance(request, h11.Request)
            f, rng = self.faults, self.rng
            delay_request = delay_response = 0.0
            if rng.random() < f.delay:
                self.delayed += 1
                if rng.random() < 0.5:
                    delay_request = rng.uniform(0, f.max_delay)
                else:
                    delay_response = rng.uniform(0, f.max_delay)
            drop = rng.random() < f.drop
            if rng.random() < f.duplicate:
                self.duplicated += 1
                self._spawn(asyncio.create_task(self._send_copy(request, body)))
            await asyncio.sleep(delay_request)
            try:
                response, response_body = await self._exchange(request, body)
            except _Broken:
                self.upstream_failures += 1
                return  # the client sees its connection closed
            if drop:
                self.dropped += 1
                return
            await asyncio.sleep(delay_response)
            assert isinstance(response, h11.Response)
            headers = [(n, v) for n, v in response.headers if n != b"connection"]
            headers.append((b"connection", b"close"))
            head = h11.Response(
                status_code=response.status_code, headers=headers, reason=response.reason
            )
            _put(writer, conn.send(head))
            _put(writer, conn.send(h11.Data(data=response_body)))
            _put(writer, conn.send(h11.EndOfMessage()))
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _send_copy(self, request: h11.Request, body: bytes) -> None:
        await asyncio.sleep(self.rng.uniform(0, 0.02))
        with contextlib.suppress(*_Broken):
            await self._exchange(request, body)

    async def _exchange(
        self, request: h11.Request, body: bytes
    ) -> tuple[h11.Request | h11.Response, bytes]:
        """Send ``request`` to the server on a connection of its own; the whole answer."""
        self.in_flight += 1
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
            try:
                conn = h11.Connection(h11.CLIENT)
                headers = [(n, v) for n, v in request.headers if n != b"connection"]
                headers.append((b"connection", b"close"))
                head = h11.Request(method=request.method, target=request.target, headers=headers)
                _put(writer, conn.send(head))
                _put(writer, conn.send(h11.Data(data=body)))
                _put(writer, conn.send(h11.EndOfMessage()))
                await writer.drain()
                return await _read_message(reader, conn)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        finally:
            self.in_flight -= 1
