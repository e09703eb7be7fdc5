"""Read models for people and pages: workflow state, step lists, costs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg.rows import BaseRowFactory, class_row, dict_row
from pydantic import BaseModel, Field

from baton.coroutines import loop_only
from baton.db import Queries
from baton.errors import WorkflowNotFound
from baton.job import JobState
from baton.ops import Op, Stmt
from baton.periodic import ScheduleInfo, list_schedules
from baton.workflows import WorkflowInfo

if TYPE_CHECKING:
    from baton.app import Baton

T = TypeVar("T")


class StepView(BaseModel):
    """One step of a workflow as it stands."""

    step_name: str
    """The step's name inside its workflow."""
    function: str
    """The registered step function it runs."""
    state: str | None
    attempt: int | None
    max_attempts: int | None
    deps: list[str]
    model: str | None
    has_result: bool
    last_error: str | None
    job_id: int
    attempted_at: datetime | None
    finalized_at: datetime | None
    group_name: str | None
    cost: Decimal | None

    @property
    def duration(self) -> float | None:
        """Seconds from the last start to the finish, if both happened."""
        if self.attempted_at and self.finalized_at:
            return (self.finalized_at - self.attempted_at).total_seconds()
        return None


class WorkflowView(WorkflowInfo):
    """A workflow and every one of its steps."""

    steps: list[StepView] = Field(default_factory=list)


class CostLine(BaseModel):
    """Usage and cost of one group of calls (a step and model, or a model)."""

    step_name: str | None = None
    model: str | None
    calls: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost: Decimal | None
    unpriced: int
    """Calls whose model had no price (their cost is unknown, not zero)."""
    duration_ms: float | None


class CostReport(BaseModel):
    """What a workflow cost: per step and model, and in total."""

    workflow_id: uuid.UUID
    lines: list[CostLine]

    @property
    def total_cost(self) -> Decimal:
        """The sum of priced calls."""
        return sum((line.cost or Decimal(0) for line in self.lines), Decimal(0))

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens over every call."""
        return sum(line.input_tokens + line.output_tokens for line in self.lines)

    def by_model(self) -> dict[str | None, Decimal]:
        """Cost per model."""
        out: dict[str | None, Decimal] = {}
        for line in self.lines:
            out[line.model] = out.get(line.model, Decimal(0)) + (line.cost or Decimal(0))
        return out


class QueueStatus(BaseModel):
    """One queue: its jobs by state and how long the oldest available one has waited."""

    queue: str
    counts: dict[str, int]
    oldest_available_seconds: float | None


class WorkerInfo(BaseModel):
    """A live worker process."""

    id: str
    hostname: str
    pid: int
    queues: dict[str, int]
    started_at: datetime
    heartbeat_at: datetime


class Unrunnable(BaseModel):
    """Available jobs of one step that no live worker can run: none serves their queue or
    knows the step (an older deploy, a worker of another service, a step named in
    ``__main__``). They wait, unclaimed, for a worker that can."""

    queue: str
    step: str
    jobs: int


class Status(BaseModel):
    """Queues, live workers, and jobs no live worker can run."""

    queues: list[QueueStatus]
    workers: list[WorkerInfo]
    unrunnable: list[Unrunnable] = Field(default_factory=list)


class JobSummary(BaseModel):
    """One job in a listing (``app.query.jobs``, ``baton job list``)."""

    id: int
    state: str
    queue: str
    step: str
    attempt: int
    max_attempts: int
    tags: list[str]
    workflow_id: uuid.UUID | None
    workflow_step: str | None
    inserted_at: datetime
    scheduled_at: datetime
    finalized_at: datetime | None


_VIEW_ROW = class_row(WorkflowView)
_STEP_ROW = class_row(StepView)
_COST_ROW = class_row(CostLine)
_WORKER_ROW = class_row(WorkerInfo)
_JOB_ROW = class_row(JobSummary)


def _rows(q: Queries, name: str, params: dict[str, Any], row_factory: BaseRowFactory[T]
          ) -> Op[list[T]]:
    rows: list[T] = yield Stmt(q[name], params, row_factory=row_factory)
    return rows


def _workflow(q: Queries, workflow_id: uuid.UUID | str) -> Op[WorkflowView]:
    rows = yield from _rows(q, "workflow_get", {"id": str(workflow_id)}, _VIEW_ROW)
    if not rows:
        raise WorkflowNotFound(str(workflow_id))
    view = rows[0]
    view.steps = yield from _rows(q, "workflow_steps_get", {"id": str(workflow_id)}, _STEP_ROW)
    return view


def _cost(q: Queries, workflow_id: uuid.UUID | str) -> Op[CostReport]:
    lines = yield from _rows(q, "cost_workflow_steps", {"id": str(workflow_id)}, _COST_ROW)
    return CostReport(workflow_id=uuid.UUID(str(workflow_id)), lines=lines)


def _status(q: Queries) -> Op[Status]:
    queues: dict[str, QueueStatus] = {}
    for row in (yield from _rows(q, "queues_status", {}, dict_row)):
        entry = queues.setdefault(row["queue"], QueueStatus(
            queue=row["queue"], counts={}, oldest_available_seconds=None))
        entry.counts[row["state"]] = int(row["jobs"])
        if row["oldest_available_seconds"] is not None:
            entry.oldest_available_seconds = float(row["oldest_available_seconds"])
    workers = yield from _rows(q, "workers_live", {}, _WORKER_ROW)
    unrunnable = yield from _rows(q, "jobs_unrunnable", {}, class_row(Unrunnable))
    return Status(queues=list(queues.values()), workers=workers, unrunnable=unrunnable)


def _jobs(q: Queries, queue: str | None, state: str | None, step: str | None,
          tags: Sequence[str] | None, limit: int) -> Op[list[JobSummary]]:
    if state is not None and state not in JobState.__members__.values():
        raise ValueError(f"no job state {state!r}: one of "
                         f"{', '.join(s.value for s in JobState)}")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    params = {"queue": queue, "state": state, "step": step,
              "tags": list(tags) if tags else None, "limit": limit}
    return (yield from _rows(q, "jobs_list", params, _JOB_ROW))


class Query:
    """``app.query``: current state from the database (seed a view, then follow events).

    Every read names its columns and reads them by name: a column a later migration adds
    changes nothing here. Each read has a ``_sync`` twin for synchronous code. Reads go to
    the app's ``read_dsn`` (a replica may lag: see ``docs/pgbouncer.md``).
    """

    def __init__(self, app: Baton) -> None:
        self.app = app

    async def _read(self, op: Op[T], name: str) -> T:
        # Autocommit: one round trip a statement, and no COMMIT to lose. On the app's
        # read_dsn (a replica, if one is set).
        return await self.app._inspect(op, f"query {name}")

    def _read_sync(self, op: Op[T], name: str) -> T:
        return self.app._inspect_sync(op, f"query {name}")

    @loop_only
    async def workflow(self, workflow_id: uuid.UUID | str) -> WorkflowView:
        """Return a workflow with the current state of every step.

        :raises WorkflowNotFound: if there is no such workflow.
        """
        return await self._read(_workflow(self.app.sql, workflow_id), "workflow")

    def workflow_sync(self, workflow_id: uuid.UUID | str) -> WorkflowView:
        """Return a workflow and its steps from synchronous code (see :meth:`workflow`)."""
        return self._read_sync(_workflow(self.app.sql, workflow_id), "workflow")

    @loop_only
    async def workflows(
        self, *, label: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[WorkflowView]:
        """List workflows, newest first, optionally by label and state (without steps)."""
        params = {"label": label, "state": state, "limit": limit}
        return await self._read(_rows(self.app.sql, "workflows_list", params, _VIEW_ROW),
                                "workflows")

    def workflows_sync(
        self, *, label: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[WorkflowView]:
        """List workflows from synchronous code (see :meth:`workflows`)."""
        params = {"label": label, "state": state, "limit": limit}
        return self._read_sync(_rows(self.app.sql, "workflows_list", params, _VIEW_ROW),
                               "workflows")

    @loop_only
    async def cost(self, workflow_id: uuid.UUID | str) -> CostReport:
        """Return a workflow's usage and cost, per step and model."""
        return await self._read(_cost(self.app.sql, workflow_id), "cost")

    def cost_sync(self, workflow_id: uuid.UUID | str) -> CostReport:
        """Return a workflow's usage and cost from synchronous code (see :meth:`cost`)."""
        return self._read_sync(_cost(self.app.sql, workflow_id), "cost")

    @loop_only
    async def cost_by_model(self, since: datetime, until: datetime) -> list[CostLine]:
        """Return usage and cost per model for calls recorded in ``[since, until)``."""
        params = {"since": since, "until": until}
        return await self._read(_rows(self.app.sql, "cost_by_model", params, _COST_ROW),
                                "cost_by_model")

    def cost_by_model_sync(self, since: datetime, until: datetime) -> list[CostLine]:
        """Return usage and cost per model from synchronous code (see
        :meth:`cost_by_model`)."""
        params = {"since": since, "until": until}
        return self._read_sync(_rows(self.app.sql, "cost_by_model", params, _COST_ROW),
                               "cost_by_model")

    @loop_only
    async def status(self) -> Status:
        """Return every queue's counts by state and the live workers."""
        return await self._read(_status(self.app.sql), "status")

    def status_sync(self) -> Status:
        """Return the queues and live workers from synchronous code (see :meth:`status`)."""
        return self._read_sync(_status(self.app.sql), "status")

    @loop_only
    async def jobs(
        self, *, queue: str | None = None, state: str | None = None, step: str | None = None,
        tags: Sequence[str] | None = None, limit: int = 50,
    ) -> list[JobSummary]:
        """List jobs, newest first, by queue, state, step and tags (a job listed has every
        one of ``tags``).

        :raises ValueError: for an unknown state or a limit below 1.
        """
        return await self._read(_jobs(self.app.sql, queue, state, step, tags, limit), "jobs")

    def jobs_sync(
        self, *, queue: str | None = None, state: str | None = None, step: str | None = None,
        tags: Sequence[str] | None = None, limit: int = 50,
    ) -> list[JobSummary]:
        """List jobs from synchronous code (see :meth:`jobs`)."""
        return self._read_sync(_jobs(self.app.sql, queue, state, step, tags, limit), "jobs")

    @loop_only
    async def schedules(self) -> list[ScheduleInfo]:
        """Return every periodic job's schedule by name, with its next and last tick
        (``live``: a live worker defines it, so the leader ticks it)."""
        return await self._read(list_schedules(self.app.sql), "schedules")

    def schedules_sync(self) -> list[ScheduleInfo]:
        """Return the schedules from synchronous code (see :meth:`schedules`)."""
        return self._read_sync(list_schedules(self.app.sql), "schedules")
