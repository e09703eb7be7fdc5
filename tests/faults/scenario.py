"""One fault scenario from start to verdict: the load, the faults, the settling, the checks."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

import baton
from tests.conftest import Server
from tests.faults import app as faults_app
from tests.faults.harness import (
    Cluster,
    Subscriber,
    Violation,
    check_jobs,
    check_results_kept,
    check_runs,
    check_subscriber,
    check_workers,
    check_workflows,
    commit,
    load_runs,
    now,
    query,
    wait_settled,
    write_figures,
)


class Scenario:
    """The load, the worker processes and the faults of one scenario.

    :param worker_dsn: the URL the workers use (the proxy's, in the lost-reply scenario);
        the test itself and the step bodies' recorder always use ``dsn``.
    """

    def __init__(self, name: str, dsn: str, server: Server, logs: Path,
                 worker_dsn: str | None = None, seed: int = 12) -> None:
        self.name = name
        self.dsn = dsn
        self.server = server
        self.app = faults_app.app
        self.cluster = Cluster(worker_dsn or dsn, dsn, logs)
        self.subscriber = Subscriber(dsn)
        self.faults: Counter[str] = Counter()
        self.expected_jobs: dict[int, str] = {}
        self.expected_workflows: dict[uuid.UUID, int] = {}
        self.notes: dict[str, Any] = {}
        self.seed = seed
        self.random = random.Random(seed)
        self._started = time.monotonic()
        self._next_k = 1

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scenario]:
        """Run the subscriber during the block; stop every worker after it."""
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.subscriber.run)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.cluster.stop_all()
                await self.subscriber.app.close()
            self.cluster.close()

    # -- load -----------------------------------------------------------------------------

    async def enqueue_tiny(self, count: int) -> list[int]:
        """Enqueue ``count`` tiny jobs, expected to complete."""
        ids = await self.app.enqueue_many(faults_app.tiny.new_many(
            {"n": n} for n in range(count)))
        self.expected_jobs.update(dict.fromkeys(ids, "completed"))
        return ids

    async def enqueue(self, job: baton.JobSpec, expected: str = "completed") -> int:
        job_id = await self.app.enqueue(job)
        self.expected_jobs[job_id] = expected
        return job_id

    async def insert_workflows(self, count: int) -> list[uuid.UUID]:
        """Insert ``count`` five-step workflows, expected to complete with ``6 k``."""
        ids = []
        for _ in range(count):
            k = self._next_k
            self._next_k += 1
            wf_id = await self.app.insert(faults_app.workflow(k))
            self.expected_workflows[wf_id] = 6 * k
            ids.append(wf_id)
        rows = await query(self.dsn, "SELECT id FROM baton.jobs WHERE workflow_id = ANY(%s)",
                           (ids,))
        self.expected_jobs.update(dict.fromkeys((r["id"] for r in rows), "completed"))
        return ids

    # -- progress -------------------------------------------------------------------------

    async def started_bodies(self) -> int:
        rows = await query(self.dsn, "SELECT count(*) AS n FROM faults.attempts "
                                     "WHERE phase = 'start'")
        return int(rows[0]["n"])

    async def wait_started(self, at_least: int, timeout: float = 60.0) -> int:
        """Poll until ``at_least`` bodies started; return how many did."""
        with anyio.fail_after(timeout):
            while (n := await self.started_bodies()) < at_least:
                await anyio.sleep(0.1)
        return n

    async def wait_run(self, job_id: int, attempt: int | None = None,
                       timeout: float = 30.0) -> dict[str, Any]:
        """Poll until a body of ``job_id`` (of ``attempt``, if given) started; return its
        start row."""
        with anyio.fail_after(timeout):
            while True:
                rows = await query(self.dsn, """
                    SELECT job_id, attempt, pid, at FROM faults.attempts
                    WHERE phase = 'start' AND job_id = %s
                      AND (%s::integer IS NULL OR attempt = %s)
                    ORDER BY at LIMIT 1""", (job_id, attempt, attempt))
                if rows:
                    return rows[0]
                await anyio.sleep(0.05)

    # -- verdict --------------------------------------------------------------------------

    async def finish(self, settle_timeout: float = 40.0) -> list[Violation]:
        """Stop injecting: wait for the queue to settle, stop the workers, run every check
        and write the figures; return the violations."""
        faults_stopped = time.monotonic()
        stopping = now()
        counts = await wait_settled(self.dsn, settle_timeout)
        settle_seconds = time.monotonic() - faults_stopped
        self.subscriber.expect(self.expected_workflows)
        with anyio.move_on_after(10):
            await self.subscriber.all_seen.wait()
        # Jobs are judged while the workers still run (is the holder of a stuck job alive
        # and heartbeating?); attempts once they stopped (every body has ended).
        jobs = await check_jobs(self.dsn, self.expected_jobs, self.cluster)
        died = self.cluster.reap()
        await self.cluster.stop_all()
        stuck = [w.name for w in self.cluster.workers if w.fate == "killed"
                 and w.exited_at is not None and w.exited_at >= stopping]
        runs = await load_runs(self.dsn, self.cluster)
        report = await check_runs(self.dsn, runs, self.cluster)
        violations = [
            *jobs,
            *report.violations,
            *await check_results_kept(self.dsn, runs),
            *await check_workflows(self.dsn, self.expected_workflows),
            *check_subscriber(self.subscriber, self.expected_workflows),
            *check_workers(self.cluster, died),
        ]
        write_figures(self.name, {
            "commit": commit(),
            "seed": self.seed,
            "seconds": round(time.monotonic() - self._started, 1),
            "settle_seconds": round(settle_seconds, 1),
            "jobs": len(self.expected_jobs),
            "workflows": len(self.expected_workflows),
            "jobs_by_state": counts,
            "bodies_started": report.runs,
            "jobs_run": report.jobs,
            "reruns": sum(report.reruns.values()),
            "rerun_reasons": dict(report.reruns),
            "duplicates": sum(report.overlaps.values()),
            "duplicate_reasons": dict(report.overlaps),
            "faults": dict(self.faults),
            "worker_processes": len(self.cluster.workers),
            "workers_killed_at_stop": stuck,
            "workflow_finished_seen": sum(self.subscriber.finished.values()),
            "subscriber_error": self.subscriber.error,
            "violations": {v.check: v.detail for v in violations},
            **self.notes,
        })
        return violations


def verdict(violations: list[Violation]) -> str:
    """The assertion message: every violation with its evidence."""
    return "\n".join(v.text() for v in violations)
