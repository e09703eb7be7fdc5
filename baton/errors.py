"""The exception tree: every error baton raises derives from :class:`BatonError`.

An error's docstring is its default message; errors carry the ids they are about as
attributes so callers never parse messages.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from decimal import Decimal


class BatonError(Exception):
    """Baton failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(BatonError):
    """Baton is not configured correctly."""


class ScheduleError(ConfigurationError, ValueError):
    """A schedule is invalid: its cron expression, its time zone, its job or its name."""

    def __init__(self, schedule: str, detail: str) -> None:
        self.schedule = schedule
        super().__init__(f"schedule {schedule!r}: {detail}")


class MigrationError(BatonError):
    """The database schema is missing or at an unexpected version; run `baton migrate`."""


class DatabaseError(BatonError):
    """The database refused or lost the operation."""

    def __init__(self, message: str | None = None, *, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        """The server's SQLSTATE code (``"23505"``, ``"40001"``), or ``None`` when the server
        sent none (a lost connection, a pool timeout, a failed connect)."""
        super().__init__(message)


class OutcomeUnknownError(DatabaseError):
    """The connection was lost after a write may have reached the server: it may or may not
    have committed. Read the data back, or retry with the same idempotency key."""

    def __init__(self, action: str, detail: str) -> None:
        self.action = action
        super().__init__(
            f"{action}: the connection was lost before the server confirmed it ({detail}), "
            "so it may have been committed; check before retrying (an enqueue with an "
            "idempotency key can simply be retried with the same key)"
        )


class UniqueKeyTakenError(DatabaseError):
    """Another job or workflow holds the unique key this one needs to run again: a retry of
    a finished unique job, or a resume of a finished unique workflow, while another holds
    its key. Cancel the holder or wait for it to finish, then try again."""

    def __init__(self, action: str, holder: str) -> None:
        self.action = action
        self.holder = holder
        """``"job"`` or ``"workflow"``: what holds the key."""
        super().__init__(
            f"{action} refused: another {holder} holds its unique key; cancel that {holder} "
            "or wait for it to finish, then try again", sqlstate="23505")


class WorkerStartError(BatonError):
    """Worker processes keep exiting before they are ready; see their errors."""

    def __init__(self, message: str | None = None, *, failed_starts: int = 0,
                 status: int | None = 0) -> None:
        self.failed_starts = failed_starts
        self.status = status
        """The last child's exit code, or minus the number of the signal that ended it;
        ``None`` when the system would not start it (no process or pipe to be had)."""
        super().__init__(message)


class StepError(BatonError):
    """A step was defined or called incorrectly."""


class UnknownStepError(StepError):
    """No step of that name is registered with this app."""

    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(
            f"no step named {step!r} is registered; import the module that defines it "
            "in the app passed to `baton worker --app`"
        )


class ArgsError(StepError):
    """A job's arguments are invalid for its step."""

    def __init__(self, step: str, detail: str, *, argument: str | None = None) -> None:
        self.step = step
        self.detail = detail
        self.argument = argument
        """The argument at fault (a dotted path into it, such as ``doc.tags.2``), when one
        is; ``meta.…`` for the job's meta."""
        self.index: int | None = None
        """The job's position in a :class:`~baton.step.JobBatch`, when it came from one."""
        super().__init__(f"invalid arguments for step {step!r}: {detail}")


class PayloadTooLargeError(ArgsError):
    """A job's serialized arguments exceed the configured limit."""

    def __init__(self, step: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(step, f"{size} bytes of JSON exceeds the limit of {limit} bytes")


class OptionsError(StepError, ValueError):
    """A job option (queue, priority, max_attempts, timeout, scheduled_at, meta) is invalid.

    Also a :class:`ValueError`, as it was before it had a type of its own.
    """

    def __init__(self, option: str, detail: str, *, step: str | None = None) -> None:
        self.option = option
        self.step = step
        self.detail = detail
        where = f" of step {step!r}" if step else ""
        super().__init__(f"invalid option {option!r}{where}: {detail}")


class JobNotFound(BatonError):
    """No job has that id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class QueueNotFound(BatonError):
    """No queue has that name: no job, live worker or step uses it."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        super().__init__(
            f"no queue named {queue!r}: no job, live worker or registered step uses it; "
            "check the name (`baton queue list` shows the queues)"
        )


class WorkflowError(BatonError):
    """A workflow is invalid."""


class CycleError(WorkflowError):
    """A workflow's dependencies form a cycle."""

    def __init__(self, steps: Sequence[str]) -> None:
        self.steps = list(steps)
        super().__init__("workflow has a dependency cycle through: " + " -> ".join(self.steps))


class UnknownDependencyError(WorkflowError):
    """A workflow step depends on a step that does not exist."""

    def __init__(self, step: str, dependency: str) -> None:
        self.step = step
        self.dependency = dependency
        super().__init__(f"step {step!r} depends on unknown step {dependency!r}")


class DuplicateStepError(WorkflowError):
    """Two workflow steps share one name."""

    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(f"workflow already has a step named {step!r}")


class BudgetExceededError(WorkflowError):
    """The workflow's budget is spent: raise it (``app.set_budget``) first."""

    def __init__(self, workflow_id: str, scope: str, spent: Decimal, budget: Decimal) -> None:
        self.workflow_id = workflow_id
        self.scope = scope
        """``""`` for the workflow's own budget, else the group or sub-workflow's name."""
        self.spent = spent
        self.budget = budget
        what = "its budget" if not scope else f"the budget of {scope!r}"
        super().__init__(
            f"workflow {workflow_id} spent ${spent.normalize():f} of {what} of "
            f"${budget.normalize():f}: raise it with app.set_budget(workflow_id, usd"
            f"{'' if not scope else f', group={scope!r}'}) before running its steps again")


class WorkflowNotFound(BatonError):
    """No workflow has that id."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"no workflow with id {workflow_id}")


class ResultError(BatonError):
    """A step result could not be read."""


class NotInWorkflowError(ResultError):
    """This job is not a workflow step, so it has no dependency results."""


class NotADependencyError(ResultError):
    """The named step is not a dependency of this step."""

    def __init__(self, step: str, name: str) -> None:
        self.step = step
        self.name = name
        super().__init__(f"{name!r} is not a dependency of step {step!r}; add it to deps")


class NoSuchStepError(ResultError):
    """The workflow has no step of that name."""

    def __init__(self, workflow_id: str, name: str) -> None:
        self.workflow_id = workflow_id
        self.name = name
        super().__init__(f"workflow {workflow_id} has no step named {name!r}")


class NoResultError(ResultError):
    """The step exists but stored no result."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"step {name!r} has no result (it returned None or has not completed)")


class ResultNotReadyError(ResultError):
    """The job has not completed, so it has no result (yet)."""

    def __init__(self, job_id: int, state: str) -> None:
        self.job_id = job_id
        self.state = state
        hint = ("retry it to run it again" if state in ("discarded", "cancelled")
                else "wait for it to complete (baton.testing.wait_for_job in tests)")
        super().__init__(f"job {job_id} is {state}, not completed, so it has no result; {hint}")


class ResultNotKeptError(ResultError):
    """The job completed, but its result was not kept."""

    def __init__(self, job_id: int, step: str) -> None:
        self.job_id = job_id
        self.step = step
        super().__init__(
            f"job {job_id} completed, but step {step!r} does not keep its results; declare "
            "it with @app.step(keep_result=True) to keep the results of its next jobs"
        )


class NoEventLoopError(BatonError, RuntimeError):
    """A coroutine method was called outside an event loop; call its ``_sync`` twin."""

    def __init__(self, method: str) -> None:
        self.method = method
        super().__init__(
            f"{method}() is a coroutine method and no event loop is running here, so it "
            f"would return an unawaited coroutine: await it inside async code, or call "
            f"{method}_sync() from synchronous code"
        )


class ProcessDiedError(BatonError):
    """A step's child process ended before the step returned."""

    def __init__(self, step: str, pid: int, returncode: int) -> None:
        self.step = step
        self.pid = pid
        self.returncode = returncode
        """The exit code, or minus the number of the signal that killed the process."""
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
            if returncode == -signal.SIGKILL:
                how += " (the kernel's out-of-memory killer sends this signal)"
        else:
            how = f"exited with code {returncode}"
        super().__init__(f"the process running step {step!r} (pid {pid}) {how} before the "
                         "step returned; its usage and captures of this attempt are lost")


class RemoteStepError(BatonError):
    """A step that runs in a child process raised an exception that could not be sent back
    to the worker as it was; this one stands for it (its traceback is kept as the cause)."""

    def __init__(self, type_name: str, message: str, *, status_code: int | None = None,
                 response: object = None) -> None:
        self.type_name = type_name
        """The qualified name of the exception's type."""
        self.status_code = status_code
        """The exception's HTTP status, when it had one (an LLM step's 429 snoozes)."""
        self.response = response
        super().__init__(f"{type_name}: {message}" if message else type_name)


class StepNameWarning(UserWarning):
    """A step's name will not match between the process that enqueues and the workers."""
