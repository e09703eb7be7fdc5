"""Read models for people and pages: workflow state, step lists, costs."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from baton.db import translate_errors
from baton.errors import WorkflowNotFound
from baton.workflows import WorkflowInfo

if TYPE_CHECKING:
    from baton.app import Baton


class StepView(BaseModel):
    """One step of a workflow as it stands."""

    step_name: str
    worker: str
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


class Status(BaseModel):
    """Queues and live workers."""

    queues: list[QueueStatus]
    workers: list[WorkerInfo]


_COST_FIELDS = ("model", "calls", "input_tokens", "output_tokens", "cached_tokens", "cost",
                "unpriced", "duration_ms")

class Query:
    """``app.query``: current state from the database (seed a view, then follow events)."""

    def __init__(self, app: Baton) -> None:
        self.app = app

    async def _rows(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with translate_errors(f"query {name}"):
            async with self.app.connection() as conn:
                cur = await conn.execute(self.app.queries[name], params)
                return await cur.fetchall()

    async def workflow(self, workflow_id: uuid.UUID | str) -> WorkflowView:
        """Return a workflow with the current state of every step.

        :raises WorkflowNotFound: if there is no such workflow.
        """
        rows = await self._rows("workflow_get", {"id": str(workflow_id)})
        if not rows:
            raise WorkflowNotFound(str(workflow_id))
        view = WorkflowView.from_row(rows[0])
        steps = await self._rows("workflow_steps_get", {"id": str(workflow_id)})
        view.steps = [StepView(**dict(zip(StepView.model_fields, r, strict=True))) for r in steps]
        return view

    async def workflows(
        self, *, label: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[WorkflowView]:
        """List workflows, newest first, optionally by label and state (without steps)."""
        rows = await self._rows("workflows_list", {"label": label, "state": state,
                                                    "limit": limit})
        return [WorkflowView.from_row(r) for r in rows]

    async def cost(self, workflow_id: uuid.UUID | str) -> CostReport:
        """Return a workflow's usage and cost, per step and model."""
        rows = await self._rows("cost_workflow_steps", {"id": str(workflow_id)})
        lines = [CostLine(step_name=r[0], **dict(zip(_COST_FIELDS, r[1:], strict=True)))
                 for r in rows]
        return CostReport(workflow_id=uuid.UUID(str(workflow_id)), lines=lines)

    async def cost_by_model(self, since: datetime, until: datetime) -> list[CostLine]:
        """Return usage and cost per model for calls recorded in ``[since, until)``."""
        rows = await self._rows("cost_by_model", {"since": since, "until": until})
        return [CostLine(**dict(zip(_COST_FIELDS, r, strict=True))) for r in rows]

    async def status(self) -> Status:
        """Return every queue's counts by state and the live workers."""
        queues: dict[str, QueueStatus] = {}
        for queue, state, count, oldest in await self._rows("queues_status", {}):
            entry = queues.setdefault(queue, QueueStatus(queue=queue, counts={},
                                                         oldest_available_seconds=None))
            entry.counts[state] = int(count)
            if oldest is not None:
                entry.oldest_available_seconds = float(oldest)
        workers = [WorkerInfo(**dict(zip(WorkerInfo.model_fields, r, strict=True)))
                   for r in await self._rows("workers_live", {})]
        return Status(queues=list(queues.values()), workers=workers)
