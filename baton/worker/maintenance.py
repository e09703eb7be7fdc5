"""Maintenance run by the elected leader only: staging, rescue and pruning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg
import structlog

from baton import ops, workflows
from baton.db import describe
from baton.errors import DatabaseError

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = structlog.get_logger("baton.maintenance")

LEADER_NAME = "maintenance"


class Maintenance:
    """Elects a leader by lease row; the leader stages due jobs, rescues and prunes."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.is_leader = False
        self.ticks = 0
        self._rescue_from = 0.0
        """No rescue before this time (monotonic): after this process lost the database,
        live workers need a heartbeat's lifetime to renew rows that expired meanwhile."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run a pass every ``maintenance_interval`` seconds."""
        task_status.started()
        interval = self.worker.settings.maintenance_interval
        while True:
            try:
                await self.run_once()
            except (psycopg.Error, DatabaseError) as exc:
                self.is_leader = False
                # A failover or an outage: every registry row may have expired meanwhile
                # (a promoted standby's start time does not show it).
                self._rescue_from = anyio.current_time() + self.worker.settings.heartbeat_ttl
                log.warning("maintenance.failed", error=describe(exc))
            self.ticks += 1
            await anyio.sleep(interval)

    async def run_once(self) -> None:
        """Renew or take the lease; if leading, do one pass of every chore."""
        worker = self.worker
        app = worker.app
        q = app.queries
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
        log.debug("maintenance.pass", worker_id=worker.id,
                  duration=round(anyio.current_time() - started, 6))

    async def _rows(
        self, name: str, params: dict[str, Any], *, queue_column: int | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one query; if ``queue_column`` is given, wake the queues of the rows."""
        app = self.worker.app
        async with app.connection() as conn:
            cur = await conn.execute(app.queries[name], params)
            rows = await cur.fetchall() if cur.description is not None else []
            if queue_column is not None:
                wake = ops.notify_queues(app.queries, [r[queue_column] for r in rows])
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
                                                "ttl": settings.heartbeat_ttl}, queue_column=2)
        for job_id, state, queue, attempted_by, _wf in rows:
            log.warning("job.rescued", job_id=job_id, queue=queue, state=state,
                        lost_worker=attempted_by)
        if rows:
            log.warning("sweep.rescued", job_ids=[r[0] for r in rows])
        await self._rows("workers_prune", {"after": settings.heartbeat_ttl * 6})
        return len(rows)

    async def sweep(self) -> int:
        """Backstop the workflow engine; return how many steps it settled or released.

        Settles finished steps whose settlement was never recorded (a rescue that
        discarded a step, a cancel made by hand in SQL) and releases held steps that have
        nothing left to wait on.
        """
        app = self.worker.app
        async with app.connection() as conn:
            events, finished, settled = await ops.run_async(
                conn, workflows.sweep(app.queries, self.worker.settings.rescue_limit), "sweep")
        app.events.publish(events + finished)
        for payload in finished:
            if payload["outcome"] == "failed":
                log.warning("workflow.failed", workflow_id=str(payload["workflow_id"]),
                            failed_steps=payload["failed_steps"], found_by="sweep")
        released = await self._rows("nodes_stranded", {}, queue_column=1)
        if settled or released:
            log.info("maintenance.swept", settled=settled, released=len(released),
                     finished=len(finished))
        return settled + len(released)

    async def prune(self) -> dict[str, int]:
        """Delete one bounded batch of each kind of old row; return counts by table.

        Finished jobs outside workflows and finished workflows (with their jobs, nodes,
        edges, completions, stats and logs) older than ``prune_after``; captured context
        older than ``debug_log_max_age``; spilled event payloads older than an hour. A
        running workflow is never touched.
        """
        settings = self.worker.settings
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

    async def resign(self) -> None:
        """Give up the lease so another worker takes over at once."""
        if not self.is_leader:
            return
        app = self.worker.app
        try:
            async with app.connection() as conn:
                await conn.execute(app.queries["leader_resign"],
                                   {"name": LEADER_NAME, "id": self.worker.id})
        except psycopg.Error as exc:
            log.warning("leader.resign_failed", error=describe(exc))
        self.is_leader = False
