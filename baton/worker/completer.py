"""The completer: writes attempt outcomes in batches, one statement per flush."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import structlog

from baton import workflows
from baton.db import describe
from baton.errors import DatabaseError
from baton.job import JobState
from baton.worker.executor import Outcome

if TYPE_CHECKING:
    from baton.app import Baton

log = structlog.get_logger("baton.completer")

FollowUp = Callable[[psycopg.AsyncConnection[Any], set[int]], Awaitable[list[dict[str, Any]]]]
"""Runs in the writing transaction once the finish applied the outcomes whose job ids it is
given (it may commit the transaction with its last statement); returns event payloads to
publish once it commits."""
AfterWrite = Callable[[Sequence[Outcome]], FollowUp]
"""Builds, before the writing transaction opens, the follow-up of a batch of outcomes."""

_LOG_EVENTS = {
    JobState.COMPLETED: "job.completed",
    JobState.RETRYABLE: "job.retryable",
    JobState.DISCARDED: "job.discarded",
    JobState.CANCELLED: "job.cancelled",
    JobState.SCHEDULED: "job.snoozed",
    JobState.AVAILABLE: "job.snoozed",
}


class Completer:
    """Gathers outcomes for a few milliseconds and writes them in one transaction.

    A write that fails (the database restarted, the connection dropped) is kept and tried
    again with backoff, so no outcome is lost while the process lives. Every write only
    touches rows still ``executing`` by this worker: a rescue or a cancel is never undone.
    """

    def __init__(
        self,
        app: Baton,
        worker_id: str,
        *,
        flush_interval: float,
        flush_max: int,
        max_pending: int,
        after_write: AfterWrite | None = None,
    ) -> None:
        self.app = app
        self.worker_id = worker_id
        self.flush_interval = flush_interval
        self.flush_max = flush_max
        self.max_pending = max_pending
        self.after_write = after_write
        self.pending: list[Outcome] = []
        self._wake = anyio.Event()
        self._room = anyio.Event()
        self._written = anyio.Event()

    def push(self, outcome: Outcome) -> None:
        """Queue an outcome for the next flush."""
        self.pending.append(outcome)
        self._wake.set()

    @property
    def full(self) -> bool:
        """Whether producers should stop fetching until outcomes are written."""
        return len(self.pending) >= self.max_pending

    async def wait_for_room(self) -> None:
        """Wait until the backlog of unwritten outcomes is below the limit."""
        while self.full:
            self._room = anyio.Event()
            await self._room.wait()

    async def wait_written(self) -> None:
        """Wait until the next batch of outcomes is written."""
        await self._written.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Flush forever; cancelled at shutdown (then call :meth:`drain`)."""
        task_status.started()
        failures = 0
        while True:
            if not self.pending:
                self._wake = anyio.Event()
                await self._wake.wait()
            if len(self.pending) < self.flush_max and self.flush_interval:
                await anyio.sleep(self.flush_interval)
            try:
                await self.flush_once()
                failures = 0
            except (psycopg.Error, DatabaseError) as exc:
                failures += 1
                delay = min(5.0, 0.05 * 2 ** min(failures, 7))
                log.warning("completer.write_failed", error=describe(exc),
                            pending=len(self.pending), retry_in=delay)
                await anyio.sleep(delay)

    async def flush_once(self) -> None:
        """Write up to ``flush_max`` pending outcomes in one transaction."""
        batch = self.pending[: self.flush_max]
        if not batch:
            return
        q = self.app.queries
        rows = json.dumps([o.as_row() for o in batch], default=str, allow_nan=False)
        # A batch of plain jobs is one statement: autocommit saves the BEGIN and COMMIT.
        plain = self.after_write is None or all(o.plain for o in batch)
        # Otherwise pipelined: BEGIN and the workflow locks travel with the finish, the
        # follow-up's statements together, the COMMIT with the last of them.
        follow_up = None if plain or self.after_write is None else self.after_write(batch)
        async with self.app.connection(autocommit=plain) as conn, \
                (nullcontext() if plain else conn.pipeline()):
            flows = [o.job.workflow_id for o in batch if o.job.workflow_id is not None]
            if flows and not plain:
                # Workflows before job rows, the order a cancel takes them in too.
                lock = workflows.lock(q, flows)
                await conn.execute(lock.query, lock.params)
            cur = await conn.execute(q["jobs_finish"], {"outcomes": rows,
                                                        "worker_id": self.worker_id})
            applied = {row[0] for row in await cur.fetchall()}
            events = await follow_up(conn, applied) if follow_up and applied else []
            if not plain:
                await conn.commit()  # nothing to do if the follow-up committed
        del self.pending[: len(batch)]
        if events:
            self.app.events.publish(events)
        for outcome in batch:
            self._log(outcome, applied=outcome.job.id in applied)
        if not self.full:
            self._room.set()
        self._written.set()
        self._written = anyio.Event()

    def _log(self, outcome: Outcome, *, applied: bool) -> None:
        job = outcome.job
        fields: dict[str, Any] = {
            "job_id": job.id, "queue": job.queue, "step": job.step, "attempt": job.attempt,
            "duration": round(outcome.duration, 6),
        }
        if not applied:
            log.info("job.outcome_dropped", state=outcome.state.value, **fields,
                     reason="job no longer executing on this worker (cancelled or rescued)")
            return
        if outcome.error is not None:
            fields["error"] = outcome.error.get("error")
        if outcome.delay is not None and math.isfinite(outcome.delay):
            fields["delay"] = round(outcome.delay, 3)
        level = log.warning if outcome.state in (JobState.DISCARDED,) else log.info
        level(_LOG_EVENTS[outcome.state], **fields)

    async def drain(self, deadline: float) -> None:
        """Write everything pending, retrying until ``deadline`` (monotonic seconds)."""
        failures = 0
        while self.pending and anyio.current_time() < deadline:
            try:
                await self.flush_once()
            except (psycopg.Error, DatabaseError) as exc:
                failures += 1
                log.warning("completer.write_failed", error=describe(exc),
                            pending=len(self.pending))
                await anyio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))
        if self.pending:
            log.error("completer.unwritten", pending=len(self.pending),
                      job_ids=[o.job.id for o in self.pending][:100])
