"""The context a running step receives (declare a ``ctx`` parameter to get it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What a step knows about the job it is running.

    :ivar job_id: the job's id.
    :ivar attempt: which attempt this is, from 1.
    :ivar results: for a workflow step, each dependency's name mapped to its result.
    :ivar workflow_id: the workflow this step belongs to, else ``None``.
    :ivar step: the step's name within its workflow (else the registered step name).
    :ivar model: the model of a multi-model fan-out copy, else ``None``.
    """

    job_id: int
    attempt: int
    max_attempts: int
    queue: str
    step: str
    args: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    snoozes: int = 0
    workflow_id: uuid.UUID | None = None
    results: dict[str, Any] = field(default_factory=dict)
    model: str | None = None

    @property
    def is_last_attempt(self) -> bool:
        """Whether a failure now discards the job."""
        return self.attempt >= self.max_attempts
