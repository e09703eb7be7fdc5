"""Job models: what a caller builds (:class:`JobSpec`) and what a row holds (:class:`Job`)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_jsonable_python


class JobState(StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    AVAILABLE = "available"
    EXECUTING = "executing"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the job will not run again unless retried by hand."""
        return self in _FINISHED


_FINISHED = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


class JobSpec(BaseModel):
    """A job ready to enqueue: built by ``step.new(**args)``, immutable.

    ``args`` already passed validation against the step's signature and are JSON-safe.
    """

    model_config = ConfigDict(frozen=True)

    step: str
    args: dict[str, Any] = Field(default_factory=dict)
    queue: str = "default"
    priority: int = Field(default=0, ge=0, le=9)
    max_attempts: int = Field(default=20, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    scheduled_at: datetime | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        scheduled_at: datetime | None = None,
        schedule_in: float | timedelta | None = None,
        meta: dict[str, Any] | None = None,
    ) -> JobSpec:
        """Return a copy with some options changed (``schedule_in`` is seconds from now)."""
        changes: dict[str, Any] = {
            "queue": queue,
            "priority": priority,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "meta": meta,
        }
        if schedule_in is not None:
            seconds = (
                schedule_in.total_seconds() if isinstance(schedule_in, timedelta) else schedule_in
            )
            scheduled_at = datetime.now(UTC) + timedelta(seconds=seconds)
        changes["scheduled_at"] = scheduled_at
        update = {k: v for k, v in changes.items() if v is not None}
        return self.model_validate({**self.model_dump(), **update})

    def row(
        self,
        *,
        state: JobState = JobState.AVAILABLE,
        workflow_id: uuid.UUID | None = None,
        workflow_step: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return the JSON-ready row for the insert statement."""
        return {
            "state": state.value,
            "queue": self.queue,
            "step": self.step,
            "args": self.args,
            "meta": meta if meta is not None else self.meta,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "timeout": self.timeout,
            "scheduled_at": self.scheduled_at.isoformat() if self.scheduled_at else None,
            "workflow_id": str(workflow_id) if workflow_id else None,
            "workflow_step": workflow_step,
        }


def json_text(value: Any) -> str:
    """Serialize ``value`` for a jsonb parameter (NaN and infinities rejected; values
    without a JSON form, such as datetimes or models, go through pydantic)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"),
                      default=to_jsonable_python)


class Job(BaseModel):
    """One row of the ``jobs`` table."""

    id: int
    state: JobState
    queue: str
    step: str
    args: dict[str, Any]
    meta: dict[str, Any]
    errors: list[dict[str, Any]]
    attempt: int
    max_attempts: int
    snoozes: int
    priority: int
    timeout: float | None
    workflow_id: uuid.UUID | None
    workflow_step: str | None
    inserted_at: datetime
    scheduled_at: datetime
    attempted_at: datetime | None
    attempted_by: str | None
    finalized_at: datetime | None
