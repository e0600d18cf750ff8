"""A TCP proxy the test controls, in front of a real PostgreSQL or Redis.

It runs on a thread of its own, with its own event loop, so that it keeps forwarding while the
test blocks (starting a server, reading a file) and whatever the test's loop is doing. Every
control method is called from the test and returns once the proxy has done it.

Modes, for connections made from then on and for live ones:

- ``PASS``: forward both ways.
- ``REFUSE``: live connections are reset, new ones are reset as soon as they are accepted (the
  server is down, or restarting).
- ``HANG``: connections are accepted and nothing is forwarded either way: what was sent is held
  (as a network that has stopped delivering holds it) and delivered when the mode is ``PASS``
  again. A client that gave up meanwhile has closed its end; what it had sent still arrives.
- ``GARBLE``: the server's answers reach the client as bytes of no protocol (a protocol error).

And two one-off faults:

- :meth:`StoreProxy.cut` resets every live connection now; new ones are served.
- :meth:`StoreProxy.trap` arms a trap for the next client read that contains a pattern (a
  statement's text, a script's SHA1): the connection carrying it is reset either before the
  message is forwarded (the server never sees it) or after the server has answered it (the
  server did it, the client never hears so).

The proxy also reads the client side of the protocol (PostgreSQL's frontend messages, Redis's
RESP commands) and counts what clients sent: :meth:`StoreProxy.sent` is a ``Counter`` of message
names (``Parse``, ``Sync``, ``Query`` ...; ``EVALSHA``, ``HGETALL`` ...). ``labels`` name
statements and scripts: a PostgreSQL ``Parse`` or ``Query`` whose text contains a label's bytes
counts as ``Parse <label>``, a Redis ``EVALSHA`` of a label's SHA1 as ``EVALSHA <label>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

CHUNK = 65536
GARBAGE = b"\x7f"  # a message type neither PostgreSQL's nor Redis's protocol has
CONTROL_TIMEOUT = 10.0
REPLY_WAIT = 5.0  # how long a trap that forwards waits for the server's answer before the cut


class Mode(enum.Enum):
    PASS = "pass"
    REFUSE = "refuse"
    HANG = "hang"
    GARBLE = "garble"


class Reader(Protocol):
    """Reads one direction of a protocol; returns the names of the messages completed so far."""

    def feed(self, data: bytes) -> list[str]: ...


_PG_NAMES = {
    "P": "Parse",
    "B": "Bind",
    "D": "Describe",
    "E": "Execute",
    "S": "Sync",
    "Q": "Query",
    "H": "Flush",
    "C": "Close",
    "X": "Terminate",
    "p": "Password",
    "F": "FunctionCall",
    "d": "CopyData",
    "c": "CopyDone",
    "f": "CopyFail",
}
_PG_SSL, _PG_GSSENC, _PG_CANCEL = 80877103, 80877104, 80877102


class PostgresFrontend:
    """PostgreSQL messages from client to server: the untyped startup packets, then typed ones.

    Encrypted connections (the server said yes to SSLRequest) are not read: nothing is counted
    on them.
    """

    def __init__(self, labels: Mapping[bytes, str]) -> None:
        self.labels = labels
        self.buf = bytearray()
        self.started = False
        self.opaque = False

    def feed(self, data: bytes) -> list[str]:
        if self.opaque:
            return []
        buf = self.buf
        buf += data
        names: list[str] = []
        while True:
            if not self.started:
                if buf[:1] == b"\x16":  # a TLS handshake
                    self.opaque = True
                    buf.clear()
                    return names
                if len(buf) < 8:
                    return names
                size = int.from_bytes(buf[0:4], "big")
                if len(buf) < size:
                    return names
                code = int.from_bytes(buf[4:8], "big")
                del buf[:size]
                if code in (_PG_SSL, _PG_GSSENC):
                    names.append("SSLRequest" if code == _PG_SSL else "GSSENCRequest")
                elif code == _PG_CANCEL:
                    names.append("CancelRequest")
                else:
                    names.append("Startup")
                    self.started = True
                continue
            if len(buf) < 5:
                return names
            size = int.from_bytes(buf[1:5], "big")
            if len(buf) < 1 + size:
                return names
            kind = chr(buf[0])
            name = _PG_NAMES.get(kind, kind)
            if kind in "PQ":
                text = bytes(buf[5 : 1 + size])
                for pattern, label in self.labels.items():
                    if pattern in text:
                        name = f"{name} {label}"
                        break
            del buf[: 1 + size]
            names.append(name)


class RedisRequests:
    """Redis commands from client to server (RESP arrays of bulk strings)."""

    def __init__(self, labels: Mapping[bytes, str]) -> None:
        self.buf = bytearray()
        self.labels = labels

    def _line(self, at: int) -> tuple[bytes, int] | None:
        end = self.buf.find(b"\r\n", at)
        if end < 0:
            return None
        return bytes(self.buf[at:end]), end + 2

    def _command(self) -> tuple[list[bytes], int] | None:
        head = self._line(0)
        if head is None:
            return None
        line, at = head
        if not line.startswith(b"*"):  # an inline command
            return line.split(), at
        args: list[bytes] = []
        for _ in range(int(line[1:])):
            size_line = self._line(at)
            if size_line is None:
                return None
            size, at = int(size_line[0][1:]), size_line[1]
            if len(self.buf) < at + size + 2:
                return None
            args.append(bytes(self.buf[at : at + size]))
            at += size + 2
        return args, at

    def feed(self, data: bytes) -> list[str]:
        self.buf += data
        names: list[str] = []
        while (parsed := self._command()) is not None:
            args, used = parsed
            del self.buf[:used]
            if not args:
                continue
            name = args[0].decode("latin-1").upper()
            if name in ("EVALSHA", "EVAL") and len(args) > 1 and args[1] in self.labels:
                name = f"{name} {self.labels[args[1]]}"
            names.append(name)
        return names


@dataclass
class Trap:
    """Resets the connection that carries the next client message containing ``pattern``."""

    pattern: bytes
    forward: bool  # let the server do it, and drop its answer
    sprung: threading.Event = field(default_factory=threading.Event)
    answered: bool = False  # the server answered before the cut (only when forwarding)


class _Link:
    """One client connection and, once something is to be forwarded, its upstream connection.

    Registered with the proxy from the moment it is accepted until both directions are done.
    """

    def __init__(
        self, proxy: StoreProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = reader, writer
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.frontend = proxy._reader()
        self.muted = False  # a trap is cutting this link: the server's answers go nowhere
        self.answered = asyncio.Event()
        self.closed = False

    def abort(self) -> None:
        """Reset both connections (RST, not FIN); their readers see the end at once."""
        if self.closed:
            return
        self.closed = True
        self.client_writer.transport.abort()
        if self.upstream is not None:
            self.upstream[1].transport.abort()

    def _close(self) -> None:
        """Both directions are done: close what is left open, and forget this link."""
        self.client_writer.close()
        if self.upstream is not None:
            self.upstream[1].close()
        self.proxy._links.discard(self)

    async def run(self) -> None:
        try:
            await self._client_to_server()
        except OSError:
            self.abort()
        if self.upstream is None or self.closed:
            self._close()  # else the server's side closes the link when it is done

    async def _client_to_server(self) -> None:
        proxy = self.proxy
        while True:
            await proxy._flowing.wait()
            data = await self.client_reader.read(CHUNK)
            await proxy._flowing.wait()  # read just before a hang: held, not forwarded
            if self.closed:
                return
            if not data:
                if self.upstream is not None and self.upstream[1].can_write_eof():
                    self.upstream[1].write_eof()
                return
            if self.upstream is None:
                try:
                    self.upstream = await asyncio.open_connection(*proxy.target)
                except OSError:
                    self.abort()
                    return
                proxy._spawn(self._server_to_client())
            writer = self.upstream[1]
            trap = proxy._take_trap(data)
            if (trap is None or trap.forward) and self.frontend is not None:
                proxy._count(self.frontend.feed(data))
            if trap is None:
                writer.write(data)
                await writer.drain()
                continue
            self.muted = True
            if trap.forward:
                writer.write(data)
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REPLY_WAIT):
                        await self.answered.wait()
                trap.answered = self.answered.is_set()
            self.abort()
            trap.sprung.set()
            return

    async def _server_to_client(self) -> None:
        assert self.upstream is not None
        reader = self.upstream[0]
        try:
            while True:
                await self.proxy._flowing.wait()
                data = await reader.read(CHUNK)
                await self.proxy._flowing.wait()
                if self.closed or not data:
                    return
                if self.muted:
                    self.answered.set()
                    continue
                if self.proxy.mode is Mode.GARBLE:
                    data = GARBAGE * len(data)
                self.client_writer.write(data)
                await self.client_writer.drain()
        except OSError:
            self.abort()
        finally:
            self._close()


class StoreProxy:
    """Listens on 127.0.0.1 (``port``) and forwards to ``target``; see the module docstring.

    ``protocol`` ("postgres" or "redis") says how to read what clients send, for :meth:`sent`.
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        protocol: str | None = None,
        labels: Mapping[bytes, str] | None = None,
    ) -> None:
        self.target = target
        self.protocol = protocol
        self.labels = dict(labels or {})
        self.port = 0
        self.mode = Mode.PASS
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="store-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()  # set while traffic passes; bound to the proxy's loop
        self._flowing.set()
        self._traps: list[Trap] = []
        self._lock = threading.Lock()
        self._sent: Counter[str] = Counter()

    # Run by the test ---------------------------------------------------------------------------

    def __enter__(self) -> StoreProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        self._loop.close()

    def set_mode(self, mode: Mode) -> None:
        self._call(self._set_mode(mode))

    def cut(self) -> int:
        """Reset every live connection; the count reset."""
        return self._call(self._cut())

    def trap(self, pattern: bytes, *, forward: bool) -> Trap:
        trap = Trap(pattern, forward)
        with self._lock:
            self._traps.append(trap)
        return trap

    def sent(self) -> Counter[str]:
        """What clients have sent through the proxy so far, by message name."""
        with self._lock:
            return Counter(self._sent)

    # On the proxy's loop -----------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        sock: socket.socket = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._cut()
        self._flowing.set()
        await self._server.wait_closed()
        # Every connection is reset and traffic flows: what is left ends by itself.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        _, pending = await asyncio.wait(others, timeout=CONTROL_TIMEOUT / 2) if others else ((), ())
        for task in pending:
            task.cancel()

    async def _set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode is Mode.REFUSE:
            await self._cut()
        if mode is Mode.HANG:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is Mode.REFUSE:
            writer.transport.abort()
            return
        link = _Link(self, reader, writer)
        self._links.add(link)
        await link.run()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # a task no one holds can be collected while it waits
        task.add_done_callback(self._tasks.discard)

    def _reader(self) -> Reader | None:
        if self.protocol == "postgres":
            return PostgresFrontend(self.labels)
        if self.protocol == "redis":
            return RedisRequests(self.labels)
        return None

    def _count(self, names: list[str]) -> None:
        if names:
            with self._lock:
                self._sent.update(names)

    def _take_trap(self, data: bytes) -> Trap | None:
        with self._lock:
            for trap in self._traps:
                if trap.pattern in data:
                    self._traps.remove(trap)
                    return trap
        return None
