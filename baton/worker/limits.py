"""The worker's side of queue limits: which queues it serves are limited, and their claim.

A queue without limits takes the plain fetch (``jobs_fetch``) and costs nothing more. A
limited queue is claimed in a short transaction: ``queue_limit_lock`` takes the queue's
limits row, then ``jobs_fetch_limited``, a statement of its own, counts what runs and
what started and claims what the limits leave room for. Both travel with the ``BEGIN``
and ``COMMIT`` in one round trip, and nothing outlives the transaction (so it works
behind PgBouncer in transaction mode).

The limits are read at start, again when a change is announced on the control channel,
and every heartbeat interval as the fallback for a missed announcement. A claim
that found a partition at its rate or token limit says when the window frees up, and the
producer is woken then. When the outcomes of jobs of a queue with a concurrency limit are
written, its producer here is woken if its last claim came back short: the room they left
goes to this worker first (it has the free slots), and the other workers find what is left
at their next poll. (A NOTIFY to every worker after each write halved a limited drain.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg

from baton import ops
from baton.connections import BEGIN, COMMIT, rolled_back
from baton.db import describe
from baton.errors import DatabaseError
from baton.limits import QueueLimit, list_limits
from baton.logs import get_logger
from baton.worker.executor import Outcome

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = get_logger("baton.limits")


SCAN_PER_SLOT = 10
"""A partitioned claim considers up to this many available jobs per job it may claim
(at least :data:`MIN_SCAN`): partitions at their limit are skipped before the scan, the
others take turns within it. A scan cut short leads to another claim at once."""
MIN_SCAN = 100


class Limits:
    """The limits of the queues a worker serves, and the limited claim."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.limited: dict[str, QueueLimit] = {}
        """The limits of the queues this worker serves that have some."""
        self._refresh = anyio.Event()
        self._short: set[str] = set()
        """Limited queues whose last claim here came back with fewer jobs than asked."""
        self._timers: dict[str, float] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    def applies(self, queue: str) -> bool:
        """Whether ``queue`` has limits (its producer then claims with :meth:`claim`)."""
        return queue in self.limited

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Load the limits, report started, then keep them fresh until cancelled."""
        await self.load()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            while True:
                with anyio.move_on_after(self.worker.settings.heartbeat_interval):
                    await self._refresh.wait()
                self._refresh = anyio.Event()
                if self.worker.passes.closing:
                    continue  # the worker is stopping: no read starts now
                with self.worker.passes.shielded():  # a shutdown does not cut a read off
                    try:
                        await self.load()
                    except (psycopg.Error, DatabaseError) as exc:
                        log.warning("limits.refresh_failed", error=describe(exc))

    def changed(self, queue: str) -> None:
        """The limits of ``queue`` changed (announced on the control channel): reload."""
        if queue in self.worker.producers:
            self._refresh.set()

    async def load(self) -> None:
        """Read the limits of the queues this worker serves; wake producers whose queue's
        limits changed."""
        app = self.worker.app
        async with app.connection(autocommit=True) as conn:
            found = await ops.run_async(conn, list_limits(app.sql, list(self.worker.producers)),
                                        "read queue limits")
        limited = {limit.queue: limit for limit in found}
        changed = {q for q in limited.keys() | self.limited.keys()
                   if _rules(limited.get(q)) != _rules(self.limited.get(q))}
        self.limited = limited
        for queue in sorted(changed):
            limit = limited.get(queue)
            log.info("limits.loaded", queue=queue,
                     limits=limit.describe() if limit is not None else None)
            self._wake(queue)

    async def claim(self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any]
                    ) -> list[tuple[Any, ...]]:
        """Claim jobs of a limited queue on ``conn`` (autocommit) with ``jobs_fetch``'s
        ``params``; return the rows ``jobs_fetch`` would."""
        queue: str = params["queue"]
        demand: int = params["demand"]
        limit = self.limited.get(queue)
        scan = demand if limit is None or limit.partition_by is None else max(
            MIN_SCAN, demand * SCAN_PER_SLOT)
        q = self.worker.app.sql
        async with rolled_back(conn), conn.pipeline():
            await conn.execute(BEGIN)
            lock = await conn.execute(q["queue_limit_lock"], {"queue": queue})
            cur = await conn.execute(q["jobs_fetch_limited"], {**params, "scan": scan},
                                     prepare=True)
            await conn.execute(COMMIT)
            locked = await lock.fetchall()
            rows = await cur.fetchall()
        if not locked:  # the limits were removed: the plain fetch from now on
            self.limited.pop(queue, None)
            self._refresh.set()
            self._wake(queue)
            return []
        wait = rows[0][-1] if rows else None
        jobs = [row[:-1] for row in rows if row[0] is not None]
        if len(jobs) < demand:
            self._short.add(queue)
            if wait is not None:
                self._wake_in(queue, max(0.0, float(wait)))
        else:
            self._short.discard(queue)
        return jobs

    def written(self, outcomes: Sequence[Outcome]) -> None:
        """Outcomes were written: jobs of the queues among them that came back short
        on their last claim left room for more."""
        if not self._short:
            return
        for queue in {o.job.queue for o in outcomes} & self._short:
            limit = self.limited.get(queue)
            if limit is not None and (limit.concurrency or limit.total_concurrency):
                self._wake(queue)

    def _wake(self, queue: str) -> None:
        producer = self.worker.producers.get(queue)
        if producer is not None:
            producer.wake()

    def _wake_in(self, queue: str, seconds: float) -> None:
        """Wake the producer of ``queue`` in ``seconds`` (unless one is due sooner)."""
        if seconds <= 0 or self._tg is None:
            self._wake(queue)
            return
        due = anyio.current_time() + seconds
        if self._timers.get(queue, math.inf) <= due:
            return
        self._timers[queue] = due
        self._tg.start_soon(self._wake_at, queue, due)

    async def _wake_at(self, queue: str, due: float) -> None:
        await anyio.sleep_until(due)
        if self._timers.get(queue) == due:
            del self._timers[queue]
            self._wake(queue)


def _rules(limit: QueueLimit | None) -> Any:
    return None if limit is None else limit.model_dump(exclude={"updated_at"})
