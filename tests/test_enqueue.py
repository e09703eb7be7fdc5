"""Enqueueing: one, many, scheduled, transactional, sync, and bad input."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import baton
from baton.job import COPY_DEFAULTS, NULL, JobSpec, JobState
from baton.ops import COPY_FROM
from tests.apps import basic
from tests.helpers import ROOT, sql_rows


async def test_enqueue_returns_id_and_stores_row(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.echo.new(value={"a": [1, 2]}))
    job = await app.get_job(job_id)
    assert job.state is JobState.AVAILABLE
    assert job.step == "tests.apps.basic.echo"
    assert job.args == {"value": {"a": [1, 2]}}
    assert job.attempt == 0 and job.errors == []


async def test_enqueue_many_keeps_order_in_one_statement(app: baton.Baton) -> None:
    jobs = [basic.echo.new(value=i) for i in range(5000)]
    ids = await app.enqueue_many(jobs)
    assert len(ids) == 5000 and ids == sorted(ids)
    rows = sql_rows(app.dsn, "SELECT id, args->>'value' FROM baton.jobs ORDER BY id")
    assert [int(v) for _, v in rows] == list(range(5000))
    assert await app.enqueue_many([]) == []


AWKWARD = ["tab\there", "line\nbreak", "back\\slash", "\\N", "crlf\r\n", "naïve ✓", "NaN"]


async def test_many_jobs_round_trip_awkward_values(app: baton.Baton) -> None:
    # Every insert path (one job, a few jobs from JSON, COPY for a batch) stores the same rows.
    for size in (1, 3, COPY_FROM + 5):
        await _round_trip_awkward(app, size)


async def _round_trip_awkward(app: baton.Baton, size: int) -> None:
    past, future = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)
    jobs = []
    for i in range(size):
        text = AWKWARD[i % len(AWKWARD)]
        job = basic.echo.new(value={"text": text, "i": i}).options(
            queue=f"q:{i % 2}", meta={"note": text}, timeout=0.25 + i)
        if i % 3 == 1:
            job = job.options(scheduled_at=future)
        elif i % 3 == 2:
            job = job.options(scheduled_at=past, priority=9)
        jobs.append(job)
    ids = await app.enqueue_many(jobs)
    assert len(ids) == size and ids == sorted(ids)
    for i, job_id in enumerate(ids):
        job = await app.get_job(job_id)
        text = AWKWARD[i % len(AWKWARD)]
        assert job.args == {"value": {"text": text, "i": i}}
        assert (job.queue, job.meta, job.timeout) == (f"q:{i % 2}", {"note": text}, 0.25 + i)
        expected = JobState.SCHEDULED if i % 3 == 1 else JobState.AVAILABLE
        assert job.state is expected, (i, job.state)
        if i % 3 == 2:
            assert job.scheduled_at == past and job.priority == 9


async def test_batch_ids_match_rows_when_the_sequence_is_not_contiguous(
    app: baton.Baton,
) -> None:
    # Other sessions drawing ids mid-reservation leave gaps; a stepped sequence does too.
    sql_rows(app.dsn, "ALTER SEQUENCE baton.jobs_id_seq INCREMENT BY 3")
    ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(COPY_FROM)])
    assert ids == sorted(ids) and ids[1] - ids[0] == 3
    rows = sql_rows(app.dsn, "SELECT id, (args->>'value')::int FROM baton.jobs ORDER BY id")
    assert rows == list(zip(ids, range(COPY_FROM), strict=True))


OTHERS = 7


@dataclass(frozen=True)
class DrawsIdsMidway(JobSpec):
    """A job that, when the COPY formats its line, waits until the server has drawn ids for
    50 rows sent before it, then lets another session draw ``OTHERS`` ids."""

    dsn: str = ""
    start: int = 0

    def copy_row(self, *args: Any, **kwargs: Any) -> str:
        deadline = time.monotonic() + 30
        while _last_id(self.dsn) < self.start + 50:
            assert time.monotonic() < deadline, "the server drew no ids for the COPY"
            time.sleep(0.005)
        sql_rows(self.dsn, f"SELECT nextval('baton.jobs_id_seq') FROM generate_series(1, {OTHERS})")
        return super().copy_row(*args, **kwargs)


def _last_id(dsn: str) -> int:
    return int(sql_rows(dsn, "SELECT COALESCE(pg_sequence_last_value('baton.jobs_id_seq'), 0)")
               [0][0])


def _drawing_batch(dsn: str, size: int) -> list[JobSpec]:
    """Jobs echoing 0..size-1; the 300th (in the COPY's second chunk) draws ids elsewhere."""
    jobs = [basic.echo.new(value=i) for i in range(size)]
    jobs[300] = DrawsIdsMidway(**{**vars(jobs[300]), "dsn": dsn, "start": _last_id(dsn)})
    return jobs


def _batch_rows(dsn: str) -> list[tuple[int, int]]:
    return sql_rows(dsn, "SELECT id, (args->>'value')::int FROM baton.jobs ORDER BY id")


async def test_batch_ids_match_rows_when_other_sessions_draw_ids_meanwhile(
    app: baton.Baton,
) -> None:
    ids = await app.enqueue_many(_drawing_batch(app.dsn, 700))
    assert len(set(ids)) == 700 and ids == sorted(ids)
    assert ids[-1] - ids[0] == 699 + OTHERS  # the others' ids are among them
    assert _batch_rows(app.dsn) == list(zip(ids, range(700), strict=True))


async def test_batch_ids_in_a_savepoint_of_the_callers_transaction(app: baton.Baton) -> None:
    # The rows of the batch carry the savepoint's transaction id, not the outer one's.
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        first = await app.enqueue_many([basic.echo.new(value=-1 - i) for i in range(40)],
                                       conn=conn)
        async with conn.transaction():
            ids = await app.enqueue_many(_drawing_batch(app.dsn, 400), conn=conn)
        await conn.commit()
    assert len(ids) == 400 and ids == sorted(ids) and ids[0] > first[-1]
    assert ids[-1] - ids[0] == 399 + OTHERS
    rows = dict(_batch_rows(app.dsn))
    assert [rows[i] for i in ids] == list(range(400))
    assert [rows[i] for i in first] == [-1 - i for i in range(40)]


async def test_batch_on_a_callers_autocommit_connection_is_whole(app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(app.dsn, autocommit=True) as conn:
        ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(COPY_FROM)],
                                     conn=conn)
        with pytest.raises(baton.ArgsError):
            await app.enqueue_many(basic.echo.new_many(
                [{"value": i} for i in range(COPY_FROM)] + [{"wrong": 1}]), conn=conn)
        assert conn.autocommit
    assert _batch_rows(app.dsn) == list(zip(ids, range(COPY_FROM), strict=True))


async def test_new_many_builds_one_job_per_args(app: baton.Baton) -> None:
    batch = basic.echo.new_many({"value": i} for i in range(500))
    assert len(batch) == 500 and batch.spec.step == "tests.apps.basic.echo"
    assert batch[3].args == {"value": 3} and batch[-1].args == {"value": 499}
    assert [job.args["value"] for job in batch[10:13]] == [10, 11, 12]
    with pytest.raises(IndexError):
        batch[500]
    ids = await app.enqueue_many(batch.options(queue="bulk", priority=4, meta={"run": 1}))
    rows = sql_rows(app.dsn, "SELECT id, (args->>'value')::int, queue, priority, meta::text,"
                             " state, scheduled_at = inserted_at FROM baton.jobs ORDER BY id")
    assert [r[0] for r in rows] == ids
    assert [r[1] for r in rows] == list(range(500))
    assert {r[2:] for r in rows} == {("bulk", 4, '{"run": 1}', "available", True)}
    later = await app.enqueue_many(batch[:40].options(schedule_in=3600))
    assert {(await app.get_job(i)).state for i in later} == {JobState.SCHEDULED}


async def test_a_batch_leaves_to_the_table_only_the_options_at_its_defaults(
        app: baton.Baton) -> None:
    # What COPY_DEFAULTS says the table fills in is what it fills in.
    filled = sql_rows(app.dsn, "INSERT INTO baton.jobs (step) VALUES ('x') RETURNING "
                               "state, queue, meta::text, max_attempts::text, priority::text,"
                               " timeout, tags::text")[0]
    assert filled == tuple(None if COPY_DEFAULTS[c] == NULL else COPY_DEFAULTS[c] for c in (
        "state", "queue", "meta", "max_attempts", "priority", "timeout", "tags"))
    plain = basic.echo.new_many({"value": i} for i in range(COPY_FROM))
    assert plain.spec.copy_head(JobState.AVAILABLE, None)[0] == ["step", "args"]
    varied = plain.options(queue="bulk", priority=2, max_attempts=3, timeout=1.5,
                           meta={"m": "\t"}, tags=["a"])
    assert len(varied.spec.copy_head(JobState.AVAILABLE, "now")[0]) == 9  # all but workflow
    ids = await app.enqueue_many(plain) + await app.enqueue_many(varied)
    rows = sql_rows(app.dsn, "SELECT state, queue, priority, max_attempts, timeout, meta, tags,"
                             " (args->>'value')::int FROM baton.jobs WHERE id = ANY(%s) "
                             "ORDER BY id", (ids,))
    assert rows == (
        [("available", "default", 0, 20, None, {}, [], i) for i in range(COPY_FROM)]
        + [("available", "bulk", 2, 3, 1.5, {"m": "\t"}, ["a"], i) for i in range(COPY_FROM)])
    # A batch scheduled later or earlier copies its scheduled_at as well.
    later, earlier = (datetime.now(UTC) + timedelta(hours=h) for h in (1, -1))
    ids = (await app.enqueue_many(plain.options(scheduled_at=later))
           + await app.enqueue_many(plain.options(scheduled_at=earlier)))
    assert set(sql_rows(app.dsn, "SELECT state, scheduled_at FROM baton.jobs WHERE id = ANY(%s)",
                        (ids,))) == {("scheduled", later), ("available", earlier)}
    # Nothing may change those defaults under a process that relies on them.
    for migration in (ROOT / "sql").glob("*.sql"):
        assert not re.search(r"jobs\s+ALTER\s+(COLUMN\s+)?\w+\s+SET\s+DEFAULT",
                             migration.read_text(), re.IGNORECASE), migration.name


async def test_new_many_refuses_the_whole_batch_for_one_bad_item(app: baton.Baton) -> None:
    args: list[dict[str, object]] = [{"value": i} for i in range(600)]
    args[450] = {"value": object()}
    with pytest.raises(baton.ArgsError, match="item 450") as info:
        await app.enqueue_many(basic.echo.new_many(args))
    assert info.value.index == 450 and info.value.step == "tests.apps.basic.echo"
    with pytest.raises(baton.ArgsError, match="item 2"):
        app.enqueue_many_sync(basic.echo.new_many([{"value": 1}, {"value": 2}, {"surplus": 3}]))
    with pytest.raises(baton.PayloadTooLargeError) as too_big:
        list(basic.echo.new_many([{"value": 1}, {"value": "x" * 2_000_000}]))
    assert too_big.value.index == 1
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]
    ids = await app.enqueue_many(basic.echo.new_many([{"value": 1}] * COPY_FROM))
    assert len(ids) == COPY_FROM  # the connection is usable after the aborted COPY


async def test_batch_in_rolled_back_transaction_enqueues_nothing(app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        await app.enqueue_many([basic.echo.new(value=i) for i in range(COPY_FROM * 2)],
                               conn=conn)
        await conn.rollback()
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]


async def test_scheduled_job_waits_in_scheduled_state(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.echo.new(value=1).options(schedule_in=3600))
    job = await app.get_job(job_id)
    assert job.state is JobState.SCHEDULED
    assert job.scheduled_at > datetime.now(UTC) + timedelta(minutes=59)


async def test_options_override_step_defaults(app: baton.Baton) -> None:
    spec = basic.echo.new(value=1).options(queue="other", priority=3, max_attempts=7,
                                           meta={"origin": "test"})
    job = await app.get_job(await app.enqueue(spec))
    assert (job.queue, job.priority, job.max_attempts, job.meta) == (
        "other", 3, 7, {"origin": "test"})


async def test_rolled_back_transaction_enqueues_nothing(app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        await app.enqueue(basic.echo.new(value="lost"), conn=conn)
        await conn.rollback()
        job_id = await app.enqueue(basic.echo.new(value="kept"), conn=conn)
        await conn.commit()
    rows = sql_rows(app.dsn, "SELECT id, args->>'value' FROM baton.jobs")
    assert rows == [(job_id, "kept")]


def test_sync_enqueue_in_callers_transaction(dsn: str) -> None:
    app = baton.Baton(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            with conn.transaction():
                app.enqueue_sync(basic.echo.new(value="in-tx"), conn=conn)
                assert sql_rows(dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]
            assert sql_rows(dsn, "SELECT count(*) FROM baton.jobs") == [(1,)]
            with pytest.raises(RuntimeError), conn.transaction():
                app.enqueue_sync(basic.echo.new(value="boom"), conn=conn)
                raise RuntimeError("caller fails")
        ids = app.enqueue_many_sync([basic.echo.new(value=i) for i in range(3)])
        assert len(ids) == 3
        assert app.get_job_sync(ids[0]).state is JobState.AVAILABLE
        assert sql_rows(dsn, "SELECT count(*) FROM baton.jobs") == [(4,)]
        batch = app.enqueue_many_sync([basic.echo.new(value=i) for i in range(COPY_FROM)])
        assert app.get_job_sync(batch[-1]).args == {"value": COPY_FROM - 1}
    finally:
        app.close_sync()


async def test_an_unreachable_database_fails_early_and_clearly() -> None:
    app = baton.Baton("postgresql://baton@127.0.0.1:1/nothing", connect_timeout=0.5)
    with pytest.raises(baton.DatabaseError, match="could not connect to the database"):
        await app.open()
    with pytest.raises(baton.DatabaseError):
        await app.enqueue(basic.echo.new(value=1))
    await app.close()


async def test_a_borrower_leaving_autocommit_on_does_not_leak_it(dsn: str) -> None:
    """The next lend of the connection still runs its statements in one transaction."""
    app = baton.Baton(dsn, pool_size=1)
    try:
        async with app.connection() as conn:
            await conn.set_autocommit(True)
        async with app.connection() as conn:
            assert not conn.autocommit
            await app.enqueue(basic.echo.new(value="lost"), conn=conn)
            await conn.rollback()
        with app.connection_sync() as sync_conn:
            sync_conn.autocommit = True
        with app.connection_sync() as sync_conn:
            assert not sync_conn.autocommit
            app.enqueue_sync(basic.echo.new(value="lost"), conn=sync_conn)
            sync_conn.rollback()
        assert sql_rows(dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]
    finally:
        await app.close()


async def test_args_are_validated_before_insert(app: baton.Baton) -> None:
    with pytest.raises(baton.ArgsError) as info:
        basic.typed.new(count="many", when="not a date")
    assert "count" in str(info.value) and "when" in str(info.value)
    with pytest.raises(baton.ArgsError, match="surplus: Extra inputs"):
        basic.echo.new(value=1, surplus=2)
    with pytest.raises(baton.ArgsError, match="value"):
        basic.echo.new()
    job = basic.typed.new(count="3", when="2026-01-02T03:04:05Z")
    assert job.args == {"count": 3, "when": "2026-01-02T03:04:05Z"}


async def test_unserializable_args_are_refused(app: baton.Baton) -> None:
    with pytest.raises(baton.ArgsError, match="JSON"):
        basic.echo.new(value=object())
    with pytest.raises(baton.ArgsError, match="JSON"):
        basic.echo.new(value=math.nan)
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]


async def test_oversized_args_are_refused(app: baton.Baton) -> None:
    with pytest.raises(baton.PayloadTooLargeError) as info:
        basic.echo.new(value="x" * 2_000_000)
    assert info.value.limit == 1_000_000 and info.value.size > 2_000_000


async def test_get_unknown_job_raises(app: baton.Baton) -> None:
    with pytest.raises(baton.JobNotFound) as info:
        await app.get_job(424242)
    assert info.value.job_id == 424242


async def test_bad_options_fail_at_definition() -> None:
    app = baton.Baton()
    with pytest.raises(ValueError):
        app.step(priority=12)(basic.echo.fn)
    with pytest.raises(ValueError):
        basic.echo.new(value=1).options(max_attempts=0)
    with pytest.raises(TypeError, match="unknown job options: step"):
        basic.echo.new(value=1).options(step="another")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unknown job options: queu"):
        basic.echo.new_many([{"value": 1}]).options(queu="typo")  # type: ignore[call-arg]


async def test_hot_queries_use_their_partial_indexes(app: baton.Baton) -> None:
    await app.enqueue_many([basic.echo.new(value=i).options(queue=f"q{i % 50}")
                            for i in range(5000)])
    sql_rows(app.dsn, "ANALYZE baton.jobs")
    fetch = app.sql["jobs_fetch"].as_string(None)
    plan = sql_rows(app.dsn, "EXPLAIN " + fetch.replace("%(queue)s", "'q7'")
                    .replace("%(demand)s", "10").replace("%(worker_id)s", "'w'")
                    .replace("%(steps)s", f"'{{{basic.echo.name}}}'")
                    .replace("%(after_priority)s", "0").replace("%(after_id)s", "70")
                    .replace("%(after_at)s", "'2000-01-01'"))
    assert "jobs_fetch_idx" in "\n".join(r[0] for r in plan)
    # The claim starts after its key: the scan begins there, not at the head of the queue.
    assert any("Index Cond" in r[0] and "ROW(priority, scheduled_at, id) >" in r[0]
               for r in plan)
    stage = app.sql["jobs_stage"].as_string(None).replace("%(limit)s", "100")
    plan = sql_rows(app.dsn, "EXPLAIN " + stage)
    assert "jobs_stage_idx" in "\n".join(r[0] for r in plan)
