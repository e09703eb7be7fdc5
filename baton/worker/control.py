"""Queue control in a worker: applies the ``queues`` table's pause and scale to producers.

The settings are read before the producers start (a worker started after a pause fetches
nothing), applied at once when announced on the control channel, and read again every
heartbeat interval and after the notifier reconnects, so a lost notification heals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg
from psycopg.rows import dict_row

from baton.db import describe, translate_errors
from baton.errors import DatabaseError
from baton.logs import get_logger

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = get_logger("baton.worker")

READ_TIMEOUT = 2.0
"""The longest a periodic read of the settings may take (and hold up the worker's
shutdown)."""


class QueueControls:
    """Keeps each producer of a worker paused and scaled as its queue's settings say."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.versions: dict[str, int] = {}
        """The version of the settings applied to each queue: an older one is ignored (a
        read that began before a change but ended after its notification)."""
        self.applied = 0
        """Settings applied so far, read or announced (tests wait for it to grow)."""
        self._refresh = anyio.Event()

    def apply(self, queue: str, *, paused: bool, concurrency: int | None, version: int
              ) -> None:
        """Apply one queue's settings (``concurrency`` ``None``: the worker's own)."""
        producer = self.worker.producers.get(queue)
        if producer is None or version < self.versions.get(queue, 0):
            return
        self.versions[queue] = version
        self.applied += 1
        limit = concurrency or self.worker.settings.queues[queue]
        if paused != producer.paused:
            producer.pause(paused)
            log.info("producer.paused" if paused else "producer.resumed", queue=queue,
                     worker_id=self.worker.id, running=len(producer.running))
        if limit != producer.limit:
            was = producer.limit
            producer.scale(limit)
            # Plain def steps share one thread limiter: it grows and shrinks with the slots.
            self.worker.limiter.total_tokens = max(
                1, sum(p.limit for p in self.worker.producers.values()))
            log.info("producer.scaled", queue=queue, worker_id=self.worker.id,
                     concurrency=limit, was=was)

    def on_message(self, message: dict[str, Any]) -> None:
        """Apply settings announced on the control channel."""
        try:
            queue = str(message["queue"])
            paused = bool(message["paused"])
            concurrency = message["concurrency"]
            version = int(message["version"])
        except (KeyError, TypeError, ValueError):
            log.warning("worker.bad_control_message", payload=str(message)[:200])
            return
        self.apply(queue, paused=paused,
                   concurrency=int(concurrency) if concurrency is not None else None,
                   version=version)

    async def load(self) -> None:
        """Read the settings of this worker's queues and apply them (a queue without a row
        runs unpaused at the worker's own concurrency)."""
        app = self.worker.app
        with translate_errors("read queue settings"):
            async with app.connection(autocommit=True) as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(app.sql["queue_controls_get"],
                                  {"names": sorted(self.worker.producers)})
                rows = {row["name"]: row for row in await cur.fetchall()}
        for queue in self.worker.producers:
            row = rows.get(queue)
            if row is None:
                self.apply(queue, paused=False, concurrency=None, version=0)
            else:
                self.apply(queue, paused=row["paused"], concurrency=row["concurrency"],
                           version=row["version"])

    def refresh_soon(self) -> None:
        """Read the settings again now (notifications may have been lost)."""
        self._refresh.set()

    async def run(self, interval: float) -> None:
        """Read the settings again every ``interval`` seconds, and when asked to."""
        while True:
            with anyio.move_on_after(interval):
                await self._refresh.wait()
            self._refresh = anyio.Event()
            if self.worker.passes.closing:
                continue  # the worker is stopping: no read starts now
            # A read is not cut off by the worker's shutdown (see baton.worker.passes), and
            # takes at most READ_TIMEOUT.
            with self.worker.passes.shielded(), anyio.move_on_after(READ_TIMEOUT):
                try:
                    await self.load()
                except (psycopg.Error, DatabaseError) as exc:
                    log.warning("worker.queue_controls_failed", error=describe(exc))
