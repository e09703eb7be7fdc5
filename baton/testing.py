"""Helpers for testing code that uses baton, against a real PostgreSQL.

``perform_job`` runs a job the way a worker would (arguments through a JSON round trip),
``drain_queue`` runs what is available in-process, ``wait_for_job`` waits for a state,
``wait_for_tick`` for a periodic job's next tick,
and ``running_worker`` runs a real worker for the length of a block.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

import anyio
from psycopg.rows import dict_row

from baton.app import Baton
from baton.job import Job, JobSpec, JobState, encode_json
from baton.periodic import ScheduleInfo
from baton.worker import Worker, WorkerSettings
from baton.worker.executor import Executor, FetchedJob, Outcome
from baton.workflows import WorkflowInfo

T = TypeVar("T")

FAST_SETTINGS: dict[str, Any] = {
    "poll_interval": 0.2,
    "debounce": 0.0,
    "heartbeat_interval": 0.1,
    "heartbeat_ttl": 1.0,
    "maintenance_interval": 0.05,
    "leader_ttl": 1.0,
    "shutdown_grace": 2.0,
    "flush_interval": 0.001,
}
"""Worker settings for tests: short intervals so that state changes show up quickly."""


@asynccontextmanager
async def running_worker(app: Baton, **settings: Any) -> AsyncIterator[Worker]:
    """Run a worker for ``app`` during the block, with :data:`FAST_SETTINGS` by default.

    An error raised in the block stops the worker as the block's end would, then comes out
    as itself (a failed assertion, a ``TimeoutError``), not inside an exception group.
    """
    async with Worker(app, WorkerSettings(**{**FAST_SETTINGS, **settings})) as worker:
        yield worker


async def _poll(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float,
    interval: float, describe: Callable[[T], str],
) -> T:
    """Read until ``done`` holds; raise ``TimeoutError`` (saying why) after ``timeout``."""
    value = await read()
    with anyio.move_on_after(timeout):
        while not done(value):
            await anyio.sleep(interval)
            value = await read()
        return value
    raise TimeoutError(f"{describe(value)} after {timeout}s")


async def wait_for_job(
    app: Baton,
    job_id: int,
    states: JobState | str | Iterable[JobState | str],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
) -> Job:
    """Return the job once it is in one of ``states``.

    :raises TimeoutError: if it is not there within ``timeout`` seconds (the message says
        which state it is in instead).
    """
    wanted = {JobState(states)} if isinstance(states, str) else {JobState(s) for s in states}
    return await _poll(
        lambda: app.get_job(job_id), lambda job: job.state in wanted, timeout, interval,
        lambda job: f"job {job_id} is {job.state.value}, not "
                    f"{sorted(s.value for s in wanted)},",
    )


async def wait_for_jobs(
    app: Baton, job_ids: Iterable[int], states: Iterable[JobState | str], *,
    timeout: float = 30.0,
) -> list[Job]:
    """Wait for every job in ``job_ids`` to reach one of ``states``; return them."""
    wanted = [JobState(s) for s in states]
    with anyio.fail_after(timeout):
        return [await wait_for_job(app, job_id, wanted, timeout=timeout) for job_id in job_ids]


async def wait_for_workflow(
    app: Baton, workflow_id: uuid.UUID, *, timeout: float = 30.0, interval: float = 0.01
) -> WorkflowInfo:
    """Return the workflow once it finished (completed or failed).

    :raises TimeoutError: if it is still running after ``timeout`` seconds.
    """
    return await _poll(
        lambda: app.get_workflow(workflow_id), lambda info: info.state != "running", timeout,
        interval, lambda info: f"workflow {workflow_id} still running "
                               f"({info.settled_steps} of {info.total_steps} steps settled)",
    )


async def wait_for_tick(
    app: Baton, schedule: str, *, after: datetime | None = None, timeout: float = 10.0,
    interval: float = 0.01,
) -> Job:
    """Return the job of a schedule's latest tick, once it has a tick later than ``after``
    (any tick when None). A worker must run meanwhile (``running_worker``): its leader
    enqueues the ticks.

    :raises TimeoutError: if there is no such tick within ``timeout`` seconds.
    """

    async def read() -> ScheduleInfo | None:
        return next((s for s in await app.query.schedules() if s.name == schedule), None)

    def ticked(info: ScheduleInfo | None) -> bool:
        return (info is not None and info.last_tick is not None
                and (after is None or info.last_tick > after))

    def why(info: ScheduleInfo | None) -> str:
        if info is None:
            return f"no schedule named {schedule!r} was defined (is a worker running?)"
        return f"schedule {schedule!r} had no tick after {after or info.defined_at}"

    info = await _poll(read, ticked, timeout, interval, why)
    assert info is not None and info.last_job_id is not None
    return await app.get_job(info.last_job_id)


async def perform_job(app: Baton, job: JobSpec, *, attempt: int = 1) -> Outcome:
    """Run ``job`` in-process without the queue and return its outcome.

    Arguments go through a JSON round trip as in production; nothing is written.
    """
    fetched = FetchedJob(
        id=0,
        step=job.step,
        args=json.loads(job.args_json),
        meta=dict(job.meta),
        queue=job.queue,
        attempt=attempt,
        max_attempts=job.max_attempts,
        snoozes=0,
        priority=job.priority,
        timeout=job.timeout,
        workflow_id=None,
        workflow_step=None,
    )
    return await Executor(app, anyio.CapacityLimiter(1)).run(fetched)


async def drain_queue(app: Baton, queue: str = "default", *, timeout: float = 60.0) -> None:
    """Run a worker until ``queue`` has no available or executing jobs.

    :raises TimeoutError: if it still has some after ``timeout`` seconds (a job of a step
        ``app`` does not register stays available).
    """
    busy = 0
    async with running_worker(app, queues={queue: 10}) as worker:
        with anyio.move_on_after(timeout) as waited:
            while True:
                async with app.connection() as conn:
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(app.sql["queue_busy_count"], {"queue": queue})
                    row = await cur.fetchone()
                busy = 0 if row is None else int(row["busy"])
                if busy == 0:
                    break
                with anyio.move_on_after(0.05):
                    await worker.completer.wait_written()
    if waited.cancelled_caught:
        raise TimeoutError(f"queue {queue!r} still had {busy} jobs available or executing "
                           f"after {timeout}s (is every step they need registered with the "
                           "app?)")


def assert_enqueued(app: Baton, step: str, **args: Any) -> Job:
    """Assert that a job of ``step`` whose args contain ``args`` is waiting; return it."""
    with app.connection_sync() as conn:
        cur = conn.cursor(row_factory=dict_row)
        cur.execute(app.sql["job_find_waiting"], {"step": step, "args": encode_json(args)})
        row = cur.fetchone()
    if row is None:
        raise AssertionError(f"no waiting job of step {step!r} with args {args!r}")
    return app.get_job_sync(int(row["id"]))

