"""Unique jobs and workflows: the database keeps one per key, whoever inserts and however."""

from __future__ import annotations

import multiprocessing
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

import baton
from baton import ops, render
from baton.testing import drain_queue, running_worker, wait_for_workflow
from baton.unique import job_key
from baton.workflows import store
from tests.apps import uniq
from tests.conftest import bound
from tests.helpers import sql_rows


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(uniq.app, dsn) as bound_app:
        yield bound_app


def jobs_of(dsn: str, step: str) -> list[tuple[Any, ...]]:
    return sql_rows(dsn, "SELECT id, state, args FROM baton.jobs WHERE step = %s ORDER BY id",
                    (step,))


# -- racing inserts --------------------------------------------------------------------------


@pytest.mark.parametrize("many", [False, True], ids=["enqueue", "enqueue_many"])
def test_racing_processes_make_one_job(dsn: str, many: bool) -> None:
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(4)
    results = spawn.Queue()
    racers = [spawn.Process(target=uniq.race, args=(dsn, barrier, results, many))
              for _ in range(4)]
    for racer in racers:
        racer.start()
    got = [pair for _ in racers for pair in results.get(timeout=120)]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    rows = jobs_of(dsn, uniq.refresh.name)
    assert len(rows) == 1 and len(got) == 200
    assert {job_id for job_id, _ in got} == {rows[0][0]}
    assert sum(not duplicate for _, duplicate in got) == 1


async def test_an_insert_waiting_on_an_uncommitted_holder_returns_it(app: baton.Baton) -> None:
    job = uniq.refresh.new(account=1)
    async with await psycopg.AsyncConnection.connect(app.dsn) as first:
        first_id = await app.enqueue(job, conn=first)  # not committed yet
        assert not first_id.duplicate
        second: list[baton.JobId] = []
        async with anyio.create_task_group() as tg:
            async def enqueue_again() -> None:
                second.append(await app.enqueue(job))

            tg.start_soon(enqueue_again)
            # The second insert waits on the unique index for the first transaction.
            while not sql_rows(app.dsn, "SELECT 1 FROM pg_locks WHERE NOT granted"):
                await anyio.sleep(0.01)
            await first.commit()
    assert second == [first_id] and second[0].duplicate
    assert len(jobs_of(app.dsn, uniq.refresh.name)) == 1


async def test_a_rolled_back_holder_frees_the_key(app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        await app.enqueue(uniq.refresh.new(account=1), conn=conn)
        await conn.rollback()
    job_id = await app.enqueue(uniq.refresh.new(account=1))
    assert not job_id.duplicate and (await app.get_job(job_id)).state == "available"


# -- what counts as the same job ---------------------------------------------------------------


async def test_second_enqueue_returns_the_first_job(app: baton.Baton) -> None:
    first = await app.enqueue(uniq.refresh.new(account=1))
    again = await app.enqueue(uniq.refresh.new(account=1))
    other = await app.enqueue(uniq.refresh.new(account=2))
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again == first and other != first
    assert repr(again) == f"JobId({first}, duplicate=True)"
    assert (await app.get_job(again)).id == first  # a duplicate's id is the holder's id
    assert sql_rows(app.dsn, "SELECT id FROM baton.jobs WHERE id = %s", (again,)) == [(first,)]
    assert app.enqueue_sync(uniq.refresh.new(account=1)) == first
    job = await app.get_job(first)
    assert job.unique_key == job_key(baton.Unique(), uniq.refresh.name, "default", job.args)
    assert f"unique key  {job.unique_key}" in render.job(job, {})
    assert len(jobs_of(app.dsn, uniq.refresh.name)) == 2


async def test_keys_from_chosen_args(app: baton.Baton) -> None:
    first = await app.enqueue(uniq.notify.new(user_id=1, text="hello"))
    same_user = await app.enqueue(uniq.notify.new(user_id=1, text="bye"))
    other_user = await app.enqueue(uniq.notify.new(user_id=2, text="hello"))
    assert same_user == first and same_user.duplicate and not other_user.duplicate
    # A key of no argument: one job of the step at a time.
    assert (await app.enqueue(uniq.rebuild.new())).duplicate is False
    assert (await app.enqueue(uniq.rebuild.new())).duplicate is True
    # Queue is part of the key.
    moved = await app.enqueue(uniq.notify.new(user_id=1, text="x").options(queue="other"))
    assert not moved.duplicate


async def test_unique_on_one_job_and_off_again(app: baton.Baton) -> None:
    job = uniq.plain.new(n=1).options(unique=baton.Unique())
    assert job.unique == baton.Unique()
    first = await app.enqueue(job)
    assert (await app.enqueue(job)) == first
    assert not (await app.enqueue(uniq.plain.new(n=1))).duplicate  # not unique: a new job
    off = uniq.refresh.new(account=5).options(unique=False)
    assert off.unique is None
    await app.enqueue(off)
    assert not (await app.enqueue(off)).duplicate
    assert uniq.plain.new(n=1).options(unique=True).unique == baton.Unique()


async def test_ordinary_jobs_carry_no_key(app: baton.Baton) -> None:
    await app.enqueue_many([uniq.plain.new(n=i) for i in range(40)])
    assert (await app.get_job(await app.enqueue(uniq.plain.new(n=1)))).unique_key is None
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs WHERE unique_key IS NOT NULL "
                             "OR unique_states IS NOT NULL") == [(0,)]


# -- states and periods --------------------------------------------------------------------------


async def test_a_finished_job_no_longer_blocks(app: baton.Baton) -> None:
    first = await app.enqueue(uniq.refresh.new(account=1))
    await drain_queue(app)
    assert (await app.get_job(first)).state == "completed"
    second = await app.enqueue(uniq.refresh.new(account=1))
    assert not second.duplicate and second != first
    assert (await app.enqueue(uniq.refresh.new(account=1))) == second


async def test_a_cancelled_job_no_longer_blocks(app: baton.Baton) -> None:
    first = await app.enqueue(uniq.refresh.new(account=1).options(schedule_in=3600))
    assert (await app.get_job(first)).state == "scheduled"
    assert (await app.enqueue(uniq.refresh.new(account=1))) == first  # scheduled counts
    await app.cancel(first)
    assert not (await app.enqueue(uniq.refresh.new(account=1))).duplicate


async def test_chosen_states_keep_a_finished_job_blocking(app: baton.Baton) -> None:
    first = await app.enqueue(uniq.once.new(name="a"))
    await drain_queue(app)
    assert (await app.get_job(first)).state == "completed"
    again = await app.enqueue(uniq.once.new(name="a"))
    assert again == first and again.duplicate
    assert sql_rows(app.dsn, "SELECT unique_states FROM baton.jobs WHERE id = %s",
                    (first,)) == [(["available", "scheduled", "executing", "retryable",
                                    "completed"],)]


async def test_retrying_a_finished_job_whose_key_is_taken_is_refused(app: baton.Baton) -> None:
    first = await app.enqueue(uniq.refresh.new(account=1))
    await drain_queue(app)
    await app.enqueue(uniq.refresh.new(account=1))  # holds the key now
    with pytest.raises(baton.UniqueKeyTakenError) as caught:
        await app.retry(first)
    assert caught.value.sqlstate == "23505" and caught.value.holder == "job"
    assert "another job holds its unique key" in str(caught.value)
    assert isinstance(caught.value, baton.DatabaseError)
    assert (await app.get_job(first)).state == "completed"


async def enqueue_at(app: baton.Baton, job: baton.JobSpec, now: datetime) -> baton.JobIds:
    async with app.connection() as conn:
        return await ops.run_async(conn, ops.insert_unique(app.sql, [job], now=now),
                                   "enqueue")


async def test_period_buckets(app: baton.Baton) -> None:
    start = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)  # a multiple of 60 s since the epoch
    job = uniq.rebuild.new()
    first = await enqueue_at(app, job, start)
    within = await enqueue_at(app, job, start + timedelta(seconds=59.9))
    next_period = await enqueue_at(app, job, start + timedelta(seconds=60))
    assert first.duplicates == () and within.duplicates == (0,) and within == first
    assert next_period.duplicates == () and next_period != first
    keys = sql_rows(app.dsn, "SELECT unique_key FROM baton.jobs ORDER BY id")
    bucket = int(start.timestamp()) // 60
    assert [k.rsplit(":", 1)[1] for (k,) in keys] == [str(bucket), str(bucket + 1)]
    # The key holds within the period while the job is unfinished; both periods' jobs are.
    assert (await app.enqueue(job)).duplicate is False  # today is another period


async def test_a_period_with_finished_states_means_once_per_period(app: baton.Baton) -> None:
    start = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)
    job = uniq.plain.new(n=1).options(unique=baton.Unique(
        period=timedelta(hours=1), states=[*baton.unique.JOB_STATES]))
    first = await enqueue_at(app, job, start)
    await drain_queue(app)
    assert (await enqueue_at(app, job, start + timedelta(minutes=59))) == first
    assert (await enqueue_at(app, job, start + timedelta(minutes=60))) != first


# -- batches -------------------------------------------------------------------------------------


async def test_enqueue_many_with_duplicates_in_the_batch_and_the_table(app: baton.Baton) -> None:
    held = await app.enqueue(uniq.refresh.new(account=9))
    jobs = [
        uniq.refresh.new(account=1),
        uniq.plain.new(n=1),
        uniq.refresh.new(account=1, reason="again"),  # another job: all args are the key
        uniq.refresh.new(account=1),  # the first one's
        uniq.refresh.new(account=9),  # the table's
        uniq.plain.new(n=1),  # plain jobs are never duplicates
    ]
    ids = await app.enqueue_many(jobs)
    assert ids.duplicates == (3, 4)
    assert [ids.is_duplicate(i) for i in range(6)] == [False] * 3 + [True, True, False]
    assert ids[3] == ids[0] and ids[4] == held
    assert len(set(ids)) == 5
    rows = {row[0]: row for row in sql_rows(app.dsn, "SELECT id, step, args FROM baton.jobs")}
    assert len(rows) == 5
    for job, job_id in zip(jobs, ids, strict=True):
        assert rows[job_id][1] == job.step
    assert rows[ids[2]][2] == {"account": 1, "reason": "again"}
    again = app.enqueue_many_sync(jobs[2:5])
    assert again == ids[2:5] and again.duplicates == (0, 1, 2)


async def test_batches_take_keys_in_one_order(app: baton.Baton) -> None:
    """Two batches wanting the same keys in opposite orders would deadlock if each held one
    the other waits for: keys are taken in one order, whatever the batch's."""
    errors: list[BaseException] = []

    async def insert(jobs: list[baton.JobSpec]) -> None:
        try:
            await app.enqueue_many(jobs)
        except baton.DatabaseError as exc:
            errors.append(exc)

    for round_ in range(4):
        a, b = (uniq.refresh.new(account=2 * round_ + n) for n in range(2))
        async with await psycopg.AsyncConnection.connect(app.dsn) as holder:
            await app.enqueue(b, conn=holder)  # holds b, uncommitted
            async with anyio.create_task_group() as tg:
                tg.start_soon(insert, [a, b])
                tg.start_soon(insert, [b, a])
                # Both wait on the holder's b (or on each other); when it rolls back they
                # race for b, and the loser must not be holding a.
                while len(sql_rows(app.dsn, "SELECT 1 FROM pg_locks WHERE NOT granted")) < 2:
                    await anyio.sleep(0.01)
                await holder.rollback()
        assert errors == []
    assert len(jobs_of(app.dsn, uniq.refresh.name)) == 8


async def test_large_mixed_batch_copies_the_plain_jobs(app: baton.Baton) -> None:
    held = await app.enqueue(uniq.refresh.new(account=0))
    jobs: list[baton.JobSpec] = []
    for n in range(100):
        jobs.append(uniq.plain.new(n=n))
        jobs.append(uniq.refresh.new(account=n % 30))  # 30 keys, one of them held
    assert len(jobs) >= ops.COPY_FROM
    ids = await app.enqueue_many(jobs)
    assert len(ids) == 200
    seen, expected = {0}, []
    for position in range(1, 200, 2):
        if jobs[position].args["account"] in seen:
            expected.append(position)
        seen.add(jobs[position].args["account"])
    assert list(ids.duplicates) == expected
    assert ids[1] == held
    rows = dict(sql_rows(app.dsn, "SELECT id, args FROM baton.jobs"))
    assert len(rows) == 100 + 30
    for job, job_id in zip(jobs, ids, strict=True):
        if job.step == uniq.plain.name:
            assert rows[job_id] == job.args
        else:
            assert rows[job_id]["account"] == job.args["account"]


async def test_large_unique_batch(app: baton.Baton) -> None:
    batch = uniq.refresh.new_many({"account": n % 500} for n in range(1000))
    ids = await app.enqueue_many(batch)
    assert len(ids) == 1000 and len(ids.duplicates) == 500
    assert ids[:500] == ids[500:]
    assert len(jobs_of(app.dsn, uniq.refresh.name)) == 500
    again = await app.enqueue_many(batch[:10])
    assert again == ids[:10] and again.duplicates == tuple(range(10))


async def test_a_rolled_back_batch_leaves_nothing(app: baton.Baton) -> None:
    jobs = [uniq.refresh.new(account=1), uniq.plain.new(n=1)] * 20
    jobs.append(baton.JobSpec("x", {"a": 1}, max_attempts=1).options(unique=True))
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        await app.enqueue_many(jobs, conn=conn)
        await conn.rollback()
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]


# -- workflows -----------------------------------------------------------------------------------


def ingest(label: str, account: int, **options: Any) -> baton.Workflow:
    wf = baton.Workflow(label, **options)
    wf.add("first", uniq.plain.new(n=account))
    wf.add("second", uniq.refresh.new(account=account), deps=["first"])
    return wf


async def test_unique_workflow_inserts_once(app: baton.Baton) -> None:
    first = await app.insert(ingest("ingest", 1, unique=True))
    again = await app.insert(ingest("ingest", 1, unique=True))
    other = await app.insert(ingest("ingest", 2, unique=True))
    assert not first.duplicate and again.duplicate and again == first
    assert not other.duplicate and other != first
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.workflows") == [(2,)]
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(4,)]
    # Steps inside a workflow are never unique, whatever their step says.
    assert len(jobs_of(app.dsn, uniq.refresh.name)) == 2


async def test_unique_workflow_by_label(app: baton.Baton) -> None:
    by_label = baton.Unique(by_label=True)
    first = app.insert_sync(ingest("patent:US1", 1, unique=by_label))
    assert app.insert_sync(ingest("patent:US1", 2, unique=by_label)) == first
    assert not (await app.insert(ingest("patent:US2", 1, unique=by_label))).duplicate


async def test_a_finished_workflow_no_longer_blocks(app: baton.Baton) -> None:
    first = await app.insert(ingest("ingest", 1, unique=True))
    async with running_worker(app):
        await wait_for_workflow(app, first)
    second = await app.insert(ingest("ingest", 1, unique=True))
    assert not second.duplicate and second != first
    kept = baton.Unique(states=["running", "completed"])
    third = await app.insert(ingest("kept", 1, unique=kept))
    async with running_worker(app):
        await wait_for_workflow(app, third)
    assert (await app.insert(ingest("kept", 1, unique=kept))) == third


async def test_resuming_a_workflow_whose_key_is_taken_is_refused(app: baton.Baton) -> None:
    unique = baton.Unique(by_label=True)
    failing = baton.Workflow("nightly", unique=unique)
    failing.add("only", uniq.fail.new(n=1))
    first = await app.insert(failing)
    async with running_worker(app):
        assert (await wait_for_workflow(app, first)).state == "failed"
    second = await app.insert(ingest("nightly", 1, unique=unique))  # holds the key now
    assert not second.duplicate
    with pytest.raises(baton.UniqueKeyTakenError) as caught:
        await app.resume(first)
    assert caught.value.sqlstate == "23505" and caught.value.holder == "workflow"
    assert (await app.get_workflow(first)).state == "failed"


async def test_workflow_period(app: baton.Baton) -> None:
    start = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)
    unique = baton.Unique(by_label=True, period=3600)

    async def insert_at(now: datetime) -> baton.WorkflowId:
        wf = ingest("hourly", 1, unique=unique)
        async with app.connection() as conn:
            row = {"id": wf.id, "label": wf.label, "ignore_cancelled": False,
                   "ignore_discarded": False, "debug": False, "total": 2}
            holder = await ops.run_async(conn, store.insert_unique(app.sql, wf, row, now),
                                         "insert workflow")
        return holder or baton.WorkflowId(wf.id)

    first = await insert_at(start)
    assert (await insert_at(start + timedelta(minutes=30))) == first
    assert not (await insert_at(start + timedelta(hours=1))).duplicate


async def test_a_workflow_insert_waiting_on_an_uncommitted_holder_returns_it(
        app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(app.dsn) as holder:
        first = await app.insert(ingest("ingest", 1, unique=True), conn=holder)
        second: list[baton.WorkflowId] = []
        async with anyio.create_task_group() as tg:
            async def insert_again() -> None:
                second.append(await app.insert(ingest("ingest", 1, unique=True)))

            tg.start_soon(insert_again)
            while not sql_rows(app.dsn, "SELECT 1 FROM pg_locks WHERE NOT granted"):
                await anyio.sleep(0.01)
            await holder.commit()
    assert second == [first] and second[0].duplicate
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(2,)]


async def test_racing_workflow_inserts_make_one(app: baton.Baton) -> None:
    got: list[baton.WorkflowId] = []

    async def insert() -> None:
        got.append(await app.insert(ingest("race", 1, unique=True)))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(insert)
    assert len(set(got)) == 1 and sum(not w.duplicate for w in got) == 1
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.workflows") == [(1,)]
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(2,)]


# -- bad options -------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"keys": "user_id"}, "keys must be a list of argument names"),
    ({"keys": ["a", "a"]}, "keys names an argument twice"),
    ({"keys": [1]}, "keys must be argument names"),
    ({"period": 0}, "period must be a positive, finite number"),
    ({"period": float("inf")}, "period must be a positive, finite number"),
    ({"period": True}, "period must be a positive, finite number"),
    ({"states": ["done"]}, "states must name at least one job state"),
    ({"states": []}, "states must name at least one job state"),
    ({"states": "available"}, "states must be a list of states"),
    ({"by_label": 1}, "by_label must be True or False"),
    ({"by_label": True, "keys": ["a"]}, "cannot be combined"),
])
def test_bad_unique_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(baton.OptionsError, match=message) as caught:
        baton.Unique(**options)
    assert caught.value.option == "unique"


def test_options_that_do_not_fit_where_they_are_given() -> None:
    with pytest.raises(baton.OptionsError, match="keys name arguments the step does not "
                                                 "take: email") as caught:
        uniq.app.step(unique=baton.Unique(keys=["email"]), name="t.bad")(uniq.plain.fn)
    assert caught.value.step == "t.bad"
    with pytest.raises(baton.OptionsError, match="by_label is for workflows"):
        uniq.plain.new(n=1).options(unique=baton.Unique(by_label=True))
    with pytest.raises(baton.OptionsError, match="'running' is not a job state"):
        uniq.plain.new(n=1).options(unique=baton.Unique(states=["running"]))
    with pytest.raises(baton.OptionsError, match=r"must be baton\.Unique"):
        uniq.plain.new(n=1).options(unique="yes")  # type: ignore[arg-type]
    with pytest.raises(baton.OptionsError, match="keys names a step's arguments"):
        baton.Workflow("w", unique=baton.Unique(keys=["a"]))
    with pytest.raises(baton.OptionsError, match="'available' is not a workflow state"):
        baton.Workflow("w", unique=baton.Unique(states=["available"]))
    # A job that could leave its states and come back (a snooze, a retry) while another
    # took its key would fail the worker's write: such states are refused.
    with pytest.raises(baton.OptionsError, match="missing executing, retryable"):
        uniq.plain.new(n=1).options(
            unique=baton.Unique(states=["available", "scheduled", "completed"]))
    with pytest.raises(baton.OptionsError, match="must include running"):
        baton.Workflow("w", unique=baton.Unique(states=["completed"]))


async def test_keys_missing_from_a_job_and_an_idempotency_key(app: baton.Baton) -> None:
    job = baton.JobSpec("elsewhere.step", {"a": 1}).options(
        unique=baton.Unique(keys=["b"]))
    with pytest.raises(baton.OptionsError, match="keys name arguments the job does not have"):
        await app.enqueue(job)
    with pytest.raises(baton.OptionsError, match="takes no idempotency key"):
        await app.enqueue(uniq.refresh.new(account=1), idempotency_key="k")
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs") == [(0,)]
