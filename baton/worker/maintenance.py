"""Maintenance run by the elected leader only: staging, rescue, pruning and the jobs
archive."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg
from psycopg.rows import dict_row

from baton import metrics, ops, workflows
from baton.db import Queries, describe
from baton.errors import DatabaseError
from baton.job import JobState
from baton.logs import get_logger
from baton.ops import Op, Stmt
from baton.workflows import announce, settle
from baton.workflows.announce import Payload, StepEvent

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = get_logger("baton.maintenance")

LEADER_NAME = "maintenance"
ARCHIVE_RESCAN = 3600.0
"""Seconds between archive passes that read from the first finished job (a pass otherwise
reads from where the last one found the oldest job due: reading every workflow step and
keyed job that stays in jobs took 2.8 s with two million of them)."""


class Maintenance:
    """Elects a leader by lease row; the leader stages due jobs, rescues and prunes."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.is_leader = False
        self.ticks = 0
        self._rescue_from = 0.0
        """No rescue before this time (monotonic): after this process lost the database,
        live workers need a heartbeat's lifetime to renew rows that expired meanwhile."""
        self._archive_from: datetime | str | None = None
        """The oldest job found due for the archive (see ``jobs_archive_day``); ``None``
        at first: a minute before the newest archived job."""
        self._archive_rescan_at = time.monotonic() + ARCHIVE_RESCAN  # no event loop yet
        """When (monotonic) the next archive pass reads from the first finished job again,
        for a job skipped meanwhile (locked by a hand-made cancel, or committed late)."""
        self.metrics = metrics.Advancer(worker.app)
        """Counts finished rows into the metrics counters before they are pruned."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run a pass every ``maintenance_interval`` seconds."""
        task_status.started()
        interval = self.worker.settings.maintenance_interval
        while not self.worker.passes.closing:
            with self.worker.passes.shielded():  # a shutdown does not cut a pass off
                try:
                    await self.run_once()
                except (psycopg.Error, DatabaseError) as exc:
                    self.is_leader = False
                    # A failover or an outage: every registry row may have expired
                    # meanwhile (a promoted standby's start time does not show it).
                    self._rescue_from = (anyio.current_time()
                                         + self.worker.settings.heartbeat_ttl)
                    log.warning("maintenance.failed", error=describe(exc))
            self.ticks += 1
            await anyio.sleep(interval)

    async def run_once(self) -> None:
        """Renew or take the lease; if leading, do one pass of every chore."""
        worker = self.worker
        app = worker.app
        q = app.sql
        settings = worker.settings
        async with app.connection() as conn:
            cur = await conn.execute(
                q["leader_elect"],
                {"name": LEADER_NAME, "id": worker.id, "ttl": settings.leader_ttl},
            )
            leading = await cur.fetchone() is not None
        if leading != self.is_leader:
            log.info("leader.elected" if leading else "leader.lost", worker_id=worker.id)
        self.is_leader = leading
        if not leading:
            return
        started = anyio.current_time()
        await self.stage()
        if anyio.current_time() >= self._rescue_from:
            await self.rescue()
        await self.sweep()
        await self.prune()
        await self.archive()
        log.debug("maintenance.pass", worker_id=worker.id,
                  duration_ms=round((anyio.current_time() - started) * 1000, 3))

    async def _rows(
        self, name: str, params: dict[str, Any], *, queue_column: int | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one query; if ``queue_column`` is given, wake the queues of the rows."""
        app = self.worker.app
        async with app.connection() as conn:
            cur = await conn.execute(app.sql[name], params)
            rows = await cur.fetchall() if cur.description is not None else []
            if queue_column is not None:
                wake = ops.notify_queues(app.sql, [r[queue_column] for r in rows])
                await ops.run_async(conn, wake, "wake queues")
        return rows

    async def stage(self) -> int:
        """Make due scheduled and retryable jobs available; return how many."""
        rows = await self._rows(
            "jobs_stage", {"limit": self.worker.settings.stage_limit}, queue_column=1
        )
        if rows:
            log.info("maintenance.staged", count=len(rows))
        return len(rows)

    async def rescue(self) -> int:
        """Recover jobs of workers whose heartbeat expired; return how many."""
        settings = self.worker.settings
        rows = await self._rows("jobs_rescue", {"limit": settings.rescue_limit,
                                                "ttl": settings.heartbeat_ttl,
                                                "self": self.worker.id}, queue_column=2)
        for job_id, state, queue, attempted_by, _wf in rows:
            log.warning("job.rescued", job_id=job_id, queue=queue, state=state,
                        lost_worker=attempted_by)
        if rows:
            log.warning("sweep.rescued", job_ids=[r[0] for r in rows])
        await self._rows("workers_prune", {"after": settings.heartbeat_ttl * 6})
        return len(rows)

    async def sweep(self) -> int:
        """Backstop the workflow engine; return how many steps it settled, cancelled or
        released.

        Settles finished steps whose settlement was never recorded (a rescue that
        discarded a step, a cancel made by hand in SQL), cancels and settles held steps
        whose dependency's rows were deleted (see :func:`cancel_orphaned`), and releases
        held steps that have nothing left to wait on. Logs ``workflow.finished`` for each
        workflow it finished, and ``maintenance.swept`` with the counts when it did
        anything.
        """
        app = self.worker.app
        limit = self.worker.settings.rescue_limit
        async with app.connection() as conn:
            events, finished, settled = await ops.run_async(
                conn, workflows.sweep(app.sql, limit), "sweep")
        app.events.publish(events + finished)
        async with app.connection() as conn:
            events, cut_short, cancelled = await ops.run_async(
                conn, cancel_orphaned(app.sql, limit), "cancel orphaned steps")
        for step in cancelled:
            log.warning("workflow.step_cancelled", workflow_id=str(step["workflow_id"]),
                        step=step["workflow_step"], job_id=step["job_id"],
                        reason=step["error"], found_by="sweep")
        app.events.publish(events + cut_short)
        finished += cut_short
        released = await self._rows("nodes_stranded", {}, queue_column=1)
        self._log_finished(finished)
        if settled or cancelled or released or finished:
            log.info("maintenance.swept", settled=settled, released=len(released),
                     cancelled=len(cancelled), finished=len(finished))
        return settled + len(cancelled) + len(released)

    @staticmethod
    def _log_finished(finished: list[Payload]) -> None:
        """Log ``workflow.finished`` (a warning if it failed) for workflows the sweep
        finished, with their tally."""
        for payload in finished:
            (log.warning if payload["outcome"] == "failed" else log.info)(
                "workflow.finished", workflow_id=str(payload["workflow_id"]),
                label=payload["workflow_label"], outcome=payload["outcome"],
                steps=payload["total_steps"], settled=payload["settled_steps"],
                failed_steps=list(payload["failed_steps"]), found_by="sweep")

    async def prune(self) -> dict[str, int]:
        """Delete one bounded batch of each kind of old row; return counts by table.

        Finished jobs outside workflows and finished workflows (with their jobs, nodes,
        edges, completions, stats and logs) older than ``prune_after``; captured context
        older than ``debug_log_max_age``; spilled event payloads older than an hour. A
        running workflow is never touched.
        """
        settings = self.worker.settings
        await self.metrics.before_prune(settings.prune_after)
        limit = settings.prune_limit
        counts: dict[str, int] = {}
        if settings.prune_after is not None:
            age = settings.prune_after
            [(counts["jobs"],)] = await self._rows("jobs_prune", {"max_age": age, "limit": limit})
            [(counts["workflows"], counts["workflow_jobs"], counts["step_stats"],
              counts["debug_logs"])] = await self._rows(
                "workflows_prune", {"max_age": age, "limit": settings.prune_workflow_limit})
        if settings.debug_log_max_age is not None:
            [(aged,)] = await self._rows(
                "debug_logs_prune", {"max_age": settings.debug_log_max_age, "limit": limit})
            counts["debug_logs"] = counts.get("debug_logs", 0) + aged
        [(counts["event_payloads"],)] = await self._rows("event_payloads_prune",
                                                         {"limit": limit})
        pruned = {table: int(n) for table, n in counts.items() if n}
        if pruned:
            log.info("maintenance.pruned", **pruned)
        return pruned

    async def archive(self) -> dict[str, Any]:
        """Move one batch of old finished jobs into the archive and drop the archive's days
        that retention (``prune_after``) has passed; return what was done.

        A batch is at most ``archive_limit`` jobs of one day (the oldest due), moved in one
        statement (``jobs_archive_move``) once the metrics counters have counted them.
        Logs ``maintenance.archived`` with the counts when it did anything.
        """
        settings = self.worker.settings
        done: dict[str, Any] = {}
        if settings.archive_after is not None:
            age = settings.archive_after
            if anyio.current_time() >= self._archive_rescan_at:
                self._archive_from = "-infinity"
                self._archive_rescan_at = anyio.current_time() + ARCHIVE_RESCAN
            day = await self._rows("jobs_archive_day",
                                   {"max_age": age, "since": self._archive_from})
            if day:
                [(self._archive_from, day_end)] = day
                await self.metrics.before_prune(age)  # count them before they leave jobs
                [(moved,)] = await self._rows("jobs_archive_move", {
                    "max_age": age, "since": self._archive_from, "day_end": day_end,
                    "limit": settings.archive_limit})
                if moved:
                    done["jobs"] = int(moved)
            elif self._archive_from == "-infinity":
                self._archive_from = None  # nothing due anywhere: back to the cheap start
        if settings.prune_after is not None:
            dropped = await self._rows("jobs_archive_drop",
                                       {"max_age": settings.prune_after, "wait": 1.0})
            if dropped:
                done["partitions_dropped"] = [name for (name,) in dropped]
        if done:
            log.info("maintenance.archived", **done)
        return done

    async def resign(self) -> None:
        """Give up the lease so another worker takes over at once."""
        if not self.is_leader:
            return
        app = self.worker.app
        try:
            async with app.connection() as conn:
                await conn.execute(app.sql["leader_resign"],
                                   {"name": LEADER_NAME, "id": self.worker.id})
        except psycopg.Error as exc:
            log.warning("leader.resign_failed", error=describe(exc))
        self.is_leader = False


def cancel_orphaned(q: Queries, limit: int
                    ) -> Op[tuple[list[Payload], list[Payload], list[dict[str, Any]]]]:
    """Cancel up to ``limit`` held steps that a deleted dependency would hold for ever,
    then settle them as any cancelled step, so their dependents follow and their workflows
    can finish (``steps_orphaned`` says which steps qualify, and when they are looked for:
    once nothing else in their workflow can run).

    A dependency that is gone and never settled is counted as a cancelled step of its
    workflow. The workflows are locked before their job rows, as every writer does.
    Returns the steps' events, the ``workflow_finished`` events and the cancelled steps
    (``workflow_id``, ``label``, ``workflow_step``, ``step``, ``job_id``, ``attempt``,
    ``error``).
    """
    found = yield Stmt(q["steps_orphaned"], {"limit": limit}, row_factory=dict_row)
    if not found:
        return [], [], []
    workflow_ids = [row["workflow_id"] for row in found]
    yield settle.lock(q, workflow_ids)
    rows = yield Stmt(q["steps_orphaned_cancel"], {
        "limit": limit, "workflow_ids": sorted({str(w) for w in workflow_ids}),
    }, row_factory=dict_row)
    events = yield from announce.send_steps(q, [
        StepEvent(r["workflow_id"], r["label"], r["workflow_step"], r["step"],
                  JobState.CANCELLED.value, r["job_id"], r["attempt"], error=r["error"])
        for r in rows
    ])
    finished = yield from settle.settle(q, [
        (r["workflow_id"], r["workflow_step"], JobState.CANCELLED.value, r["job_id"])
        for r in rows
    ], locked=True)
    return events, finished, rows

