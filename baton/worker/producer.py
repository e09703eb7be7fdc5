"""The producer: one per queue; fetches up to its free slots and runs the jobs."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg

from baton import ops
from baton.db import describe
from baton.errors import DatabaseError
from baton.job import JobState
from baton.logs import get_logger
from baton.worker.executor import FetchedJob, Outcome

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = get_logger("baton.producer")

HEAD_EVERY = 0.5
"""Seconds after which a claim starts from the head of the queue again.

Each claim starts after the last job the previous one took (``jobs_fetch``), so it does
not step over the index entries of the jobs claimed since the table's last vacuum: in
200,000-job drains by two processes of 200 slots (``python -m benchmarks --systems baton
--workloads drain --processes 2 --concurrency baton=200 --n-drain 200000``, two runs each
way), the server's CPU per job went from 28.7-29.0 to 21.3-22.2 us and the drain from
37,039-38,472 to 45,283-46,880 jobs/s.
A job that becomes available behind that key (one of a higher priority than the backlog,
one scheduled earlier than the jobs claimed) is claimed by the next claim from the head.
That is the first claim after the notification of its arrival (:meth:`Producer.notified`,
at least :data:`HEAD_SPACING` after the last claim from the head), the first claim this
long after the last one from the head, the rest of a claim whose walk reaches the end of
the backlog, and the next claim after any that came back short."""

HEAD_SPACING = 0.05
"""Seconds at least between claims from the head that notifications ask for: with jobs
arriving all the time beside a backlog, the claims in between still walk."""

_HEAD = (-1, datetime(1, 1, 1, tzinfo=UTC), 0)
"""A fetch-order key before every job's (priorities are 0 to 9)."""

_AFTER = ("after_priority", "after_at", "after_id")
"""``jobs_fetch``'s parameters for the key its scan starts after."""


def head_params() -> dict[str, Any]:
    """``jobs_fetch``'s parameters for a claim from the head of the queue."""
    return dict(zip(_AFTER, _HEAD, strict=True))


_AT_ONCE = (JobState.AVAILABLE, JobState.PENDING)
"""Outcomes that can make a job claimable at once: a snooze of 0 s, and a workflow step
sent back to wait whose dependencies have settled meanwhile."""


class _Slot:
    """One long-lived task that runs jobs one after another.

    Its cancel scope spans many jobs (creating one per job costs more than a no-op job);
    cancelling the scope interrupts the job it is running, and the slot starts afresh.
    """

    __slots__ = ("job", "scope", "work")

    def __init__(self) -> None:
        self.job: FetchedJob | None = None
        self.scope: anyio.CancelScope | None = None
        self.work: anyio.Event | None = None
        """Set to wake this slot while it waits for a job (``None`` while it runs one)."""

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


class Producer:
    """Keeps at most ``limit`` jobs of one queue running in this process.

    Woken by an insert notification for its queue, by freed slots when the last fetch
    came back full, and by a poll interval as the fallback for missed notifications.
    """

    def __init__(self, worker: Worker, queue: str, limit: int) -> None:
        self.worker = worker
        self.queue = queue
        self.limit = limit
        self.running: dict[int, _Slot | None] = {}
        """Claimed jobs: the slot running each, or ``None`` while it waits for one."""
        self.stopping = False
        self._waiting: deque[FetchedJob] = deque()
        self._event: Callable[[], anyio.Event] = anyio.Event
        self._free: list[_Slot] = []
        """Slots waiting for a job, the last to wait at the end: a fetch wakes as many as
        it brought jobs, the most recently busy first."""
        self._closed = False
        self._wake = anyio.Event()
        self._wake.set()  # fetch at once on start, not after the first poll interval
        self._idle = anyio.Event()
        self._idle.set()
        self._maybe_more = True
        self._tg: anyio.abc.TaskGroup | None = None
        self._refetch_scheduled = False
        self._wake_soon: anyio.CancelScope | None = None
        """The fetch :meth:`wake_soon` asked for, until it is due (cancelled on stop)."""
        self._refill = False  # the wake came from slots freeing up
        self._ahead = 0
        """Jobs claimed beyond ``limit`` (they wait for a slot): up to a batch while jobs
        finish faster than a fetch comes back, none otherwise."""
        self._wakes = 0
        """Wake-ups so far: one that arrives while a fetch is in flight leads to another."""
        self._claim_busy = False
        self._claim_free = anyio.Event()
        """A fetch or a reconcile runs: they take turns, so a reconcile never sees a claim
        whose jobs are not yet in ``running``."""
        self._reconcile_due = False
        self._cancelled: set[int] = set()
        """Claimed jobs cancelled before they reached the waiting line (while their
        claim's gates loaded): never started."""
        self._ended: set[int] | None = None
        """While a claim is on its way: the jobs of this worker that ended meanwhile with
        an outcome that leaves them unclaimable (not :data:`_AT_ONCE`). The claim may have
        taken one of them again (after a rescue) before it ended."""
        self.paused = False
        """The queue is paused: nothing is fetched; claimed jobs run to their end."""
        self._slots = 0
        """Slot tasks alive: more than ``limit`` after a scale down, until the extra ones
        end as their jobs finish."""
        self._after: tuple[int, datetime, int] | None = None
        """The fetch-order key of the last job claimed, where the next claim starts; ``None``
        for the head of the queue (see :data:`HEAD_EVERY`)."""
        self._head_at = 0.0
        """When the last claim from the head of the queue was made."""
        self._notified = False
        """Jobs became available since then, maybe behind ``_after``."""

    def wake(self) -> None:
        """Ask for a fetch as soon as possible (it stands for a later one asked for)."""
        if self._wake_soon is not None:
            self._wake_soon.cancel()
            self._wake_soon = None
        self._wakes += 1
        self._maybe_more = True
        self._wake.set()

    def notified(self) -> None:
        """Jobs of this queue became available (a notification said so): the next claim
        starts from the head of the queue, in case they are behind where claims walk."""
        self._notified = True

    def wake_soon(self, delay: float) -> None:
        """Ask for a fetch ``delay`` seconds from now, unless one is asked for already."""
        if self._tg is None or self.stopping or self._closed or self._wake_soon is not None:
            return
        self._wake_soon = anyio.CancelScope()
        self._tg.start_soon(self._wake_after, self._wake_soon, delay)

    async def _wake_after(self, scope: anyio.CancelScope, delay: float) -> None:
        with scope:
            await anyio.sleep(delay)
            self._wake_soon = None
            self.wake()

    def pause(self, paused: bool) -> None:
        """Stop fetching (``True``; running jobs go on) or fetch again (``False``)."""
        self.paused = paused
        if not paused:
            self.wake()

    def scale(self, limit: int) -> None:
        """Run up to ``limit`` jobs at once from now on: new slots start at once; when it
        shrinks, slots end as their jobs finish (none is interrupted)."""
        self.limit = limit
        self._ahead = min(self._ahead, limit)
        if self._tg is not None and not self._closed:
            while self._slots < limit:
                self._slots += 1
                self._tg.start_soon(self._slot_loop, _Slot())
        self._wake_slots(len(self._free))  # idle slots beyond the limit end now
        self.wake()

    def stop(self) -> None:
        """Stop fetching; running jobs go on."""
        self.stopping = True
        if self._wake_soon is not None:
            self._wake_soon.cancel()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Wait until no job of this producer is running."""
        await self._idle.wait()

    def cancel_running(self) -> None:
        """Cancel every claimed job (shutdown past its grace period), but those whose plain
        def step runs in a thread: it cannot be stopped, so cancelling it would only throw
        away what it returns. They end when their thread does."""
        in_threads = self.worker.executor.in_threads
        for job_id in list(self.running):
            if job_id not in in_threads:
                self._cancel(job_id)

    def cancel_job(self, job_id: int) -> bool:
        """Cancel one claimed job; ``False`` if it is not claimed here."""
        if job_id not in self.running:
            return False
        self._cancel(job_id)
        return True

    def _cancel(self, job_id: int) -> None:
        slot = self.running.get(job_id)
        if slot is not None:
            slot.cancel()
            return
        for job in self._waiting:  # claimed but not started: never start it
            if job.id == job_id:
                self._waiting.remove(job)
                self._finished(job, None)
                return
        self._cancelled.add(job_id)  # still being claimed: dropped when it reaches a slot

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Fetch and start jobs until stopped, then wait for the running ones."""
        settings = self.worker.settings
        failures = 0
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._event = type(anyio.Event())
            self._slots = self.limit
            for _ in range(self.limit):
                tg.start_soon(self._slot_loop, _Slot())
            task_status.started()
            while not self.stopping:
                if not self._wake.is_set():  # if it is, fetch before the slots run
                    with anyio.move_on_after(settings.poll_interval) as poll:
                        await self._wake.wait()
                    if poll.cancelled_caught:
                        self._maybe_more = True
                self._wake = anyio.Event()
                if self.stopping:
                    break
                demand = self.limit + self._ahead - len(self.running)
                if demand <= 0 or not self._maybe_more or self.paused:
                    continue
                await self.worker.completer.wait_for_room()
                if self.paused:  # paused while it waited
                    continue
                refill, self._refill = self._refill, False
                wakes = self._wakes
                try:
                    if self._reconcile_due:
                        await self.reconcile()
                    jobs = await self.fetch(demand)
                    failures = 0
                except (psycopg.Error, DatabaseError) as exc:
                    # The claim may have committed with its reply lost: its jobs would stay
                    # executing under this live worker. Reconcile before fetching again.
                    self._reconcile_due = True
                    failures += 1
                    delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                    log.warning("producer.fetch_failed", queue=self.queue, error=describe(exc),
                                retry_in=delay)
                    await anyio.sleep(delay)
                    self._wake.set()
                    continue
                # A wake-up that came while the fetch was in flight may be for jobs it did
                # not see: fetch again rather than wait for the poll.
                self._maybe_more = len(jobs) == demand or self._wakes != wakes
                # Woken by slots that freed up, yet none still runs but the jobs just
                # claimed: all of them ended before the fetch came back.
                self._pace(full=len(jobs) == demand,
                           starved=refill and len(self.running) == len(jobs))
                if jobs:
                    self._waiting.extend(jobs)
                    self._wake_slots(1)  # it wakes the next one (see _wake_slots)
            self._closed = True  # the slots finish what is claimed, then end
            self._wake_slots(len(self._free))
        self._tg = None

    def _pace(self, *, full: bool, starved: bool) -> None:
        """Claim a batch ahead while jobs finish faster than a fetch comes back
        (``starved``); stop once a batch waits unstarted."""
        if not full:
            self._ahead = 0
        elif starved:
            if not self._ahead:
                self._ahead = self.limit
                self._wake.set()  # the batch ahead, at once
        elif len(self._waiting) >= self.limit:  # a whole batch still waits for slots
            self._ahead = 0

    async def fetch(self, demand: int) -> list[FetchedJob]:
        """Claim up to ``demand`` available jobs in one statement (autocommit: one round
        trip), then load the gates of the workflow steps among them in one more."""
        async with self._claiming():
            return await self._fetch(demand)

    @asynccontextmanager
    async def _claiming(self) -> AsyncIterator[None]:
        # Not an anyio.Lock: its checkpoints on every fetch split the completer's batches
        # in two (no-op drain 17-19k -> 20-22k jobs/s, same harness, alternating runs).
        while self._claim_busy:
            await self._claim_free.wait()
        self._claim_busy = True
        self._claim_free = anyio.Event()
        try:
            yield
        finally:
            self._claim_busy = False
            self._claim_free.set()

    async def reconcile(self) -> list[int]:
        """Hand back the jobs of this queue that the table says this worker holds but it
        does not (a claim whose reply was lost); return their ids."""
        app = self.worker.app
        async with self._claiming():
            held = [*self.running, *self.worker.completer.unwritten(self.queue)]
            async with app.connection(autocommit=True) as conn:
                cur = await conn.execute(app.sql["jobs_reconcile"], {
                    "queue": self.queue, "worker_id": self.worker.id, "held": held})
                ids = [row[0] for row in await cur.fetchall()]
                if ids:
                    await ops.run_async(conn, ops.notify_queues(app.sql, [self.queue]),
                                        "wake queues")
            self._reconcile_due = False
        if ids:
            log.warning("producer.reconciled", queue=self.queue, job_ids=ids,
                        reason="held by this worker in the table but not running here")
            self.wake()
        return ids

    async def _fetch(self, demand: int) -> list[FetchedJob]:
        app = self.worker.app
        jobs: list[FetchedJob] = []
        events: list[dict[str, Any]] = []
        ended: set[int] = set()
        self._ended = ended
        try:
            async with app.connection(autocommit=True) as conn:
                params = {"queue": self.queue, "demand": demand, "worker_id": self.worker.id,
                          "steps": self.worker.step_names}
                rows: list[tuple[Any, ...]]
                if self.worker.limits.applies(self.queue):  # limits across all workers
                    rows = await self.worker.limits.claim(conn, params)
                else:
                    rows = await self._claim(conn, params)
                self._ended = None
                jobs = self._without_rerun([FetchedJob(*row) for row in rows], ended)
                # In ``running`` before the claim lock is released: a reconcile after this
                # fetch counts them as held.
                if jobs and self._idle.is_set():
                    self._idle = anyio.Event()
                for job in jobs:
                    self.running[job.id] = None
                try:
                    events = await self.worker.engine.claimed(conn, jobs)
                except (psycopg.Error, DatabaseError) as exc:
                    # The jobs stay claimed; the engine defers those it could not prepare.
                    events = []
                    log.warning("producer.claim_prepare_failed", queue=self.queue,
                                error=describe(exc))
        except (psycopg.Error, DatabaseError) as exc:
            if not jobs:
                raise
            # The claim's rows arrived: the jobs are this worker's, whatever became of the
            # connection after. They run; a step whose gate did not load is deferred.
            events = []
            log.warning("producer.connection_lost_after_claim", queue=self.queue,
                        error=describe(exc), jobs=len(jobs))
        finally:
            self._ended = None
        app.events.publish(events)
        return jobs

    async def _claim(self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any]
                     ) -> list[tuple[Any, ...]]:
        """Claim with ``jobs_fetch`` from where the last claim ended, or from the head of
        the queue when one is due (:data:`HEAD_EVERY`); note where this one ended."""
        since = anyio.current_time() - self._head_at
        walk = self._after is not None and since < HEAD_EVERY and not (
            self._notified and since >= HEAD_SPACING)
        rows = await self._claim_after(conn, params, self._after if walk else None)
        if walk and len(rows) < params["demand"]:
            # The walk reached the end of the backlog: jobs may wait behind it.
            params["demand"] -= len(rows)
            try:
                rows += await self._claim_after(conn, params, None)
            except (psycopg.Error, DatabaseError) as exc:
                # The walk's rows arrived, so those jobs are this worker's; the head's
                # claim may have committed with its reply lost: reconcile before the next.
                self._reconcile_due = True
                log.warning("producer.head_claim_failed", queue=self.queue,
                            error=describe(exc), jobs=len(rows))
        return rows

    async def _claim_after(self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any],
                           after: tuple[int, datetime, int] | None) -> list[tuple[Any, ...]]:
        """One ``jobs_fetch`` after the key ``after`` (``None``: from the head)."""
        if after is None:
            after = _HEAD
            self._head_at = anyio.current_time()
            self._notified = False
        params.update(zip(_AFTER, after, strict=True))
        # Binary rows: the server sends integers and timestamps as stored rather than
        # formatted as text, and psycopg reads them unparsed (four alternated pairs of
        # 200,000-job drains, 2 processes x 800 slots: 34.8 -> 34.2 µs of CPU a job on
        # average, a gain inside the machine's run-to-run noise).
        cur = await conn.execute(self.worker.app.sql["jobs_fetch"], params, prepare=True,
                                 binary=True)
        rows = await cur.fetchall()
        if len(rows) < params["demand"]:
            self._after = None  # the end of what is available: the head next time
        else:  # the rows come back in no particular order
            self._after = max(map(_fetch_order, rows))
        return rows

    async def _slot_loop(self, slot: _Slot) -> None:
        while True:
            with anyio.CancelScope() as scope:
                slot.scope = scope
                woken = False
                while not scope.cancel_called:
                    if self._slots > self.limit:  # scaled down: this slot ends
                        self._slots -= 1
                        if woken:  # the job it was woken for goes to another slot
                            self._wake_slots(1)
                        return
                    if not self._waiting:
                        if self._closed:
                            return
                        await self._wait_for_work(slot)
                        woken = True
                        continue
                    job = self._waiting.popleft()
                    if woken:  # the next job, if any, wakes the next slot
                        woken = False
                        if self._waiting:
                            self._wake_slots(1)
                    if self._cancelled and job.id in self._cancelled:
                        self._cancelled.discard(job.id)
                        self._finished(job, None)
                        continue
                    slot.job = job
                    self.running[job.id] = slot
                    outcome = await self._execute(job)
                    slot.job = None
                    self._finished(job, outcome)
            slot.scope = None
            if slot.job is not None:  # interrupted: by a cancel request, or at shutdown
                job, slot.job = slot.job, None
                self._finished(job, None)

    def _wake_slots(self, count: int) -> None:
        # Fetched jobs wake one idle slot, and a slot woken for a job wakes the next one if
        # more wait: a slot whose jobs never yield runs the whole batch while the next one
        # wakes, and jobs that await start one after another as before. Waking every idle
        # slot for each fetch cost an idle worker of 400 slots 1.3 ms of CPU a job, and its
        # start waited behind them (1,000 jobs at 200/s: 400 slots against 10, enqueue ->
        # start p99 10.6 ms against 4.8).
        for _ in range(min(count, len(self._free))):
            work = self._free.pop().work
            if work is not None:
                work.set()

    async def _wait_for_work(self, slot: _Slot) -> None:
        slot.work = work = self._event()
        self._free.append(slot)
        try:
            await work.wait()
        finally:
            slot.work = None
            if not work.is_set():  # cancelled while it waited
                self._free.remove(slot)

    async def _execute(self, job: FetchedJob) -> Outcome:
        log.debug("job.executing", job_id=job.id, queue=job.queue, step=job.step,
                  attempt=job.attempt)
        try:
            return await self.worker.engine.run(job)
        except Exception as exc:  # a fault in baton itself must not stop the worker
            log.exception("job.crashed", job_id=job.id, queue=job.queue, step=job.step)
            return self.worker.executor.failed(job, exc, kind="crash")

    def _without_rerun(self, jobs: list[FetchedJob], ended: set[int]) -> list[FetchedJob]:
        """Drop the claimed jobs this worker still runs (or waits to start), and those
        that ended here while the claim was on its way (``ended``).

        A rescue can take a job from a worker that still runs it, when its heartbeat
        stalled past ``heartbeat_ttl``. If this worker then claims it again, starting it
        would run it twice: beside the first attempt, or after it when the first ends
        before the claim's reply is read. The row is executing by this worker either way,
        and the attempt that ran writes its outcome.

        A job whose outcome makes it available at once (:data:`_AT_ONCE`) is rightly
        taken again by a claim that reads it after that outcome: it is not counted in
        ``ended``. One that ended otherwise may have been taken after its outcome was
        refused (written while the rescue had made it available): its row then stays
        executing by this worker with nothing to write it, so a reconcile runs before the
        next fetch, and hands back such a row once no outcome of it is pending.
        """
        again = [job.id for job in jobs if job.id in self.running or job.id in ended]
        if not again:
            return jobs
        if any(job_id in ended for job_id in again):
            self._reconcile_due = True
            self.wake()
        log.warning("producer.reclaimed_running", queue=self.queue, job_ids=again,
                    reason="claimed again after a rescue while it ran here; the attempt "
                           "that ran writes the outcome")
        return [job for job in jobs if job.id not in again]

    def _finished(self, job: FetchedJob, outcome: Outcome | None) -> None:
        """Record a job's end: its outcome, or ``None`` if it was cancelled mid-way."""
        if outcome is not None:
            self.worker.completer.push(outcome)
        else:
            self.worker.cancelled(job)
        del self.running[job.id]
        if self._ended is not None and outcome is not None and outcome.state not in _AT_ONCE:
            self._ended.add(job.id)
        if not self.running:
            self._idle.set()
        if self._maybe_more and not self.stopping:
            self._schedule_refetch()

    def _schedule_refetch(self) -> None:
        # Gather freed slots for a moment so that one fetch refills many of them; once a
        # quarter of the slots are free, fetch at once, while the rest still run.
        debounce = self.worker.settings.debounce
        if self._wake.is_set():
            return
        if self.limit + self._ahead - len(self.running) >= max(2, self.limit // 4):
            self._refetch()
            return
        if self._refetch_scheduled:
            return
        if self._tg is not None and debounce:
            self._refetch_scheduled = True
            self._tg.start_soon(self._wake_later, debounce)
        else:
            self._refetch()

    def _refetch(self) -> None:
        self._refill = True
        self._wake.set()

    async def _wake_later(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._refetch_scheduled = False
        self._refetch()


def _fetch_order(row: tuple[Any, ...]) -> tuple[int, datetime, int]:
    """The fetch-order key of a ``jobs_fetch`` row: priority, scheduled_at, id."""
    return row[8], row[12], row[0]
