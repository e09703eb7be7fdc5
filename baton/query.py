"""Read models for people and pages: workflow state, step lists, costs."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg.rows import BaseRowFactory, class_row, dict_row
from pydantic import BaseModel, Field

from baton.db import translate_errors
from baton.errors import WorkflowNotFound
from baton.periodic import LIVE_AFTER, ScheduleInfo
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


_VIEW_ROW = class_row(WorkflowView)
_STEP_ROW = class_row(StepView)
_COST_ROW = class_row(CostLine)
_WORKER_ROW = class_row(WorkerInfo)


class Query:
    """``app.query``: current state from the database (seed a view, then follow events).

    Every read names its columns and reads them by name: a column a later migration adds
    changes nothing here.
    """

    def __init__(self, app: Baton) -> None:
        self.app = app

    async def _rows(self, name: str, params: dict[str, Any], row_factory: BaseRowFactory[T]
                    ) -> list[T]:
        with translate_errors(f"query {name}"):
            # One statement, so no transaction: one round trip, and no COMMIT to lose.
            async with self.app.connection(autocommit=True) as conn:
                cur = conn.cursor(row_factory=row_factory)
                await cur.execute(self.app.sql[name], params)
                return await cur.fetchall()

    async def workflow(self, workflow_id: uuid.UUID | str) -> WorkflowView:
        """Return a workflow with the current state of every step.

        :raises WorkflowNotFound: if there is no such workflow.
        """
        rows = await self._rows("workflow_get", {"id": str(workflow_id)}, _VIEW_ROW)
        if not rows:
            raise WorkflowNotFound(str(workflow_id))
        view = rows[0]
        view.steps = await self._rows("workflow_steps_get", {"id": str(workflow_id)}, _STEP_ROW)
        return view

    async def workflows(
        self, *, label: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[WorkflowView]:
        """List workflows, newest first, optionally by label and state (without steps)."""
        return await self._rows("workflows_list", {"label": label, "state": state,
                                                   "limit": limit}, _VIEW_ROW)

    async def cost(self, workflow_id: uuid.UUID | str) -> CostReport:
        """Return a workflow's usage and cost, per step and model."""
        lines = await self._rows("cost_workflow_steps", {"id": str(workflow_id)}, _COST_ROW)
        return CostReport(workflow_id=uuid.UUID(str(workflow_id)), lines=lines)

    async def cost_by_model(self, since: datetime, until: datetime) -> list[CostLine]:
        """Return usage and cost per model for calls recorded in ``[since, until)``."""
        return await self._rows("cost_by_model", {"since": since, "until": until}, _COST_ROW)

    async def status(self) -> Status:
        """Return every queue's counts by state and the live workers."""
        queues: dict[str, QueueStatus] = {}
        for row in await self._rows("queues_status", {}, dict_row):
            entry = queues.setdefault(row["queue"], QueueStatus(
                queue=row["queue"], counts={}, oldest_available_seconds=None))
            entry.counts[row["state"]] = int(row["jobs"])
            if row["oldest_available_seconds"] is not None:
                entry.oldest_available_seconds = float(row["oldest_available_seconds"])
        workers = await self._rows("workers_live", {}, _WORKER_ROW)
        unrunnable = await self._rows("jobs_unrunnable", {}, class_row(Unrunnable))
        return Status(queues=list(queues.values()), workers=workers, unrunnable=unrunnable)

    async def schedules(self) -> list[ScheduleInfo]:
        """Return every periodic job's schedule by name, with its next and last tick
        (``live``: a live worker defines it, so the leader ticks it)."""
        return await self._rows("schedules_list", {"ttl": LIVE_AFTER},
                                class_row(ScheduleInfo))
