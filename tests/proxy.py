"""A TCP proxy for fault tests: it sits between PostgreSQL clients and the test server,
forwards the protocol message by message, and loses or holds back what a test
tells it to.

It runs its own event loop on a thread, so sync and async clients alike can use it::

    with Proxy(dsn) as proxy:
        app = baton.Baton(proxy.dsn)
        proxy.drop_next_reply_after(statement_is("COMMIT"))
        app.insert_sync(workflow)  # raises: the server committed, the reply was lost

It answers SSL and GSS encryption requests with "no" itself, so the messages it forwards
are always readable.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

Predicate = Callable[[bytes, bytes], bool]
"""Called with each client message's type byte and body (after its length)."""

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


def sql_of(kind: bytes, body: bytes) -> str | None:
    """The SQL text a client message carries: a simple query's or a parse's, else None."""
    if kind == b"Q":
        return body.rstrip(b"\0").decode()
    if kind == b"P":  # statement name, NUL, query, NUL, parameter types
        return body.split(b"\0", 2)[1].decode()
    return None


def statement_is(text: str) -> Predicate:
    """Match the message that sends exactly this statement (``"COMMIT"``)."""
    return lambda kind, body: (sql_of(kind, body) or "").strip() == text


def statement_contains(text: str) -> Predicate:
    """Match the first message that sends a statement containing ``text``."""
    return lambda kind, body: text in (sql_of(kind, body) or "")


@dataclass(eq=False)
class _Link:
    """One client connection and the server connection it is forwarded to."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    syncs: int = 1  # points the server answers with ReadyForQuery; the startup is one
    readies: int = 0  # ReadyForQuery messages seen from the server
    doomed: bool = False  # the trap fired here: nothing more goes back to the client
    doom_at: int | None = None  # the ReadyForQuery that ends the trapped message's reply
    held: asyncio.Event | None = None  # a hold fired here: replies wait until it is set
    paused: asyncio.Event | None = None  # a message held here: it waits until this is set
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class Proxy:
    """Forward TCP connections on 127.0.0.1 to the server of ``server_dsn``.

    :param server_dsn: the real server's URL (TCP or Unix socket).
    """

    def __init__(self, server_dsn: str) -> None:
        params = conninfo_to_dict(server_dsn)
        host = str(params.get("host") or "/tmp")
        port = int(params.get("port") or 5432)
        self._server_dsn = server_dsn
        self._socket = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._address = (host, port)
        self.port = 0
        self.fired = threading.Event()
        """Set once a trap fired: the reply was dropped and the connection closed."""
        self._armed: dict[str, Predicate] = {}
        """The one-shot faults armed, by kind: "trap", "hold" (a reply) and "pause" (a
        request)."""
        self.holding = threading.Event()
        """Set once a hold (:meth:`hold_next_reply_after`, :meth:`hold_next_message`)
        fired: what it holds waits in the proxy until :meth:`release`."""
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: asyncio.Server | None = None

    @property
    def dsn(self) -> str:
        """The URL that connects through the proxy (same database, user and options)."""
        return make_conninfo(self._server_dsn, host="127.0.0.1", port=str(self.port),
                             hostaddr="")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Proxy:
        """Listen on a free port of 127.0.0.1; return once it accepts connections."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._listener = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = self._listener.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="test-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._loop is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join()
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------

    def drop_next_reply_after(self, predicate: Predicate) -> None:
        """Arm a one-shot trap: the first client message that matches ``predicate`` is
        forwarded, the server is let to finish it (up to its ReadyForQuery), and then the
        connection is closed on both sides without the client getting any reply sent
        after that message went out. :attr:`fired` is set when that happened."""
        with self._lock:
            self.fired.clear()
            self._armed["trap"] = predicate

    def hold_next_reply_after(self, predicate: Predicate) -> None:
        """Arm a one-shot hold: the first client message that matches ``predicate`` is
        forwarded and the server answers it, but nothing the server sends on that
        connection from then on reaches the client until :meth:`release` (a reply that
        is only late). :attr:`holding` is set once the message matched."""
        with self._lock:
            self.holding.clear()
            self._armed["hold"] = predicate

    def hold_next_message(self, predicate: Predicate) -> None:
        """Arm a one-shot hold of a request: the first client message that matches
        ``predicate`` waits in the proxy, with whatever the client sends after it on that
        connection, until :meth:`release` (a request that is only slow to arrive).
        :attr:`holding` is set once the message matched."""
        with self._lock:
            self.holding.clear()
            self._armed["pause"] = predicate

    def release(self) -> None:
        """Let the held replies and messages through."""
        assert self._loop is not None
        for link in list(self._links):
            for event in (link.held, link.paused):
                if event is not None:
                    self._loop.call_soon_threadsafe(event.set)

    def cut_all(self) -> None:
        """Close every connection through the proxy now, both sides (new ones still work)."""
        self._call(self._cut())

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy."""
        return len(self._links)

    # -- forwarding ----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _cut(self) -> None:
        links = list(self._links)
        for link in links:
            link.close()
        for link in links:
            await link.closed.wait()

    async def _shutdown(self) -> None:
        assert self._listener is not None
        self._listener.close()
        await self._cut()

    def _fires(self, fault: str, kind: bytes, body: bytes) -> bool:
        """Whether the ``fault`` armed fires on this message (disarmed if so)."""
        with self._lock:
            predicate = self._armed.get(fault)
            if predicate is not None and predicate(kind, body):
                del self._armed[fault]
                return True
        return False

    async def _serve(self, client_in: asyncio.StreamReader,
                     client_out: asyncio.StreamWriter) -> None:
        try:
            if self._socket is not None:
                server_in, server_out = await asyncio.open_unix_connection(self._socket)
            else:
                server_in, server_out = await asyncio.open_connection(*self._address)
        except OSError:
            client_out.transport.abort()
            return
        link = _Link(client_out, server_out)
        self._links.add(link)
        up = asyncio.ensure_future(self._upstream(link, client_in))
        down = asyncio.ensure_future(self._downstream(link, server_in))
        link.tasks = [up, down]
        try:
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.close()
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            self._links.discard(link)
            link.closed.set()

    async def _upstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Client to server: the untyped startup messages, then typed ones."""
        try:
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head) - 4)
                if int.from_bytes(body[:4]) in (_SSL_REQUEST, _GSS_REQUEST):
                    link.client.write(b"N")  # no encryption: the messages stay readable
                    continue
                link.server.write(head + body)
                break
            while True:
                kind = await reader.readexactly(1)
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head) - 4)
                if not link.doomed and self._fires("trap", kind, body):
                    link.doomed = True
                if link.held is None and self._fires("hold", kind, body):
                    link.held = asyncio.Event()
                    self.holding.set()
                if link.paused is None and self._fires("pause", kind, body):
                    link.paused = asyncio.Event()
                    self.holding.set()
                if link.paused is not None:
                    await link.paused.wait()
                if kind in (b"S", b"Q"):  # each is answered by one ReadyForQuery
                    link.syncs += 1
                    if link.doomed and link.doom_at is None:
                        link.doom_at = link.syncs
                link.server.write(kind + head + body)
                await link.server.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def _downstream(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Server to client, until a trap fires; then swallow the rest of the reply."""
        try:
            while True:
                kind = await reader.readexactly(1)
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head) - 4)
                if kind == b"Z":
                    link.readies += 1
                if link.held is not None:
                    await link.held.wait()
                if link.doomed:
                    if link.doom_at is not None and link.readies >= link.doom_at:
                        self.fired.set()
                        return  # the server finished the message: close both sides
                    continue
                link.client.write(kind + head + body)
                await link.client.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
