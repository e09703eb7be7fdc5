"""The executor: runs one fetched job and turns what happened into an :class:`Outcome`."""

from __future__ import annotations

import functools
import json
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from baton.backoff import backoff_seconds
from baton.context import Context
from baton.errors import ArgsError, UnknownStepError
from baton.job import JobState
from baton.logs import get_logger
from baton.pricing import Usage, split_usage
from baton.signals import Cancel, Discard, Signal, Snooze
from baton.worker import processes

if TYPE_CHECKING:
    from baton.app import Baton
    from baton.step import Step

log = get_logger("baton.job")


@dataclass(slots=True)
class FetchedJob:
    """The columns of a claimed job that running it needs."""

    id: int
    step: str
    args: dict[str, Any]
    meta: dict[str, Any] | None
    queue: str
    attempt: int
    max_attempts: int
    snoozes: int
    priority: int
    timeout: float | None
    workflow_id: uuid.UUID | None
    workflow_step: str | None
    scheduled_at: datetime | None = None
    """Its place in the fetch order with ``priority`` and ``id``: the plain claim returns it
    (the producer's next claim starts after the last key); the limited claim does not."""
    gate: Any = None
    """What the engine loaded for it when it was claimed (a workflow step's gate row)."""
    gated: bool = False
    """Whether the claim loaded it (a failed load leaves the step to be deferred)."""


@dataclass(slots=True)
class Outcome:
    """How one attempt ended, as the completer writes it."""

    job: FetchedJob
    state: JobState
    delay: float | None = None
    error: dict[str, Any] | None = None
    snooze: bool = False
    result: Any = None
    has_result: bool = False
    duration: float = 0.0
    usage: list[Usage] = field(default_factory=list)
    captures: list[dict[str, Any]] = field(default_factory=list)
    step_name: str = ""

    def as_row(self) -> dict[str, Any]:
        """Return the JSON row for the batched finish statement."""
        return {
            "id": self.job.id,
            "state": self.state.value,
            "delay": self.delay,
            "error": self.error,
            "snooze": self.snooze,
        }

    @property
    def plain(self) -> bool:
        """Whether the attempt completed with nothing else to write (no delay, error or
        snooze): the finish statement takes its id alone."""
        return self.state is JobState.COMPLETED and self._bare

    @property
    def _bare(self) -> bool:
        """Whether the outcome carries nothing but its state (no delay, error or snooze)."""
        return self.delay is None and self.error is None and not self.snooze

    def row_json(self) -> str:
        """Return :meth:`as_row` as JSON text (a plain completion, :attr:`plain`, needs
        none: the finish takes its id alone). Another outcome with no delay, error or
        snooze, a cancel say, is formatted directly, its absent keys read as NULL."""
        if self._bare:
            return f'{{"id":{self.job.id},"state":"{self.state.value}"}}'
        return json.dumps(self.as_row(), default=str, allow_nan=False)


def error_entry(job: FetchedJob, exc: BaseException, *, kind: str) -> dict[str, Any]:
    """Return the record of a failed attempt kept in the job's ``errors``."""
    return {
        "attempt": job.attempt,
        "at": datetime.now(UTC).isoformat(),
        "kind": kind,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
    }


class Executor:
    """Runs jobs for one worker process."""

    def __init__(self, app: Baton, limiter: anyio.CapacityLimiter) -> None:
        self.app = app
        self.limiter = limiter
        self.in_threads: dict[int, str] = {}
        """Jobs whose plain def step runs in a thread now, with the step's name."""

    def context(self, job: FetchedJob, step: Step) -> Context:
        """Build the context a step sees."""
        return Context(
            job_id=job.id,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            queue=job.queue,
            step=job.workflow_step or step.name,
            args=job.args,
            meta=job.meta or {},
            snoozes=job.snoozes,
            workflow_id=job.workflow_id,
            capture_enabled=self.app.capture or step.options.capture,
        )

    async def call(self, step: Step, kwargs: dict[str, Any], job: FetchedJob | None = None
                   ) -> Any:
        """Call the step function: awaited if async, else in a worker thread.

        A thread cannot be stopped: a timeout or cancel that comes while it runs takes
        effect when it returns, and until then the job keeps its slot, so no other attempt
        of it can start while this one still runs.
        """
        if step.options.executor == "process":  # a child process it can kill
            return await processes.call(self, step, kwargs)
        if step.is_async:
            return await step.fn(**kwargs)
        key = job.id if job is not None else id(kwargs)
        self.in_threads[key] = step.name
        try:
            result = await anyio.to_thread.run_sync(
                functools.partial(step.fn, **kwargs), abandon_on_cancel=False,
                limiter=self.limiter)
        finally:
            del self.in_threads[key]
        await anyio.lowlevel.checkpoint()  # a timeout or cancel that came meanwhile
        return result

    async def run(self, job: FetchedJob, ctx: Context | None = None) -> Outcome:
        """Run ``job`` to an outcome. Cancellation from outside propagates untouched."""
        started = time.monotonic()
        step: Step | None = None
        reported: list[Usage] = []
        try:
            step = self.app.get_step(job.step)
            kwargs = step.load_args(job.args)
            # A step that takes no context gets none built: nothing else reads it, and
            # building it was over a third of this call for a no-op job (3.3 -> 2.0 us).
            if ctx is None and step.ctx_param is not None:
                ctx = self.context(job, step)
            if ctx is not None:
                kwargs = step.bind(kwargs, ctx)
            timeout = job.timeout
            if timeout:
                with anyio.fail_after(timeout):
                    result = await self.call(step, kwargs, job)
            else:
                result = await self.call(step, kwargs, job)
            if isinstance(result, Signal):
                raise result
            result, reported = split_usage(result)
            outcome = Outcome(job, JobState.COMPLETED, result=result,
                              has_result=result is not None)
            if timeout and time.monotonic() - started > timeout + OVERRUN_TOLERANCE:
                # It blocked the event loop past its timeout: nothing could interrupt it.
                outcome.error = _overrun(job, step, timeout, time.monotonic() - started)
        except (UnknownStepError, ArgsError) as exc:
            outcome = Outcome(job, JobState.DISCARDED, error=error_entry(job, exc, kind="invalid"))
        except Snooze as exc:
            state = JobState.SCHEDULED if exc.seconds > 0 else JobState.AVAILABLE
            outcome = Outcome(job, state, delay=exc.seconds, snooze=True)
        except Cancel as exc:
            outcome = Outcome(job, JobState.CANCELLED, error=error_entry(job, exc, kind="cancel"))
        except Discard as exc:
            outcome = Outcome(job, JobState.DISCARDED, error=error_entry(job, exc, kind="discard"))
        except TimeoutError as exc:
            outcome = self.failed(job, exc, kind="timeout")
            elapsed = time.monotonic() - started
            # A child process is killed on time; a thread cannot be, nor a blocked loop.
            if (step is not None and timeout and elapsed > timeout + OVERRUN_TOLERANCE
                    and step.options.executor != "process"):
                note = _overrun(job, step, timeout, elapsed)
                assert outcome.error is not None
                outcome.error.update(enforced=False, error=f"TimeoutError: {note['error']}")
        except Exception as exc:
            retry_after = _rate_limited(exc) if step is not None and step.options.llm else None
            if retry_after is not None:
                outcome = Outcome(job, JobState.SCHEDULED, delay=retry_after, snooze=True)
            else:
                outcome = self.failed(job, exc, kind="error")
        outcome.duration = time.monotonic() - started
        if ctx is not None:
            ctx.usage.extend(reported)
            outcome.usage = ctx.usage
            outcome.captures = [{**c, "context": ctx.results or None} for c in ctx.captures]
            outcome.step_name = ctx.step
        elif step is not None:
            outcome.usage = reported
            outcome.step_name = job.workflow_step or step.name
        return outcome

    def failed(self, job: FetchedJob, exc: BaseException, *, kind: str) -> Outcome:
        """Return a retry with backoff, or a discard once attempts are used up."""
        entry = error_entry(job, exc, kind=kind)
        if job.attempt >= job.max_attempts:
            return Outcome(job, JobState.DISCARDED, error=entry)
        step = self.app.steps.get(job.step)
        backoff = step.options.backoff if step is not None else None
        delay = backoff(job.attempt) if backoff is not None else backoff_seconds(job.attempt)
        return Outcome(job, JobState.RETRYABLE, delay=max(0.0, delay), error=entry)


OVERRUN_TOLERANCE = 0.5
"""Seconds past its timeout that a step may end in before the timeout counts as not
enforced (the loop's own latency)."""


def _overrun(job: FetchedJob, step: Step, timeout: float, elapsed: float) -> dict[str, Any]:
    """Record (and log) a timeout that could not be enforced on time."""
    how = ("it ran in a thread, which cannot be stopped, so its slot was held until it "
           "returned" if not step.is_async else
           "it blocked the event loop, so nothing could interrupt it")
    text = (f"(timeout not enforced: the step ran {elapsed:.1f} s against a timeout of "
            f"{timeout:g} s; {how})")
    log.warning("job.timeout_not_enforced", job_id=job.id, queue=job.queue, step=job.step,
                attempt=job.attempt, timeout=timeout, elapsed=round(elapsed, 3),
                runs_in="thread" if not step.is_async else "event loop")
    return {"attempt": job.attempt, "at": datetime.now(UTC).isoformat(),
            "kind": "timeout_not_enforced", "error": text, "enforced": False}


def _rate_limited(exc: BaseException, default: float = 5.0) -> float | None:
    """Return seconds to wait if ``exc`` is a provider's HTTP 429, else ``None``.

    Recognizes exceptions with ``status_code`` or ``response.status_code`` of 429 (httpx,
    the OpenAI and Anthropic clients) and honours a ``Retry-After`` header in seconds.
    """
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    if status != 429:
        return None
    headers = getattr(response, "headers", None) or {}
    try:
        return max(0.0, float(headers.get("retry-after", default)))
    except (TypeError, ValueError):
        return default
