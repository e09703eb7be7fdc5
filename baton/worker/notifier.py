"""The notifier: one LISTEN connection per worker process, reconnecting when it drops.

It connects to the app's ``listen_dsn``: a LISTEN needs a server session of its own, which a
pooler in transaction mode does not give (see ``docs/pgbouncer.md``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from psycopg import sql

from baton.db import describe
from baton.logs import get_logger

log = get_logger("baton.notifier")

Handler = Callable[[str, int], None]
"""Called with a notification's payload and the server process id of its sender."""

_SESSION: dict[str, Any] = {
    "autocommit": True,  # its application_name is the URL's (or PGAPPNAME): the user's
    # A peer that vanished without a word (a failover, a dropped NAT entry) is noticed
    # within about 25 s, and the notifier reconnects instead of hearing nothing.
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}


class Notifier:
    """Listens on channels and hands each payload to the channel's handler.

    After a reconnect, ``on_reconnect`` runs, since notifications sent while the
    connection was down are lost (producers fetch once to catch up).
    """

    def __init__(self, dsn: str, handlers: dict[str, Handler], on_reconnect: Callable[[], None]
                 ) -> None:
        self.dsn = dsn
        self.handlers = handlers
        self.on_reconnect = on_reconnect

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Listen forever; report started once the first LISTEN is in place."""
        failures = 0
        started = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, **_SESSION)
            except psycopg.Error as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("notifier.connect_failed", error=describe(exc), retry_in=delay)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                continue
            try:
                async with conn:
                    for channel in self.handlers:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if failures:
                        log.info("notifier.reconnected")
                        self.on_reconnect()
                    failures = 0
                    if not started:
                        started = True
                        task_status.started()
                    async for note in conn.notifies():
                        handler = self.handlers.get(note.channel)
                        if handler is not None:
                            handler(note.payload, note.pid)
            except psycopg.Error as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("notifier.disconnected", error=describe(exc), retry_in=delay)
                await anyio.sleep(delay)
