"""Client operations written once, run on async or sync connections.

Each operation is a generator that yields :class:`Stmt` objects and receives each
statement's rows back, then returns its value. :func:`run_async` and :func:`run_sync`
drive it over a psycopg connection, so the async and sync APIs cannot drift apart.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql

from baton.db import Queries, translate_errors
from baton.errors import JobNotFound
from baton.job import NULL, Job, JobSpec, JobState, rows_text

T = TypeVar("T")
Rows = list[tuple[Any, ...]]


@dataclass(frozen=True)
class Stmt:
    """One statement and its parameters.

    ``rows``: whether the operation reads what the statement returns. On a connection in
    pipeline mode a statement whose rows are not read is sent without waiting for it, so
    several travel in one round trip (its errors still abort the transaction).
    ``commit``: commit the transaction once this statement ran, then read its rows; the
    operation yields nothing after it. In pipeline mode the COMMIT travels with it.
    """

    query: sql.SQL | sql.Composed
    params: dict[str, Any]
    rows: bool = True
    commit: bool = False


@dataclass(frozen=True)
class Copy:
    """A ``COPY … FROM STDIN`` statement and its text-format data, sent chunk by chunk
    as the chunks are produced."""

    query: sql.SQL | sql.Composed
    chunks: Iterable[str]


Op = Generator[Stmt | Copy, Rows, T]


async def run_async(conn: psycopg.AsyncConnection[Any], op: Op[T], action: str) -> T:
    """Run ``op`` on an async connection (inside whatever transaction it has).

    In pipeline mode (``async with conn.pipeline()``) only statements whose rows the
    operation reads wait for the server; ``op`` must not use COPY there.
    """
    pipelined = conn.pgconn.pipeline_status != pq.PipelineStatus.OFF
    with translate_errors(action):
        try:
            stmt = next(op)
            while True:
                if isinstance(stmt, Copy):
                    async with conn.cursor().copy(stmt.query) as copy:
                        for chunk in stmt.chunks:
                            await copy.write(chunk)
                    stmt = op.send([])
                    continue
                cur = await conn.execute(stmt.query, stmt.params)
                if stmt.commit:
                    await conn.commit()
                if pipelined:
                    stmt = op.send(await cur.fetchall() if stmt.rows else [])
                    continue
                stmt = op.send(await cur.fetchall() if cur.description is not None else [])
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def run_sync(conn: psycopg.Connection[Any], op: Op[T], action: str) -> T:
    """Run ``op`` on a sync connection (inside whatever transaction it has)."""
    with translate_errors(action):
        try:
            stmt = next(op)
            while True:
                if isinstance(stmt, Copy):
                    with conn.cursor().copy(stmt.query) as copy:
                        for chunk in stmt.chunks:
                            copy.write(chunk)
                    stmt = op.send([])
                    continue
                cur = conn.execute(stmt.query, stmt.params)
                if stmt.commit:
                    conn.commit()
                stmt = op.send(cur.fetchall() if cur.description is not None else [])
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


COPY_FROM = 32
"""Batches of at least this many jobs are inserted with COPY: three round trips instead of
one, but far less server work per row than ``INSERT … SELECT`` from JSON."""


def insert_jobs(
    q: Queries,
    jobs: Sequence[JobSpec],
    *,
    states: Sequence[JobState] | None = None,
    workflow_id: uuid.UUID | None = None,
    workflow_steps: Sequence[str] | None = None,
) -> Op[list[int]]:
    """Insert ``jobs`` and wake the queues that got available work; return ids in order.

    ``states`` defaults to available for every job (a job scheduled in the future starts
    scheduled); workflow steps pass their states, workflow and step names.
    The insert is one statement either way, so it is atomic even in autocommit.
    """
    if not jobs:
        return []
    if len(jobs) == 1 and states is None and workflow_id is None:
        params = jobs[0].row_params()
        params["channel"] = q.channel("insert")
        inserted = yield Stmt(q["job_insert"], params)
        return [inserted[0][0]]
    states = states or [JobState.AVAILABLE] * len(jobs)
    steps: Sequence[str | None] = workflow_steps or [None] * len(jobs)
    if len(jobs) < COPY_FROM:
        rows = [job.row_json(state=state, workflow_id=workflow_id, workflow_step=step)
                for job, state, step in zip(jobs, states, steps, strict=True)]
        result = yield Stmt(q["jobs_insert"], {"rows": rows_text(rows),
                                               "channel": q.channel("insert")})
        return list(result[0][0])
    reserved = yield Stmt(q["jobs_reserve_ids"], {"n": len(jobs)})
    now, first, scattered = reserved[0]
    ids = list(range(first, first + len(jobs))) if scattered is None else scattered
    final, woken = [], set()
    for job, state in zip(jobs, states, strict=True):
        if state is JobState.AVAILABLE:
            if job.scheduled_at is not None and job.scheduled_at > now:
                state = JobState.SCHEDULED
            else:
                woken.add(job.queue)
        final.append(state)
    wf = NULL if workflow_id is None else str(workflow_id)
    yield Copy(q["jobs_copy"], _copy_chunks(ids, jobs, final, now.isoformat(), wf, steps))
    yield from notify_queues(q, list(woken))
    return ids


COPY_CHUNK = 250
"""Lines per COPY write: the server inserts one chunk while the next is formatted."""


def _copy_chunks(
    ids: Sequence[int], jobs: Sequence[JobSpec], states: Sequence[JobState], now_text: str,
    workflow_id: str, steps: Sequence[str | None],
) -> Iterator[str]:
    for start in range(0, len(jobs), COPY_CHUNK):
        end = start + COPY_CHUNK
        yield "".join([
            job.copy_row(job_id, state, now_text, workflow_id, step)
            for job_id, job, state, step in zip(
                ids[start:end], jobs[start:end], states[start:end], steps[start:end],
                strict=True)
        ])


def enqueue(q: Queries, jobs: Sequence[JobSpec]) -> Op[list[int]]:
    """Insert ``jobs`` (available or scheduled); return their ids."""
    return (yield from insert_jobs(q, jobs))


def get_job(q: Queries, job_id: int) -> Op[Job]:
    """Return the job row with ``job_id``."""
    rows = yield Stmt(q["job_get"], {"id": job_id})
    if not rows:
        raise JobNotFound(job_id)
    return Job.model_validate(dict(zip(JOB_COLUMNS, rows[0], strict=True)))


JOB_COLUMNS = tuple(Job.model_fields)


def cancel(q: Queries, job_id: int) -> Op[bool]:
    """Cancel a job that has not finished; tell its worker if it is running.

    Returns ``False`` when the job had already finished.
    """
    rows = yield Stmt(q["job_cancel"], {"id": job_id})
    if not rows:
        yield from get_job(q, job_id)  # raises JobNotFound for an unknown id
        return False
    previous, attempted_by = rows[0]
    if previous == JobState.EXECUTING and attempted_by:
        payload = json.dumps({"action": "cancel", "job_id": job_id, "worker": attempted_by})
        yield Stmt(q["control_notify"], {"channel": q.channel("control"), "payload": payload})
    return True


def retry(q: Queries, job_id: int) -> Op[bool]:
    """Make a job that is not running available again; ``False`` if it is running."""
    rows = yield Stmt(q["job_retry"], {"id": job_id})
    if not rows:
        yield from get_job(q, job_id)
        return False
    yield from notify_queues(q, [rows[0][1]])
    return True


def notify_queues(q: Queries, queues: Sequence[str]) -> Op[None]:
    """Wake the workers of ``queues``."""
    if queues:
        yield Stmt(
            q["queues_notify"], {"channel": q.channel("insert"), "queues": sorted(set(queues))}
        )
