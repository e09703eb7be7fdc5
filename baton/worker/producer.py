"""The producer: one per queue; fetches up to its free slots and starts the jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from baton.db import describe
from baton.worker.executor import FetchedJob

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = structlog.get_logger("baton.producer")


class Producer:
    """Keeps at most ``limit`` jobs of one queue running in this process.

    Woken by an insert notification for its queue, by a freed slot when the last fetch
    came back full, and by a poll interval as the fallback for missed notifications.
    """

    def __init__(self, worker: Worker, queue: str, limit: int) -> None:
        self.worker = worker
        self.queue = queue
        self.limit = limit
        self.running: dict[int, anyio.CancelScope] = {}
        self.stopping = False
        self._wake = anyio.Event()
        self._wake.set()  # fetch at once on start, not after the first poll interval
        self._idle = anyio.Event()
        self._idle.set()
        self._maybe_more = True
        self._tg: anyio.abc.TaskGroup | None = None
        self._refetch_scheduled = False

    def wake(self) -> None:
        """Ask for a fetch as soon as possible."""
        self._maybe_more = True
        self._wake.set()

    def stop(self) -> None:
        """Stop fetching; running jobs go on."""
        self.stopping = True
        self._wake.set()

    async def wait_idle(self) -> None:
        """Wait until no job of this producer is running."""
        await self._idle.wait()

    def cancel_running(self) -> None:
        """Cancel every running job (shutdown past its grace period)."""
        for scope in self.running.values():
            scope.cancel()

    def cancel_job(self, job_id: int) -> bool:
        """Cancel one running job; ``False`` if it does not run here."""
        scope = self.running.get(job_id)
        if scope is None:
            return False
        scope.cancel()
        return True

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Fetch and start jobs until stopped, then wait for the running ones."""
        settings = self.worker.settings
        failures = 0
        # One long-lived task per slot takes jobs from a buffer: no task per job.
        send, receive = anyio.create_memory_object_stream[tuple[FetchedJob, anyio.CancelScope]](
            self.limit)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for _ in range(self.limit):
                tg.start_soon(self._slot, receive)
            task_status.started()
            while not self.stopping:
                with anyio.move_on_after(settings.poll_interval) as poll:
                    await self._wake.wait()
                self._wake = anyio.Event()
                if self.stopping:
                    break
                if poll.cancelled_caught:
                    self._maybe_more = True
                demand = self.limit - len(self.running)
                if demand <= 0 or not self._maybe_more:
                    continue
                await self.worker.completer.wait_for_room()
                try:
                    jobs = await self.fetch(demand)
                    failures = 0
                except psycopg.Error as exc:
                    failures += 1
                    delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                    log.warning("producer.fetch_failed", queue=self.queue, error=describe(exc),
                                retry_in=delay)
                    await anyio.sleep(delay)
                    self._wake.set()
                    continue
                self._maybe_more = len(jobs) == demand
                if jobs:
                    self._idle = anyio.Event()
                for job in jobs:
                    scope = anyio.CancelScope()
                    self.running[job.id] = scope
                    send.send_nowait((job, scope))
            send.close()  # the slots finish what is buffered, then end
        receive.close()
        self._tg = None

    async def fetch(self, demand: int) -> list[FetchedJob]:
        """Claim up to ``demand`` available jobs in one statement (and, in the same
        transaction, load the gates of the workflow steps among them)."""
        app = self.worker.app
        async with app.connection() as conn:
            cur = await conn.execute(
                app.queries["jobs_fetch"],
                {"queue": self.queue, "demand": demand, "worker_id": self.worker.id},
                prepare=True,
            )
            rows: list[tuple[Any, ...]] = await cur.fetchall()
            jobs = [FetchedJob(*row) for row in rows]
            events = await self.worker.steps.load_gates(conn, jobs)
        app.events.publish(events)
        return jobs

    async def _slot(
        self, receive: MemoryObjectReceiveStream[tuple[FetchedJob, anyio.CancelScope]]
    ) -> None:
        with receive.clone() as mine:
            async for job, scope in mine:
                await self._execute(job, scope)

    async def _execute(self, job: FetchedJob, scope: anyio.CancelScope) -> None:
        log.debug("job.executing", job_id=job.id, queue=job.queue, step=job.step,
                  attempt=job.attempt)
        try:
            with scope:
                try:
                    outcome = await self.worker.execute(job)
                except Exception as exc:  # a fault in baton itself must not stop the worker
                    log.exception("job.crashed", job_id=job.id, queue=job.queue, step=job.step)
                    outcome = self.worker.executor.failed(job, exc, kind="crash")
            if not scope.cancelled_caught:
                self.worker.completer.push(outcome)
            else:
                self.worker.cancelled(job)
        finally:
            del self.running[job.id]
            if not self.running:
                self._idle.set()
            if self._maybe_more and not self.stopping:
                self._schedule_refetch()

    def _schedule_refetch(self) -> None:
        # Gather freed slots for a moment so that one fetch refills many of them.
        debounce = self.worker.settings.debounce
        if self._wake.is_set() or self._refetch_scheduled:
            return
        if self._tg is not None and debounce:
            self._refetch_scheduled = True
            self._tg.start_soon(self._wake_later, debounce)
        else:
            self._wake.set()

    async def _wake_later(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._refetch_scheduled = False
        self._wake.set()
