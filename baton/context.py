"""The context a running step receives (declare a ``ctx`` parameter to get it)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import TypeAdapter

from baton.errors import NoResultError, NotADependencyError, NotInWorkflowError
from baton.pricing import Usage

if TYPE_CHECKING:
    from baton.app import Baton
    from baton.dag import Workflow

T = TypeVar("T")


@dataclass
class Context:
    """What a step knows about the job it is running.

    :ivar job_id: the job's id.
    :ivar attempt: which attempt this is, from 1.
    :ivar results: for a workflow step, each dependency's name mapped to its result (a
        fan-out group maps to ``{model: result}``); dependencies without a result are left
        out.
    :ivar workflow_id: the workflow this step belongs to, else ``None``.
    :ivar step: the step's name within its workflow (else the registered step name).
    :ivar model: the model of a multi-model fan-out copy (or the workflow's model map).
    :ivar failed_deps: for a step that runs despite failed dependencies (``ignore_*`` or
        ``min_success``), their names.
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
    workflow_label: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    failed_deps: list[str] = field(default_factory=list)
    model: str | None = None
    app: Baton | None = field(default=None, repr=False)
    capture_enabled: bool = False
    usage: list[Usage] = field(default_factory=list)
    captures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_last_attempt(self) -> bool:
        """Whether a failure now discards the job."""
        return self.attempt >= self.max_attempts

    def record_usage(
        self,
        *,
        model: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        duration_ms: float | None = None,
    ) -> Usage:
        """Record the tokens a model call used; written to ``step_stats`` with its cost.

        Recorded whether the attempt then succeeds or fails (the call was paid either way).
        """
        usage = Usage(model=model or self.model, input_tokens=input_tokens,
                      output_tokens=output_tokens, cached_tokens=cached_tokens,
                      cache_write_tokens=cache_write_tokens, duration_ms=duration_ms)
        self.usage.append(usage)
        return usage

    def capture(self, *, prompt: Any = None, response: Any = None, **extra: Any) -> bool:
        """Keep the full prompt and response in ``debug_logs``, with the upstream context.

        Does nothing (and returns ``False``) unless capture is on for the app, the step
        or the workflow (``Workflow(debug=True)``).
        """
        if not self.capture_enabled:
            return False
        self.captures.append({"request": prompt, "response": response, "extra": extra})
        return True

    @overload
    def result(self, name: str) -> Any: ...

    @overload
    def result(self, name: str, as_: type[T]) -> T: ...

    def result(self, name: str, as_: type[T] | None = None) -> Any:
        """Return dependency ``name``'s result, validated as ``as_`` if given.

        :raises NotInWorkflowError: if this job is not a workflow step.
        :raises NotADependencyError: if ``name`` is not one of this step's dependencies.
        :raises NoResultError: if that dependency stored no result.
        """
        if self.workflow_id is None:
            raise NotInWorkflowError()
        if name not in self.deps:
            raise NotADependencyError(self.step, name)
        if name not in self.results:
            raise NoResultError(name)
        value = self.results[name]
        return TypeAdapter(as_).validate_python(value) if as_ is not None else value

    async def read_result(self, name: str) -> Any:
        """Read the stored result of any step of this workflow (this one included).

        :raises NotInWorkflowError: if this job is not a workflow step.
        :raises NoSuchStepError: if the workflow has no such step.
        :raises NoResultError: if it stored no result.
        """
        if self.workflow_id is None or self.app is None:
            raise NotInWorkflowError()
        return await self.app.result(self.workflow_id, name)

    async def append(self, workflow: Workflow) -> list[str]:
        """Add the steps of ``workflow`` to this step's workflow (validated the same way).

        The new steps may depend on this step and any other existing step.
        """
        if self.workflow_id is None or self.app is None:
            raise NotInWorkflowError()
        return await self.app.append(self.workflow_id, workflow)
