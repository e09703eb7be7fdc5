"""The app the fault scenarios' ``baton worker`` processes run.

Every step body records its attempt in the test's own table, ``faults.attempts``: a
``start`` row committed before the body and an ``end`` row after it (also when the body
fails or is cancelled). Rows are keyed by a run id drawn per call and written with
``ON CONFLICT DO NOTHING``, so a write retried after a lost reply is kept once. The rows
go over the recorder's own connections (``FAULTS_RECORD_DSN``, else the app's URL) named
``faults-recorder``, so faults aimed at baton's connections do not hit them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

import baton

app = baton.Baton()

RECORD_DSN_ENV = "FAULTS_RECORD_DSN"
RECORDER_NAME = "faults-recorder"
_RECORD = """
INSERT INTO faults.attempts (run_id, phase, job_id, attempt, pid, queue, workflow_id, step)
VALUES (%(run_id)s, %(phase)s, %(job_id)s, %(attempt)s, %(pid)s, %(queue)s, %(workflow_id)s,
        %(step)s)
ON CONFLICT DO NOTHING
"""
_TRIES = 60
_pool: AsyncConnectionPool | None = None
T = TypeVar("T")


def _record_dsn() -> str:
    return make_conninfo(os.environ.get(RECORD_DSN_ENV) or app.dsn,
                         application_name=RECORDER_NAME)


def _row(ctx: baton.Context, run_id: uuid.UUID, phase: str) -> dict[str, Any]:
    return {"run_id": run_id, "phase": phase, "job_id": ctx.job_id, "attempt": ctx.attempt,
            "pid": os.getpid(), "queue": ctx.queue, "workflow_id": ctx.workflow_id,
            "step": ctx.step}


def _delay(failures: int) -> float:
    return min(1.0, 0.02 * 2.0 ** min(failures, 6))


async def _record(ctx: baton.Context, run_id: uuid.UUID, phase: str) -> None:
    """Write one attempt row, retrying through restarts and cut connections."""
    global _pool
    if _pool is None:
        _pool = AsyncConnectionPool(_record_dsn(), min_size=1, max_size=8, open=False,
                                    kwargs={"autocommit": True})
    await _pool.open()
    for failures in range(_TRIES):
        try:
            async with _pool.connection() as conn:
                await conn.execute(_RECORD, _row(ctx, run_id, phase))
            return
        except psycopg.OperationalError:
            if failures == _TRIES - 1:
                raise
            await anyio.sleep(_delay(failures))


def _record_sync(ctx: baton.Context, run_id: uuid.UUID, phase: str) -> None:
    for failures in range(_TRIES):
        try:
            with psycopg.connect(_record_dsn(), autocommit=True) as conn:
                conn.execute(_RECORD, _row(ctx, run_id, phase))
            return
        except psycopg.OperationalError:
            if failures == _TRIES - 1:
                raise
            time.sleep(_delay(failures))


async def recorded(ctx: baton.Context, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` between a committed start row and an end row."""
    run_id = uuid.uuid4()
    try:
        await _record(ctx, run_id, "start")
        return await body()
    finally:
        with anyio.CancelScope(shield=True):
            await _record(ctx, run_id, "end")


def recorded_sync(ctx: baton.Context, body: Callable[[], T]) -> T:
    """Run ``body`` (in a worker thread) between a start row and an end row."""
    run_id = uuid.uuid4()
    try:
        _record_sync(ctx, run_id, "start")
        return body()
    finally:
        _record_sync(ctx, run_id, "end")


def _sleep_until_cancelled(job_id: int, most: float) -> None:
    query = f'SELECT state FROM "{app.schema}".jobs WHERE id = %s'
    deadline = time.monotonic() + most
    with psycopg.connect(_record_dsn(), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query, (job_id,)).fetchone()
            if row is None or row[0] == "cancelled":
                return
            time.sleep(0.05)


def soon(attempt: int) -> float:
    """Retry a fifth of a second after a failure: the scenarios' rescue windows are short."""
    return 0.2


# -- the queue's many small jobs ----------------------------------------------------------

@app.step(backoff=soon)
async def tiny(ctx: baton.Context, n: int) -> int:
    """Return ``n``; the recording is all the work."""

    async def body() -> int:
        return n

    return await recorded(ctx, body)


# -- a workflow: source -> three scales -> total (= 6 k) ------------------------------------

FACTORS = (1, 2, 3)


@app.step(backoff=soon)
async def source(ctx: baton.Context, k: int) -> int:
    async def body() -> int:
        return k

    return await recorded(ctx, body)


@app.step(backoff=soon)
async def scale(ctx: baton.Context, factor: int) -> int:
    async def body() -> int:
        return int(ctx.results["source"]) * factor

    return await recorded(ctx, body)


@app.step(backoff=soon)
async def total(ctx: baton.Context) -> int:
    async def body() -> int:
        return sum(int(v) for v in ctx.results.values())

    return await recorded(ctx, body)


def workflow(k: int) -> baton.Workflow:
    """A five-step workflow whose ``total`` must come out as ``6 * k``."""
    wf = baton.Workflow(f"faults:{k}")
    wf.add("source", source.new(k=k))
    for factor in FACTORS:
        wf.add(f"scale{factor}", scale.new(factor=factor), deps=["source"])
    wf.add("total", total.new(), deps=[f"scale{f}" for f in FACTORS])
    return wf


# -- steps that misbehave -----------------------------------------------------------------

@app.step(queue="loop", max_attempts=5, backoff=soon)
async def hog_loop(ctx: baton.Context, seconds: float) -> int:
    """Block the event loop (``time.sleep`` in ``async def``) on the first attempt."""

    async def body() -> int:
        if ctx.attempt == 1:
            time.sleep(seconds)
        return ctx.attempt

    return await recorded(ctx, body)


@app.step(queue="threads", max_attempts=5, timeout=1.0, backoff=soon)
def hog_thread(ctx: baton.Context, seconds: float) -> int:
    """A plain ``def`` that overruns its one-second timeout on the first attempt."""

    def body() -> int:
        if ctx.attempt == 1:
            time.sleep(seconds)
        return ctx.attempt

    return recorded_sync(ctx, body)


@app.step(queue="threads", max_attempts=5, backoff=soon)
def long_thread(ctx: baton.Context, seconds: float, until_cancelled: bool = False) -> int:
    """A plain ``def`` that sleeps (cancelled, or caught by a shutdown) on the first
    attempt and returns at once on later ones. With ``until_cancelled`` it sleeps until its
    job is cancelled (at most ``seconds``), however long the cancel takes to come."""

    def body() -> int:
        if ctx.attempt == 1:
            if until_cancelled:
                _sleep_until_cancelled(ctx.job_id, seconds)
            else:
                time.sleep(seconds)
        return ctx.attempt

    return recorded_sync(ctx, body)


@app.step(queue="threads", backoff=soon)
def quick_thread(ctx: baton.Context, n: int) -> int:
    """A plain ``def`` that returns at once."""
    return recorded_sync(ctx, lambda: n)
