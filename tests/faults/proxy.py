"""A PostgreSQL proxy that loses the reply to a committed statement.

It listens on 127.0.0.1 and forwards each connection to the server's Unix socket, reading
the protocol's message frames on the way. Armed with a pattern (:meth:`PgProxy.arm`), the
next connection that sends a matching statement (a simple query, a Parse, or a Bind of a
statement prepared earlier with matching text) keeps passing replies through while its
transaction stays open; the reply that ends that transaction (ReadyForQuery with status
idle: committed, or rolled back after an error) is thrown away and both sides of the
connection are closed. The client never learns whether its statement committed.

Clients must connect with ``sslmode=disable gssencmode=disable`` (a request for either is
refused here, as a server without them would).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from dataclasses import dataclass, field

import anyio
import anyio.abc

_STARTUP_CODES = {80877103, 80877104}  # SSLRequest, GSSENCRequest
_CHUNK = 65536


@dataclass
class Drop:
    """One reply the proxy threw away."""

    pattern: str
    statement: str
    committed: bool
    """``False`` if the transaction failed (an error reply came before the end)."""


@dataclass
class _Frames:
    """Splits a byte stream into protocol messages (type byte, length, body)."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        """Return the complete messages in ``data`` and what came before: (type, body,
        raw bytes)."""
        self.buffer += data
        out: list[tuple[int, bytes, bytes]] = []
        while len(self.buffer) >= 5:
            (length,) = struct.unpack_from("!i", self.buffer, 1)
            end = 1 + length
            if len(self.buffer) < end:
                break
            raw = bytes(self.buffer[:end])
            out.append((raw[0], raw[5:], raw))
            del self.buffer[:end]
        return out


def _cstrings(body: bytes, count: int) -> list[str]:
    parts = body.split(b"\0", count)
    return [p.decode("utf-8", "replace") for p in parts[:count]]


class PgProxy:
    """Forwards connections from ``127.0.0.1:port`` to ``upstream`` (a Unix socket path).

    Use ``async with PgProxy(path) as proxy:``; :attr:`port` is set inside the block.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = 0
        self.connections = 0
        self.drops: list[Drop] = []
        self._armed: re.Pattern[str] | None = None
        self._armed_text = ""
        self._dropped = anyio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> PgProxy:
        # Plain asyncio streams: they stay quiet when a connection is cut mid-write.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with anyio.CancelScope(shield=True):
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._server.wait_closed()

    def arm(self, pattern: str) -> None:
        """Lose the reply that ends the transaction of the next statement matching
        ``pattern`` (a regular expression searched in its SQL text); one shot."""
        self._armed = re.compile(pattern)
        self._armed_text = pattern
        self._dropped = anyio.Event()

    def disarm(self) -> None:
        """Forget an armed drop that has not happened."""
        self._armed = None

    @property
    def armed(self) -> bool:
        """Whether a drop is armed and has not happened yet."""
        return self._armed is not None

    async def wait_dropped(self) -> None:
        """Wait until the armed drop happened."""
        await self._dropped.wait()

    def _take(self, sql: str) -> str | None:
        """If ``sql`` matches the armed pattern, disarm and return the pattern."""
        if self._armed is not None and self._armed.search(sql):
            self._armed = None
            return self._armed_text
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        client = _Stream(reader, writer)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        except OSError:
            client.close()
            self._tasks.discard(task)
            return
        server = _Stream(up_reader, up_writer)
        try:
            await _Connection(self, client, server).run()
        finally:
            client.close()
            server.close()
            self._tasks.discard(task)


class _Stream:
    """One side of a proxied connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def receive(self) -> bytes | None:
        """The next bytes, or ``None`` once the peer is gone."""
        try:
            return await self.reader.read(_CHUNK) or None
        except OSError:
            return None

    async def send(self, data: bytes) -> bool:
        """Send ``data``; ``False`` if the peer is gone."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()


class _Connection:
    """One client connection and its server connection."""

    def __init__(self, proxy: PgProxy, client: _Stream, server: _Stream) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.prepared: dict[str, str] = {}
        self.doomed: tuple[str, str] | None = None  # (pattern, statement) once matched
        self.held = bytearray()
        self.failed = False
        self.outstanding = 1  # the ReadyForQuery that ends the startup
        """Requests (Sync, simple Query) sent whose ReadyForQuery has not come back."""
        self.flushed = False
        """Whether the client's last message was a Flush: it may be waiting for replies
        that no ReadyForQuery follows."""
        self.skip = 0
        """Of those, the ones sent before the doomed statement."""

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self._from_client)
            tg.start_soon(self._from_server)

    def _close(self) -> None:
        self.tg.cancel_scope.cancel()

    async def _startup(self) -> bytes | None:
        """Pass the startup message on (refusing SSL and GSS encryption); return the bytes
        read past it, or ``None`` if the client went away."""
        data = b""
        while True:
            while len(data) < 8:
                chunk = await self.client.receive()
                if chunk is None:
                    return None
                data += chunk
            length, code = struct.unpack_from("!ii", data)
            while len(data) < length:
                chunk = await self.client.receive()
                if chunk is None:
                    return None
                data += chunk
            message, data = data[:length], data[length:]
            if code in _STARTUP_CODES:
                await self.client.send(b"N")
                continue
            await self.server.send(message)
            return data

    async def _from_client(self) -> None:
        rest = await self._startup()
        if rest is None:
            self._close()
            return
        frames = _Frames()
        data: bytes | None = rest
        while data is not None:
            if data:
                for kind, body, _raw in frames.feed(data):
                    self._inspect(kind, body)
                if not await self.server.send(data):
                    break
            data = await self.client.receive()
        self._close()

    def _inspect(self, kind: int, body: bytes) -> None:
        """Note a statement the client sends; doom the connection if it matches."""
        sql: str | None = None
        self.flushed = kind == ord("H")
        if kind in (ord("S"), ord("Q")):
            self.outstanding += 1
        if kind == ord("Q"):
            sql = _cstrings(body, 1)[0]
        elif kind == ord("P"):
            name, text = _cstrings(body, 2)
            if name:
                self.prepared[name] = text
            else:
                sql = text
        elif kind == ord("B"):
            _portal, name = _cstrings(body, 2)
            if name:
                sql = self.prepared.get(name)
        if sql is None or self.doomed is not None:
            return
        pattern = self.proxy._take(sql)
        if pattern is not None:
            self.doomed = (pattern, " ".join(sql.split())[:200])
            # A simple query was counted above, but its own ReadyForQuery is the one to lose.
            self.skip = self.outstanding - (1 if kind == ord("Q") else 0)

    async def _from_server(self) -> None:
        frames = _Frames()
        while True:
            data = await self.server.receive()
            if data is None:
                break
            out = self._watch(frames.feed(data))
            if out is None:  # the reply that ended the doomed transaction: lost
                break
            if out and not await self.client.send(out):
                break
        self._close()

    def _watch(self, messages: list[tuple[int, bytes, bytes]]) -> bytes | None:
        """Return the complete messages to pass on; once doomed, hold them until their
        request's ReadyForQuery says whether the transaction ended (then return ``None``),
        unless the client asked for them with a Flush (it waits for them, mid-pipeline,
        before it sends the rest of its transaction)."""
        out = bytearray()
        for kind, body, raw in messages:
            if kind == ord("Z"):
                self.outstanding -= 1
            if self.doomed is None:
                out += raw
                continue
            self.held += raw
            if kind == ord("Z") and self.skip > 0:  # ends a request sent before the match
                self.skip -= 1
                self.failed = False
            elif kind == ord("Z"):
                status = body[:1]
                if status == b"I":
                    pattern, statement = self.doomed
                    self.proxy.drops.append(Drop(pattern, statement, not self.failed))
                    self.proxy._dropped.set()
                    return None
                if status == b"E":
                    self.failed = True
            else:
                if kind == ord("E"):
                    self.failed = True
                if not self.flushed:
                    continue
            out += self.held
            self.held.clear()
        return bytes(out)
