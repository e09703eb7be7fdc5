"""Job models: what a caller builds (:class:`JobSpec`) and what a row holds (:class:`Job`)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from typing_extensions import TypedDict, Unpack


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


NULL = "\\N"
"""NULL in COPY's text format."""

_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def encode_json(value: Any) -> str:
    """Encode plain JSON data compactly (NaN and infinities are refused)."""
    return _ENCODE(value)


class JobOptions(TypedDict, total=False):
    """The options :meth:`JobSpec.options` changes (and ``JobBatch.options``, for all)."""

    queue: str | None
    priority: int | None
    max_attempts: int | None
    timeout: float | None
    scheduled_at: datetime | None
    schedule_in: float | timedelta | None
    meta: dict[str, Any] | None


@dataclass(frozen=True)
class JobSpec:
    """A job ready to enqueue: built by ``step.new(**args)``, immutable.

    ``args`` already passed validation against the step's signature and are JSON-safe.
    Build one by hand (``JobSpec(step=name, args={...})``) only for a step that lives in
    another code base; its args are then checked when a worker runs it.
    """

    step: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 20
    timeout: float | None = None
    scheduled_at: datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    args_json: str = field(default="", repr=False, compare=False)
    """The args as JSON text (computed once, when the job is built)."""

    def __post_init__(self) -> None:
        check_options(queue=self.queue, priority=self.priority, max_attempts=self.max_attempts,
                      timeout=self.timeout)
        if not self.args_json:
            try:
                object.__setattr__(self, "args_json", encode_json(self.args))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"job args are not JSON-serializable: {exc}") from exc

    def with_args(self, args: dict[str, Any], args_json: str) -> JobSpec:
        """Return a copy with other, already validated args (what ``step.new`` builds from
        the step's own spec: its options were checked once, so nothing is checked again)."""
        clone = object.__new__(JobSpec)
        fields = clone.__dict__
        fields.update(self.__dict__)
        fields["args"] = args
        fields["args_json"] = args_json
        return clone

    def options(self, **changes: Unpack[JobOptions]) -> JobSpec:
        """Return a copy with some options changed (``schedule_in`` is seconds from now;
        an option given as None stays as it is)."""
        if unknown := changes.keys() - JobOptions.__annotations__.keys():
            raise TypeError(f"unknown job options: {', '.join(sorted(unknown))}")
        schedule_in = changes.pop("schedule_in", None)
        if schedule_in is not None:
            seconds = (
                schedule_in.total_seconds() if isinstance(schedule_in, timedelta) else schedule_in
            )
            changes["scheduled_at"] = datetime.now(UTC) + timedelta(seconds=seconds)
        scheduled_at = changes.get("scheduled_at")
        if scheduled_at is not None and scheduled_at.tzinfo is None:
            raise ValueError("scheduled_at must be timezone-aware")
        given: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given)

    def row_json(
        self,
        *,
        state: JobState = JobState.AVAILABLE,
        workflow_id: uuid.UUID | None = None,
        workflow_step: str | None = None,
    ) -> str:
        """Return the job's JSON object for the insert statement."""
        at = _ENCODE(self.scheduled_at.isoformat()) if self.scheduled_at else "null"
        return (
            f'{{"state":"{state.value}","queue":{_ENCODE(self.queue)},'
            f'"step":{_ENCODE(self.step)},"args":{self.args_json},'
            f'"meta":{_ENCODE(self.meta) if self.meta else "{}"},'
            f'"max_attempts":{self.max_attempts},"priority":{self.priority},'
            f'"timeout":{_ENCODE(self.timeout)},'
            f'"scheduled_at":{at},'
            f'"workflow_id":{_ENCODE(str(workflow_id)) if workflow_id else "null"},'
            f'"workflow_step":{_ENCODE(workflow_step)}}}'
        )

    def row_params(self) -> dict[str, Any]:
        """Return the job's parameters for the one-job ``job_insert`` statement."""
        return {
            "queue": self.queue, "step": self.step, "args": self.args_json,
            "meta": _ENCODE(self.meta) if self.meta else "{}",
            "max_attempts": self.max_attempts, "priority": self.priority,
            "timeout": self.timeout, "scheduled_at": self.scheduled_at,
        }

    def copy_row(
        self, state: JobState, now_text: str | None, workflow_id: str = NULL,
        workflow_step: str | None = None,
    ) -> str:
        """Return the job as one line of COPY text for ``jobs_copy`` (or, when ``now_text``
        is None, for ``jobs_copy_now``, which leaves ``scheduled_at`` to its default).

        ``now_text`` is the server's transaction time, when an immediate job is scheduled.
        """
        head, tail = self.copy_parts(state, now_text, workflow_id, workflow_step)
        return f"{head}{copy_text(self.args_json)}{tail}"

    def copy_parts(
        self, state: JobState, now_text: str | None, workflow_id: str = NULL,
        workflow_step: str | None = None,
    ) -> tuple[str, str]:
        """Return the COPY line of :meth:`copy_row` before and after the args."""
        if now_text is None:
            at_text = ""
        else:
            at_text = now_text if self.scheduled_at is None else self.scheduled_at.isoformat()
            at_text += "\t"
        meta = copy_text(_ENCODE(self.meta)) if self.meta else "{}"
        timeout = NULL if self.timeout is None else repr(float(self.timeout))
        step = NULL if workflow_step is None else copy_text(workflow_step)
        return (
            f"{state}\t{copy_text(self.queue)}\t{copy_text(self.step)}\t",
            f"\t{meta}\t{self.max_attempts}\t{self.priority}\t{timeout}\t{at_text}"
            f"{workflow_id}\t{step}\n",
        )


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """Escape ``value`` for COPY's text format (backslash, tab, newline, carriage return)."""
    if value.isprintable() and "\\" not in value:  # the common case, two scans in C
        return value
    return value.translate(_COPY_ESCAPES)


def check_options(*, queue: str, priority: int, max_attempts: int, timeout: float | None
                  ) -> None:
    """Raise ``ValueError`` unless the job options are in range."""
    if not isinstance(queue, str) or not 1 <= len(queue) <= 128:
        raise ValueError(f"queue must be a name of 1 to 128 characters, not {queue!r}")
    if not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer from 0 (first) to 9, not {priority!r}")
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive integer, not {max_attempts!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, not {timeout!r}")


def rows_text(rows: list[str]) -> str:
    """Join JSON objects into one JSON array."""
    return "[" + ",".join(rows) + "]"


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
