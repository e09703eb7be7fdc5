"""The jobs archive: old finished plain jobs leave jobs for jobs_archive (one partition per
day), stay readable, come back on a retry, and go a whole day at a time by retention."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import baton
from baton import metrics
from baton.migrations import migrate_down, migrate_up
from baton.testing import running_worker, wait_for_job
from baton.worker import Worker, WorkerSettings
from tests.apps import kept
from tests.conftest import bound
from tests.helpers import sql_rows


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(kept.app, dsn) as bound_app:
        yield bound_app


def where(dsn: str, job_id: int) -> list[str]:
    """The tables that hold the job: jobs, jobs_archive, or both (never expected)."""
    rows = sql_rows(dsn, "SELECT 'jobs' FROM baton.jobs WHERE id = %(id)s UNION ALL "
                         "SELECT 'jobs_archive' FROM baton.jobs_archive WHERE id = %(id)s",
                    {"id": job_id})
    return [r[0] for r in rows]


def partitions(dsn: str) -> list[str]:
    return [r[0] for r in sql_rows(
        dsn, "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
             " WHERE i.inhparent = 'baton.jobs_archive'::regclass ORDER BY 1")]


def age(dsn: str, job_ids: list[int], interval: str) -> None:
    """Make the jobs look finished ``interval`` ago."""
    sql_rows(dsn, "UPDATE baton.jobs SET finalized_at = now() - %(age)s::interval "
                  "WHERE id = ANY(%(ids)s)", {"age": interval, "ids": job_ids})


async def finished(app: baton.Baton, *jobs: baton.JobSpec) -> list[int]:
    ids = [await app.enqueue(job) for job in jobs]
    async with running_worker(app, archive_after=None):
        for job_id in ids:
            await wait_for_job(app, job_id, "completed")
    return ids


async def test_old_finished_jobs_move_to_the_archive_and_stay_readable(
        app: baton.Baton, dsn: str) -> None:
    old, older, recent = await finished(
        app, kept.summarize.new(text="archived report"), kept.total.new(numbers=[1, 2]),
        kept.forgetful.new(x=1))
    age(dsn, [old], "2 hours")
    age(dsn, [older], "3 days")
    maintenance = Worker(app, WorkerSettings()).maintenance  # archive_after: one hour
    # One pass moves one day's jobs, the oldest first.
    assert await maintenance.archive() == {"jobs": 1}
    assert where(dsn, older) == ["jobs_archive"] and where(dsn, old) == ["jobs"]
    assert await maintenance.archive() == {"jobs": 1}
    assert await maintenance.archive() == {}
    assert where(dsn, old) == ["jobs_archive"] and where(dsn, recent) == ["jobs"]
    assert len(partitions(dsn)) == 2

    job = await app.get_job(old)
    assert job.state == "completed" and job.args == {"text": "archived report"}
    assert job.tags == ["reports"]
    assert (await app.result_of(old))["words"] == 2
    assert await app.result_of(older) == 3
    listed = [j.id for j in await app.query.jobs()]
    assert listed == [recent, older, old]
    assert [j.id for j in await app.query.jobs(tags=["reports"])] == [old]
    [(in_view,)] = sql_rows(dsn, "SELECT count(*) FROM baton.jobs_all WHERE archived")
    assert in_view == 2


async def test_a_retried_archived_job_comes_back_and_runs_again(
        app: baton.Baton, dsn: str) -> None:
    [job_id] = await finished(app, kept.forgetful.new(x=3))
    age(dsn, [job_id], "2 hours")
    assert await Worker(app, WorkerSettings()).maintenance.archive() == {"jobs": 1}
    assert await app.retry(job_id)
    assert where(dsn, job_id) == ["jobs"]
    assert (await app.get_job(job_id)).state == "available"
    async with running_worker(app, archive_after=None):
        job = await wait_for_job(app, job_id, "completed")
    assert job.attempt == 2


async def test_jobs_of_workflows_and_jobs_holding_a_key_stay(
        app: baton.Baton, dsn: str) -> None:
    flow = baton.Workflow("report")
    flow.add("one", kept.forgetful.new(x=1))
    workflow_id = await app.insert(flow)
    keyed = await app.enqueue(kept.forgetful.new(x=2), idempotency_key="once")
    unique = await app.enqueue(kept.forgetful.new(x=3).options(unique=baton.Unique(
        states=["pending", "scheduled", "available", "executing", "retryable",
                "completed"])))
    plain = await app.enqueue(kept.forgetful.new(x=4))
    async with running_worker(app, archive_after=None):
        for job_id in (keyed, unique, plain):
            await wait_for_job(app, job_id, "completed")
    [(step_job,)] = sql_rows(dsn, "SELECT id FROM baton.jobs WHERE workflow_id = %s",
                             (workflow_id,))
    await wait_for_job(app, step_job, "completed")
    sql_rows(dsn, "UPDATE baton.jobs SET finalized_at = now() - interval '2 hours'")
    assert await Worker(app, WorkerSettings()).maintenance.archive() == {"jobs": 1}
    assert where(dsn, plain) == ["jobs_archive"]
    for job_id in (step_job, keyed, unique):
        assert where(dsn, job_id) == ["jobs"]


async def test_retention_drops_whole_days_with_their_kept_results(
        app: baton.Baton, dsn: str) -> None:
    gone, kept_day = await finished(app, kept.total.new(numbers=[1]),
                                    kept.total.new(numbers=[2]))
    age(dsn, [gone], "4 days")
    age(dsn, [kept_day], "2 hours")
    maintenance = Worker(app, WorkerSettings(archive_after=3600)).maintenance
    await maintenance.archive()
    await maintenance.archive()
    assert len(partitions(dsn)) == 2
    # Two days of retention: the day four days ago has ended more than two days ago.
    retention = Worker(app, WorkerSettings(prune_after=2 * 86_400)).maintenance
    done = await retention.archive()
    assert len(done["partitions_dropped"]) == 1
    assert len(partitions(dsn)) == 1
    assert where(dsn, gone) == [] and where(dsn, kept_day) == ["jobs_archive"]
    results = {r[0] for r in sql_rows(dsn, "SELECT job_id FROM baton.job_results")}
    assert results == {kept_day}
    with pytest.raises(baton.JobNotFound):
        await app.get_job(gone)
    assert await retention.archive() == {}


async def test_archive_is_off_with_archive_after_none(app: baton.Baton, dsn: str) -> None:
    [job_id] = await finished(app, kept.forgetful.new(x=1))
    age(dsn, [job_id], "30 days")
    assert await Worker(app, WorkerSettings(archive_after=None)).maintenance.archive() == {}
    assert where(dsn, job_id) == ["jobs"]


async def test_nothing_is_lost_while_workers_run_and_the_leader_archives(
        app: baton.Baton, dsn: str) -> None:
    n = 600
    async with running_worker(app, archive_after=0.01, archive_limit=25,
                              queues={"default": 20}) as worker:
        ids: list[int] = []
        for start in range(0, n, 100):
            ids += await app.enqueue_many(kept.forgetful.new_many(
                {"x": i} for i in range(start, start + 100)))
        for job_id in ids:
            job = await wait_for_job(app, job_id, "completed")
            assert job.args["x"] == job_id - ids[0]
        with anyio.fail_after(20):
            while sql_rows(dsn, "SELECT count(*) FROM baton.jobs")[0][0]:
                await anyio.sleep(0.05)  # the leader moves 25 jobs a pass
        assert worker.maintenance.is_leader
    rows = sql_rows(dsn, "SELECT count(*), count(DISTINCT id), min(attempt), max(attempt) "
                         "FROM baton.jobs_all WHERE state = 'completed'")
    assert rows == [(n, n, 1, 1)]


def test_reverting_the_migration_brings_archived_jobs_back(dsn: str) -> None:
    sql_rows(dsn, "INSERT INTO baton.jobs (id, state, step, finalized_at) "
                  "VALUES (1, 'completed', 'x', now() - interval '1 day')")
    sql_rows(dsn, "SELECT baton.jobs_archive_partition(now() - interval '1 day')")
    sql_rows(dsn, "WITH m AS (DELETE FROM baton.jobs RETURNING *) "
                  "INSERT INTO baton.jobs_archive (id, state, queue, step, args, meta, errors,"
                  " attempt, max_attempts, snoozes, priority, inserted_at, scheduled_at,"
                  " finalized_at) SELECT id, state, queue, step, args, meta, errors, attempt,"
                  " max_attempts, snoozes, priority, inserted_at, scheduled_at, finalized_at"
                  " FROM m")
    migrate_down(dsn, target=15)
    assert sql_rows(dsn, "SELECT id, state FROM baton.jobs") == [(1, "completed")]
    assert sql_rows(dsn, "SELECT to_regclass('baton.jobs_archive')") == [(None,)]
    migrate_up(dsn)
    assert sql_rows(dsn, "SELECT count(*) FROM baton.jobs_all") == [(1,)]


def test_the_migration_runs_beside_a_live_writer(dsn: str) -> None:
    """Migration 16 takes no lock on jobs that a writer holding rows of it would block."""
    migrate_down(dsn, target=15)
    with psycopg.connect(dsn) as writer:
        writer.execute("INSERT INTO baton.jobs (step) VALUES ('x')")
        writer.execute("UPDATE baton.jobs SET priority = 1")  # holds ROW EXCLUSIVE, open
        impatient = make_conninfo(dsn, options="-c lock_timeout=2000")
        assert migrate_up(impatient, target=16) == [16]
        writer.rollback()
    migrate_up(dsn)


async def test_archived_jobs_stay_counted_by_the_metrics(app: baton.Baton, dsn: str) -> None:
    def finished_total(text: str) -> float:
        name = f'step="{kept.forgetful.name}"'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("baton_jobs_finished_total{") and name in line)

    # A transaction left open holds the counters' watermark back, so every finish is read
    # past it at each scrape: only the leader's advance before a move counts the moved jobs.
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1")
        await finished(app, *[kept.forgetful.new(x=i) for i in range(3)])
        assert finished_total(await metrics.scrape(app)) == 3
        maintenance = Worker(app, WorkerSettings(archive_after=0.001)).maintenance
        assert await maintenance.archive() == {"jobs": 3}
        assert finished_total(await metrics.scrape(app)) == 3
        holder.rollback()
