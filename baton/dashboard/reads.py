"""What the dashboard's pages read: one operation per page, each of indexed, bounded
queries (``baton/queries/dashboard.sql``), run on the primary or on a read replica."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from psycopg.rows import BaseRowFactory, class_row, dict_row
from pydantic import BaseModel

from baton.db import Queries
from baton.errors import JobNotFound, NoSuchStepError, WorkflowNotFound
from baton.job import Job, JobState
from baton.ops import Op, Stmt
from baton.periodic import ScheduleInfo, list_schedules
from baton.query import JobSummary, StepView, WorkerInfo
from baton.workflows import WorkflowInfo

T = TypeVar("T")

UNFINISHED = ("pending", "scheduled", "available", "executing", "retryable")
FINISHED = ("completed", "discarded", "cancelled")
THROUGHPUT_SECONDS = 300
"""The window the overview's throughput is counted over."""
PAGE_SIZE = 50
MAX_STEPS = 2_000
"""The most steps a workflow page lists."""


class JobRow(JobSummary):
    """A job in a listing, with its last error."""

    last_error: str | None = None


class StatRow(BaseModel):
    """One recorded call of a step."""

    attempt: int | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    duration_ms: float | None
    cost: Decimal | None
    inserted_at: datetime


class LogRow(BaseModel):
    """One captured context of a step."""

    attempt: int | None
    request: Any
    response: Any
    context: Any
    extra: Any
    inserted_at: datetime


@dataclass
class QueueRow:
    """A queue on the overview."""

    name: str
    paused: bool = False
    concurrency: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    """Jobs finished in the last :data:`THROUGHPUT_SECONDS`, by state."""
    oldest_seconds: float | None = None
    workers: int = 0

    @property
    def per_minute(self) -> float:
        """Jobs completed per minute over the window."""
        return self.finished.get("completed", 0) * 60 / THROUGHPUT_SECONDS


@dataclass
class Overview:
    """The front page: queues, live workers, periodic jobs, running workflows."""

    queues: list[QueueRow]
    workers: list[WorkerInfo]
    schedules: list[ScheduleInfo]
    running: list[WorkflowInfo]
    window: int = THROUGHPUT_SECONDS


@dataclass
class JobDetail:
    """One job with its result, if it kept one."""

    job: Job
    result: Any = None
    has_result: bool = False


@dataclass
class WorkflowDetail:
    """One workflow with its steps."""

    workflow: WorkflowInfo
    steps: list[StepView]
    truncated: bool = False
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per step that recorded usage: ``cost`` (None when nothing was priced), ``tokens``
    and ``unpriced`` calls."""

    @property
    def total_cost(self) -> Decimal | None:
        """What the priced calls of every step cost (None when none was priced)."""
        costs = [c["cost"] for c in self.costs.values() if c["cost"] is not None]
        return sum(costs, Decimal(0)) if costs else None


@dataclass
class StepDetail:
    """One step: its job, result, calls and captured context."""

    workflow: WorkflowInfo
    step: dict[str, Any]
    job: Job | None
    stats: list[StatRow]
    logs: list[LogRow]

    @property
    def cost(self) -> Decimal | None:
        """The sum of the priced calls (None when no call was priced)."""
        costs = [s.cost for s in self.stats if s.cost is not None]
        return sum(costs, Decimal(0)) if costs else None


def _rows(q: Queries, name: str, params: dict[str, Any], row_factory: BaseRowFactory[T]
          ) -> Op[list[T]]:
    rows: list[T] = yield Stmt(q[name], params, row_factory=row_factory)
    return rows


def overview(q: Queries, registered: Sequence[str] = ()) -> Op[Overview]:
    """Read the front page: every known queue (with ``registered``, the queues of the
    app's steps), its unfinished jobs by state and recent throughput."""
    queues: dict[str, QueueRow] = {name: QueueRow(name) for name in registered}
    for row in (yield from _rows(q, "jobs_live_counts", {}, dict_row)):
        entry = queues.setdefault(row["queue"], QueueRow(row["queue"]))
        entry.counts[row["state"]] = int(row["jobs"])
        if row["oldest_seconds"] is not None:
            entry.oldest_seconds = float(row["oldest_seconds"])
    params = {"seconds": THROUGHPUT_SECONDS, "now": None}
    for row in (yield from _rows(q, "dashboard_queue_throughput", params, dict_row)):
        entry = queues.setdefault(row["queue"], QueueRow(row["queue"]))
        entry.finished[row["state"]] = int(row["jobs"])
    for row in (yield from _rows(q, "dashboard_queue_settings", {}, dict_row)):
        entry = queues.setdefault(row["name"], QueueRow(row["name"]))
        entry.paused = row["paused"]
        entry.concurrency = row["concurrency"]
    workers = yield from _rows(q, "workers_live", {}, class_row(WorkerInfo))
    for worker in workers:
        for name in worker.queues:
            queues.setdefault(name, QueueRow(name)).workers += 1
    schedules = yield from list_schedules(q)
    running = yield from _rows(q, "dashboard_workflows_running",
                               {"label": None, "before_at": None, "before_id": None,
                                "limit": 10}, class_row(WorkflowInfo))
    return Overview([queues[name] for name in sorted(queues)], workers, schedules, running)


def jobs(q: Queries, *, queue: str | None, state: str | None, step: str | None,
         tag: str | None, before: int | None, limit: int = PAGE_SIZE) -> Op[list[JobRow]]:
    """Read a page of jobs, newest first, after the id ``before``."""
    if state is not None and state not in JobState.__members__.values():
        raise ValueError(f"no job state {state!r}")
    params = {"queue": queue, "state": state, "step": step, "tag": tag, "before": before,
              "limit": limit}
    return (yield from _rows(q, "dashboard_jobs_page", params, class_row(JobRow)))


def job(q: Queries, job_id: int) -> Op[JobDetail]:
    """Read one job and its kept result.

    :raises JobNotFound: if there is none.
    """
    found = yield from _rows(q, "job_get", {"id": job_id}, class_row(Job))
    if not found:
        raise JobNotFound(job_id)
    rows = yield from _rows(q, "job_result_get", {"id": job_id}, dict_row)
    detail = JobDetail(found[0])
    if rows and rows[0]["kept"]:
        detail.result, detail.has_result = rows[0]["result"], True
    elif rows and rows[0]["step_has_result"]:
        detail.result, detail.has_result = rows[0]["step_result"], True
    return detail


def workflows(q: Queries, *, state: str | None, label: str | None,
              before: tuple[datetime, uuid.UUID] | None, limit: int = PAGE_SIZE
              ) -> Op[list[WorkflowInfo]]:
    """Read a page of workflows: running ones newest first, finished ones (``completed``,
    ``failed``, or ``finished`` for both) the last to finish first."""
    params: dict[str, Any] = {"label": label, "limit": limit,
                              "before_at": before[0] if before else None,
                              "before_id": before[1] if before else None}
    if state in (None, "running"):
        name = "dashboard_workflows_running"
    elif state in ("completed", "failed", "finished"):
        name = "dashboard_workflows_finished"
        params["state"] = None if state == "finished" else state
    else:
        raise ValueError(f"no workflow state {state!r}")
    return (yield from _rows(q, name, params, class_row(WorkflowInfo)))


def _workflow_row(q: Queries, workflow_id: uuid.UUID) -> Op[WorkflowInfo]:
    rows = yield from _rows(q, "workflow_get", {"id": workflow_id}, class_row(WorkflowInfo))
    if not rows:
        raise WorkflowNotFound(str(workflow_id))
    return rows[0]


def workflow(q: Queries, workflow_id: uuid.UUID) -> Op[WorkflowDetail]:
    """Read a workflow and (up to :data:`MAX_STEPS` of) its steps.

    :raises WorkflowNotFound: if there is none.
    """
    info = yield from _workflow_row(q, workflow_id)
    steps = yield from _rows(q, "dashboard_workflow_steps",
                             {"id": workflow_id, "limit": MAX_STEPS + 1}, class_row(StepView))
    costs = yield from _rows(q, "dashboard_workflow_costs", {"id": workflow_id}, dict_row)
    return WorkflowDetail(info, steps[:MAX_STEPS], truncated=len(steps) > MAX_STEPS,
                          costs={row["step_name"]: row for row in costs})


def step(q: Queries, workflow_id: uuid.UUID, name: str, *, limit: int = 100
         ) -> Op[StepDetail]:
    """Read one step of a workflow: its node, job, calls and captured context.

    :raises WorkflowNotFound: if there is no such workflow.
    :raises NoSuchStepError: if it has no such step.
    """
    info = yield from _workflow_row(q, workflow_id)
    rows = yield from _rows(q, "dashboard_step_get", {"id": workflow_id, "name": name},
                            dict_row)
    if not rows:
        raise NoSuchStepError(str(workflow_id), name)
    node = rows[0]
    found = yield from _rows(q, "job_get", {"id": node["job_id"]}, class_row(Job))
    params = {"id": workflow_id, "name": name, "limit": limit}
    stats = yield from _rows(q, "dashboard_step_stats", params, class_row(StatRow))
    logs = yield from _rows(q, "dashboard_step_logs", params, class_row(LogRow))
    return StepDetail(info, node, found[0] if found else None, stats, logs)

