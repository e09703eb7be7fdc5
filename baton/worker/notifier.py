"""The notifier: one LISTEN connection per worker process, reconnecting when it drops."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import psycopg
from psycopg import sql

from baton.db import describe
from baton.logs import get_logger

log = get_logger("baton.notifier")

Handler = Callable[[str], None]


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
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
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
                            handler(note.payload)
            except psycopg.Error as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("notifier.disconnected", error=describe(exc), retry_in=delay)
                await anyio.sleep(delay)
