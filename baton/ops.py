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
from datetime import datetime
from itertools import islice
from operator import attrgetter
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.copy import AsyncLibpqWriter, LibpqWriter
from psycopg.rows import BaseRowFactory, class_row, dict_row, tuple_row

from baton.db import Queries, translate_errors
from baton.errors import JobNotFound, OptionsError
from baton.job import NULL, Job, JobSpec, JobState, copy_columns, rows_text
from baton.step import JobBatch
from baton.unique import JobId, JobIds, job_id, job_key

T = TypeVar("T")
Rows = list[Any]
"""A statement's rows, each made by the statement's row factory."""


@dataclass(frozen=True)
class Stmt:
    """One statement and its parameters.

    ``rows``: whether the operation reads what the statement returns. On a connection in
    pipeline mode a statement whose rows are not read is sent without waiting for it, so
    several travel in one round trip (its errors still abort the transaction).
    ``commit``: commit the transaction once this statement ran, then read its rows; the
    operation yields nothing after it. In pipeline mode the COMMIT travels with it.
    ``row_factory``: how its rows are made (``dict_row``, ``class_row(Model)``: read by
    column name, so a column added to a table breaks nothing). The statement runs on a
    cursor of its own with it, whatever the row factory of the caller's connection.
    """

    query: sql.SQL | sql.Composed
    params: dict[str, Any]
    rows: bool = True
    commit: bool = False
    row_factory: BaseRowFactory[Any] = tuple_row


@dataclass(frozen=True)
class Copy:
    """A ``COPY … FROM STDIN`` statement and its text-format data, sent chunk by chunk
    as the chunks are produced (each one flushed to the server at once, so the server
    inserts it while the next is made; by default psycopg holds up to 1 MB back)."""

    query: sql.SQL | sql.Composed
    chunks: Iterable[str]


Op = Generator[Stmt | Copy, Rows, T]


def statements(op: Op[Any]) -> list[Stmt]:
    """The statements of an operation that reads no rows, to send as they are."""
    stmts: list[Stmt] = []
    try:
        stmt = next(op)
        while True:
            assert isinstance(stmt, Stmt) and not stmt.rows, "an operation that reads rows"
            stmts.append(stmt)
            stmt = op.send([])
    except StopIteration:
        return stmts


async def run_async(conn: psycopg.AsyncConnection[Any], op: Op[T], action: str) -> T:
    """Run ``op`` on an async connection (inside whatever transaction it has).

    In pipeline mode (``async with conn.pipeline()``) only statements whose rows the
    operation reads wait for the server; ``op`` must not use COPY there. Out of it, a
    statement that opens a transaction travels with its ``BEGIN`` and one that commits
    with its ``COMMIT``.
    """
    pipelined = conn.pgconn.pipeline_status != pq.PipelineStatus.OFF
    with translate_errors(action):
        try:
            stmt = next(op)
            while True:
                if isinstance(stmt, Copy):
                    copy_cur = conn.cursor(row_factory=tuple_row)
                    writer = AsyncLibpqWriter(copy_cur, flush_threshold=0)
                    async with copy_cur.copy(stmt.query, writer=writer) as copy:
                        for chunk in stmt.chunks:
                            await copy.write(chunk)
                    stmt = op.send([])
                    continue
                # Never the connection's own row factory: the caller chose that one.
                cur = conn.cursor(row_factory=stmt.row_factory)
                if pipelined:
                    await cur.execute(stmt.query, stmt.params)
                    if stmt.commit:
                        await conn.commit()
                    stmt = op.send(await cur.fetchall() if stmt.rows else [])
                    continue
                if stmt.commit or _opens_transaction(conn):
                    async with conn.pipeline():
                        await cur.execute(stmt.query, stmt.params)
                        if stmt.commit:
                            await conn.commit()
                else:
                    await cur.execute(stmt.query, stmt.params)
                stmt = op.send(await cur.fetchall() if cur.description is not None else [])
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def run_sync(conn: psycopg.Connection[Any], op: Op[T], action: str) -> T:
    """Run ``op`` on a sync connection (inside whatever transaction it has), as
    :func:`run_async` does."""
    with translate_errors(action):
        try:
            stmt = next(op)
            while True:
                if isinstance(stmt, Copy):
                    copy_cur = conn.cursor(row_factory=tuple_row)
                    with copy_cur.copy(stmt.query,
                                       writer=LibpqWriter(copy_cur, flush_threshold=0)) as copy:
                        for chunk in stmt.chunks:
                            copy.write(chunk)
                    stmt = op.send([])
                    continue
                cur = conn.cursor(row_factory=stmt.row_factory)
                if stmt.commit or _opens_transaction(conn):
                    with conn.pipeline():
                        cur.execute(stmt.query, stmt.params)
                        if stmt.commit:
                            conn.commit()
                else:
                    cur.execute(stmt.query, stmt.params)
                stmt = op.send(cur.fetchall() if cur.description is not None else [])
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _opens_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether the next statement on ``conn`` makes psycopg send ``BEGIN`` first."""
    return not conn.autocommit and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE


COPY_FROM = 32
"""Batches of at least this many jobs are inserted with COPY: four round trips instead of
one, but far less server work per row than ``INSERT … SELECT`` from JSON."""


def insert_jobs(
    q: Queries,
    jobs: Sequence[JobSpec],
    *,
    states: Sequence[JobState] | None = None,
    workflow_id: uuid.UUID | None = None,
    workflow_steps: Sequence[str] | None = None,
    commit: bool = False,
    idempotency_key: str | None = None,
) -> Op[list[int]]:
    """Insert ``jobs`` and wake the queues that got available work; return ids in order.

    ``states`` defaults to available for every job (a job scheduled in the future starts
    scheduled); workflow steps pass their states, workflow and step names.
    Fewer than :data:`COPY_FROM` jobs are one statement, atomic even in autocommit. More
    are a COPY between two statements that must share its transaction (they find the ids
    it drew); ``commit`` ends that transaction with the last of them.
    ``idempotency_key``: for one job; see :func:`insert_keyed`.
    """
    if not jobs:
        return []
    if states is None and workflow_id is None and has_unique(jobs):
        if idempotency_key is not None:
            raise OptionsError("idempotency_key", "a unique job takes no idempotency key: "
                               "its unique key already finds the job a retry inserted")
        return (yield from insert_unique(q, jobs, commit=commit))
    if len(jobs) == 1 and states is None and workflow_id is None:
        params = jobs[0].row_params()
        params["channel"] = q.channel("insert")
        if idempotency_key is not None:
            return [(yield from insert_keyed(q, params, idempotency_key))]
        inserted = yield Stmt(q["job_insert"], params)
        return [inserted[0][0]]
    batch = jobs if isinstance(jobs, JobBatch) and states is None and workflow_id is None else None
    states = states or [JobState.AVAILABLE] * len(jobs)
    steps: Sequence[str | None] = workflow_steps or [None] * len(jobs)
    if len(jobs) < COPY_FROM:
        rows = [job.row_json(state=state, workflow_id=workflow_id, workflow_step=step)
                for job, state, step in zip(jobs, states, steps, strict=True)]
        result = yield Stmt(q["jobs_insert"], {"rows": rows_text(rows),
                                               "channel": q.channel("insert")})
        return list(result[0][0])
    started = yield Stmt(q["jobs_copy_start"], {})
    now, before = started[0]
    # Without a scheduled_at in the batch, the column is left to its default: now().
    at_given = (batch.spec.scheduled_at is not None if batch is not None
                else any(job.scheduled_at is not None for job in jobs))
    woken: set[str] = set()
    now_text = now.isoformat() if at_given else None
    if batch is not None:  # jobs that differ only in their args
        spec = batch.spec
        columns, head = spec.copy_head(
            _entry_state(spec, JobState.AVAILABLE, now, woken), now_text)
        copy = Copy(_copy_into(q, columns), _chunked(batch.copy_lines(head)))
    else:
        wf = NULL if workflow_id is None else str(workflow_id)
        lines = _copy_lines(zip(jobs, states, steps, strict=True), now, now_text, wf, woken)
        copy = Copy(_copy_into(q, copy_columns(scheduled=at_given)), _chunked(lines))
    yield copy
    copied = yield Stmt(q["jobs_copied"], {
        "n": len(jobs), "before": before, "channel": q.channel("insert"),
        "queues": sorted(woken),
    }, commit=commit)
    first, scattered, _ = copied[0]
    if scattered is None:
        return list(range(first, first + len(jobs)))
    if len(scattered) != len(jobs):  # the COPY inserted every row or none: never
        raise RuntimeError(f"COPY of {len(jobs)} jobs found {len(scattered)} of its rows")
    return list(scattered)


COPY_CHUNK = 64
"""Lines per COPY write: the server inserts one chunk while the next is formatted."""


def _copy_lines(
    rows: Iterator[tuple[JobSpec, JobState, str | None]], now: datetime, now_text: str | None,
    workflow_id: str, woken: set[str],
) -> Iterator[str]:
    """Format ``rows`` (job, state, workflow step) as lines of COPY text."""
    for job, state, step in rows:
        yield job.copy_row(_entry_state(job, state, now, woken), now_text, workflow_id, step)


def _copy_into(q: Queries, columns: list[str]) -> sql.Composed:
    """``COPY … FROM STDIN`` into ``columns`` of the jobs table (ids from the sequence)."""
    return sql.SQL("COPY {}.jobs ({}) FROM STDIN").format(
        sql.Identifier(q.schema), sql.SQL(", ").join(map(sql.Identifier, columns)))


def _entry_state(job: JobSpec, state: JobState, now: datetime, woken: set[str]) -> JobState:
    """The state ``job`` goes in with: an available job scheduled after ``now`` goes in
    scheduled; the queue of one that stays available is added to ``woken``."""
    if state is JobState.AVAILABLE:
        if job.scheduled_at is not None and job.scheduled_at > now:
            return JobState.SCHEDULED
        woken.add(job.queue)
    return state


def _chunked(lines: Iterator[str]) -> Iterator[str]:
    """Join ``lines`` into chunks of :data:`COPY_CHUNK`. The jobs are read only here, as
    the chunks are sent (a :class:`~baton.step.JobBatch` validates each as it is read)."""
    while chunk := list(islice(lines, COPY_CHUNK)):
        yield "".join(chunk)


MAX_KEY_LENGTH = 255
"""The longest idempotency key, in characters."""


def insert_keyed(q: Queries, params: dict[str, Any], key: str) -> Op[int]:
    """Insert one job (``params`` of ``job_insert``) under an idempotency key, or return the
    id of the job that has the key already (a unique index decides; nothing is inserted).

    :raises OptionsError: unless the key is a string of 1 to 255 characters.
    """
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise OptionsError("idempotency_key", f"expected a string of 1 to {MAX_KEY_LENGTH} "
                           f"characters, got {key!r:.80}")
    params["idempotency_key"] = key
    rows = yield Stmt(q["job_insert_keyed"], params)
    while not rows:
        # The job with the key committed after the insert began (the insert waited for it,
        # then saw it conflict): a new statement sees it, unless it was deleted meanwhile.
        rows = yield Stmt(q["job_get_by_key"], {"idempotency_key": key})
        if not rows:
            rows = yield Stmt(q["job_insert_keyed"], params)
    job_id: int = rows[0][0]
    return job_id


def enqueue(q: Queries, jobs: Sequence[JobSpec], *, commit: bool = False,
            idempotency_key: str | None = None) -> Op[JobIds]:
    """Insert ``jobs`` (available or scheduled); return their ids (see :func:`insert_jobs`
    for ``commit`` and ``idempotency_key``)."""
    ids = yield from insert_jobs(q, jobs, commit=commit, idempotency_key=idempotency_key)
    return ids if isinstance(ids, JobIds) else JobIds(ids)


def enqueue_one(q: Queries, job: JobSpec, *, idempotency_key: str | None = None
                ) -> Op[JobId]:
    """Insert one job; return its id, or that of the job holding its unique key (flagged
    ``duplicate``)."""
    ids = yield from insert_jobs(q, [job], idempotency_key=idempotency_key)
    return job_id(ids[0], isinstance(ids, JobIds) and bool(ids.duplicates))


# -- unique jobs (baton.unique) ------------------------------------------------------------

_UNIQUE = attrgetter("unique")


def has_unique(jobs: Sequence[JobSpec]) -> bool:
    """Whether any of ``jobs`` is unique (for a :class:`JobBatch`: its options)."""
    if isinstance(jobs, JobBatch):
        return jobs.spec.unique is not None
    # A scan at C speed: about 0.1 µs a job of a plain list on the loaded 2-core machine,
    # under 1 % of its enqueue; a JobBatch (the benchmarks' enqueue_batch) pays nothing.
    return any(map(_UNIQUE, jobs))


def one_statement(jobs: Sequence[JobSpec]) -> bool:
    """Whether ``enqueue_many`` inserts ``jobs`` with one statement, atomic in autocommit
    (unique jobs may need a second one: see :func:`insert_unique`)."""
    return len(jobs) < COPY_FROM and not has_unique(jobs)


def insert_unique(q: Queries, jobs: Sequence[JobSpec], *, commit: bool = False,
                  now: datetime | None = None) -> Op[JobIds]:
    """Insert ``jobs``, some unique, except those whose key a job already holds; return
    the ids in order (for those, the holder's) and the positions of those in
    ``duplicates``.

    The unique jobs go in with ``INSERT … ON CONFLICT DO NOTHING`` on the key's unique
    index, so inserts racing on several connections make one job. Below :data:`COPY_FROM`
    jobs, the plain ones go in the same statement (they never conflict); from there on,
    with COPY after it, in the same transaction. ``now`` stands for the server's clock in
    a key's period (tests).
    """
    if not isinstance(jobs, list):
        jobs = list(jobs)  # a JobBatch: every job is needed before the statement
    plain = [i for i, job in enumerate(jobs) if job.unique is None]
    if len(jobs) < COPY_FROM or not plain:
        return (yield from _insert_unique_rows(q, jobs, now))
    unique_at = [i for i, job in enumerate(jobs) if job.unique is not None]
    found = yield from _insert_unique_rows(q, [jobs[i] for i in unique_at], now)
    copied = yield from insert_jobs(q, [jobs[i] for i in plain], commit=commit)
    ids = JobIds([0] * len(jobs))
    for position, value in zip(plain, copied, strict=True):
        ids[position] = value
    for position, value in zip(unique_at, found, strict=True):
        ids[position] = value
    ids.duplicates = tuple(unique_at[i] for i in found.duplicates)
    return ids


def _unique_row(job: JobSpec) -> str:
    """The job's line for ``jobs_insert_unique``: :meth:`JobSpec.row_json` with its key."""
    row = job.row_json()
    if job.unique is None:
        return row
    key = job_key(job.unique, job.step, job.queue, job.args)
    return f'{row[:-1]},"unique_key":"{key}",{job.unique.row_fields}}}'


def _insert_unique_rows(q: Queries, jobs: Sequence[JobSpec], now: datetime | None
                        ) -> Op[JobIds]:
    rows = [_unique_row(job) for job in jobs]
    ids = JobIds([0] * len(jobs))
    duplicates: list[int] = []
    todo = list(range(len(jobs)))
    while todo:
        got = yield Stmt(q["jobs_insert_unique"], {
            "rows": rows_text([rows[i] for i in todo]), "channel": q.channel("insert"),
            "now": now})
        unresolved: dict[str, list[int]] = {}
        for ordinal, key, found, duplicate, _ in got:
            position = todo[ordinal - 1]
            if found is None:
                unresolved.setdefault(key, []).append(position)
                continue
            ids[position] = found
            if duplicate:
                duplicates.append(position)
        if not unresolved:
            break
        # Their holder committed while the insert waited for it: a new statement sees it,
        # unless it left its states meanwhile (then the jobs are inserted again).
        held = yield Stmt(q["jobs_get_by_unique_key"], {"keys": list(unresolved)})
        for key, found in held:
            for position in unresolved.pop(key):
                ids[position] = found
                duplicates.append(position)
        todo = sorted(p for positions in unresolved.values() for p in positions)
    ids.duplicates = tuple(sorted(duplicates))
    return ids


_JOB_ROW = class_row(Job)


def get_job(q: Queries, job_id: int) -> Op[Job]:
    """Return the job row with ``job_id``."""
    rows = yield Stmt(q["job_get"], {"id": job_id}, row_factory=_JOB_ROW)
    if not rows:
        raise JobNotFound(job_id)
    job: Job = rows[0]
    return job


def cancel(q: Queries, job_id: int) -> Op[bool]:
    """Cancel a job that has not finished; tell its worker if it is running.

    Returns ``False`` when the job had already finished.
    """
    rows = yield Stmt(q["job_cancel"], {"id": job_id}, row_factory=dict_row)
    if not rows:
        yield from get_job(q, job_id)  # raises JobNotFound for an unknown id
        return False
    attempted_by = rows[0]["attempted_by"]
    if rows[0]["previous_state"] == JobState.EXECUTING and attempted_by:
        payload = json.dumps({"action": "cancel", "job_id": job_id, "worker": attempted_by})
        yield Stmt(q["control_notify"], {"channel": q.channel("control"), "payload": payload})
    return True


def retry(q: Queries, job_id: int) -> Op[bool]:
    """Make a job that is not running available again; ``False`` if it is running."""
    rows = yield Stmt(q["job_retry"], {"id": job_id}, row_factory=dict_row)
    if not rows:
        yield from get_job(q, job_id)
        return False
    yield from notify_queues(q, [rows[0]["queue"]])
    return True


def notify_queues(q: Queries, queues: Sequence[str]) -> Op[None]:
    """Wake the workers of ``queues``."""
    if queues:
        yield Stmt(
            q["queues_notify"], {"channel": q.channel("insert"), "queues": sorted(set(queues))}
        )
