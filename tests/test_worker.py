"""The worker: every state transition, retries, snooze, cancel, priorities, limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest

import baton
from baton.job import JobState
from baton.logs import capture_logs
from baton.testing import FAST_SETTINGS, running_worker, wait_for_job, wait_for_jobs
from baton.worker import Worker, WorkerSettings
from baton.worker import producer as producer_module
from baton.worker.completer import Completer
from baton.worker.executor import FetchedJob, Outcome
from baton.worker.producer import Producer
from tests.apps import basic
from tests.helpers import sql_rows
from tests.proxy import Predicate, Proxy


async def test_job_completes(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.echo.new(value="hi"))
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "completed")
    assert basic.CALLS["echo"] == ["hi"]
    assert job.attempt == 1 and job.finalized_at is not None and job.attempted_by


async def test_sync_step_runs_in_thread(app: baton.Baton) -> None:
    ids = await app.enqueue_many([basic.sync_add.new(a=i, b=1) for i in range(20)])
    async with running_worker(app):
        await wait_for_jobs(app, ids, ["completed"])
    assert sorted(basic.CALLS["sync_add"]) == list(range(1, 21))


async def test_args_arrive_typed(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.typed.new(count=2, when="2026-01-02T03:04:05+00:00"))
    async with running_worker(app):
        await wait_for_job(app, job_id, "completed")
    [(count, when)] = basic.CALLS["typed"]
    assert count == 2 and when.year == 2026 and when.tzinfo is not None


async def test_error_then_retry_then_success(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.flaky.new(key="f", failures=2))
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "completed")
    assert basic.CALLS["f"] == [1, 2, 3]
    assert job.attempt == 3
    assert [e["attempt"] for e in job.errors] == [1, 2]
    assert "RuntimeError: failure 1" in job.errors[0]["error"]
    assert "Traceback" in job.errors[0]["traceback"]


async def test_retryable_state_with_backoff(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.flaky.new(key="b", failures=1).options(max_attempts=2))
    # The default backoff is 15 s and up: observe the retryable state, not the retry.
    slow = basic.flaky.new(key="slow", failures=5)
    slow_id = await app.enqueue(slow)
    async with running_worker(app):
        await wait_for_job(app, job_id, "completed")
        job = await wait_for_job(app, slow_id, "retryable")
    assert job.errors and job.scheduled_at >= job.attempted_at  # type: ignore[operator]


async def test_retries_exhausted_discards(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.always_fails.new())
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "discarded")
    assert job.attempt == 2 and len(job.errors) == 2
    assert job.finalized_at is not None


async def test_snooze_gives_attempt_back(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.snoozer.new(key="s", seconds=0.05))
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "completed")
    assert basic.CALLS["s"] == [(1, 0), (1, 1)]
    assert job.attempt == 1 and job.snoozes == 1 and job.errors == []


async def test_long_snooze_is_scheduled(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.snoozer.new(key="s", seconds=3600))
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "scheduled")
    assert job.attempt == 0 and job.snoozes == 1


async def test_step_cancels_itself(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.canceller.new())
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "cancelled")
    assert "not needed any more" in job.errors[-1]["error"]


async def test_returned_discard_fails_permanently(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.discarder.new())
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "discarded")
    assert job.attempt == 1 and "bad input" in job.errors[-1]["error"]


async def test_timeout_fails_the_attempt(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.too_slow.new())
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "discarded")
    assert job.errors[-1]["kind"] == "timeout"


async def test_scheduled_job_runs_when_due(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.echo.new(value="later").options(schedule_in=0.3))
    assert (await app.get_job(job_id)).state is JobState.SCHEDULED
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "completed")
    assert job.attempted_at is not None and job.attempted_at >= job.scheduled_at


async def test_priorities_order_the_fetch(app: baton.Baton) -> None:
    specs = [basic.record.new(key="p", label=f"p{p}-{i}").options(priority=p)
             for i, p in enumerate([5, 0, 9, 0, 3])]
    ids = await app.enqueue_many(specs)
    async with running_worker(app, queues={"ordered": 1}):
        await wait_for_jobs(app, ids, ["completed"])
    assert basic.CALLS["p"] == ["p0-1", "p0-3", "p3-4", "p5-0", "p9-2"]


async def test_concurrency_limit_per_queue(app: baton.Baton) -> None:
    ids = await app.enqueue_many([basic.counted.new(key="c", gate="g") for _ in range(12)])
    async with running_worker(app, queues={"limited": 3}):
        with anyio.fail_after(10):
            while basic.RUNNING["c"] < 3:
                await anyio.sleep(0.01)
        running = sql_rows(app.dsn, "SELECT count(*) FROM baton.jobs WHERE state='executing'")
        assert running == [(3,)]
        basic.GATES["g"].set()
        await wait_for_jobs(app, ids, ["completed"])
    assert basic.PEAK["c"] == 3 and len(basic.CALLS["c"]) == 12


async def test_quick_jobs_never_exceed_the_limit(app: baton.Baton) -> None:
    # Jobs this short make the producer claim a batch ahead; they still run three at a time.
    basic.GATES.setdefault("open", anyio.Event()).set()
    ids = await app.enqueue_many([basic.counted.new(key="q", gate="open") for _ in range(300)])
    async with running_worker(app, queues={"limited": 3}):
        await wait_for_jobs(app, ids, ["completed"])
    assert basic.PEAK["q"] == 3 and len(basic.CALLS["q"]) == 300


async def test_fetched_jobs_wake_idle_slots_one_per_job_at_most(
    app: baton.Baton, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An idle worker of 50 slots gets 3 jobs: at most one slot wakes per job, not all 50.
    waits = 0
    wait_for_work = Producer._wait_for_work

    async def counted(self: Producer, slot: Any) -> None:
        nonlocal waits
        waits += 1
        await wait_for_work(self, slot)

    monkeypatch.setattr(Producer, "_wait_for_work", counted)
    async with running_worker(app, queues={"default": 50}) as worker:
        producer = worker.producers["default"]
        with anyio.fail_after(10):
            while len(producer._free) < 50:
                await anyio.sleep(0.01)
        idle = waits
        ids = await app.enqueue_many([basic.echo.new(value=str(i)) for i in range(3)])
        await wait_for_jobs(app, ids, ["completed"])
        woken = waits - idle  # each slot woken waits again once its job is done
    assert 1 <= woken <= 3
    assert sorted(basic.CALLS["echo"]) == ["0", "1", "2"]


async def test_a_claim_goes_on_from_the_last_job_taken_and_back_to_the_head_when_due(
        app: baton.Baton, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim starts after the last job the previous one took, stepping over none of the
    jobs claimed before. A job that became available behind that point (here one of a
    higher priority) is taken by the next claim from the head: once one is due, when the
    walk reaches the end of the queue, after a claim that came back short, or after a
    notification that jobs arrived."""
    monkeypatch.setattr(producer_module, "HEAD_EVERY", 3600.0)
    backlog = await app.enqueue_many([basic.echo.new(value=i).options(priority=5)
                                      for i in range(6)])
    producer = Worker(app, WorkerSettings(**FAST_SETTINGS)).producers["default"]

    async def claim(demand: int) -> list[int]:
        return sorted(job.id for job in await producer.fetch(demand))

    assert await claim(2) == backlog[:2]  # the first claim starts at the head
    urgent = await app.enqueue(basic.echo.new(value="urgent").options(priority=0))
    assert await claim(2) == backlog[2:4]  # on from the last job: the urgent one is behind
    monkeypatch.setattr(producer_module, "HEAD_EVERY", 0.0)
    assert await claim(2) == sorted([urgent, backlog[4]])  # a claim from the head is due
    monkeypatch.setattr(producer_module, "HEAD_EVERY", 3600.0)
    behind = await app.enqueue(basic.echo.new(value="behind").options(priority=0))
    # On from backlog[4] to the end of the queue, then from the head for the rest.
    assert await claim(3) == sorted([behind, backlog[5]])
    last = await app.enqueue(basic.echo.new(value="last").options(priority=5))
    assert await claim(2) == [last]  # from the head, and short
    ahead = await app.enqueue_many([basic.echo.new(value=i).options(priority=5)
                                    for i in range(4)])
    early = await app.enqueue(basic.echo.new(value="early").options(priority=0))
    # After a short claim, from the head: a walk on from `last` would take ahead[:2].
    assert await claim(2) == sorted([early, ahead[0]])
    monkeypatch.setattr(producer_module, "HEAD_SPACING", 0.0)
    assert await claim(1) == [ahead[1]]  # a walk again
    urgent_too = await app.enqueue(basic.echo.new(value="urgent too").options(priority=0))
    producer.notified()  # the insert's notification
    assert await claim(1) == [urgent_too]  # from the head: it is behind the walk


async def test_a_claim_whose_second_statement_fails_keeps_the_jobs_its_walk_took(
        app: baton.Baton, monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk that reaches the end of the backlog claims the rest from the head in a second
    statement. If that one fails, the jobs the walk took run here all the same, and a
    reconcile is due before the next claim (the second may have committed unseen)."""
    monkeypatch.setattr(producer_module, "HEAD_EVERY", 3600.0)
    ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(3)])
    producer = Worker(app, WorkerSettings(**FAST_SETTINGS)).producers["default"]
    assert sorted(job.id for job in await producer.fetch(2)) == ids[:2]  # full: walk next
    real = producer._claim_after
    afters: list[Any] = []

    async def head_fails(conn: psycopg.AsyncConnection[Any], params: dict[str, Any],
                         after: Any) -> list[tuple[Any, ...]]:
        afters.append(after)
        if after is None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await real(conn, params, after)

    monkeypatch.setattr(producer, "_claim_after", head_fails)
    with capture_logs() as logs:
        assert [job.id for job in await producer.fetch(2)] == [ids[2]]
    assert afters[0] is not None and afters[1] is None  # the walk, then the head
    assert producer._reconcile_due
    assert "producer.head_claim_failed" in [e["event"] for e in logs]


async def test_cancel_running_job(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.blocker.new(key="k"))
    async with running_worker(app):
        with anyio.fail_after(10):
            await basic.STARTED.setdefault("k", anyio.Event()).wait()
        assert await app.cancel(job_id) is True
        job = await wait_for_job(app, job_id, "cancelled")
        other = await app.enqueue(basic.echo.new(value="after"))
        await wait_for_job(app, other, "completed")
    assert basic.CALLS["k"] == []  # the step was stopped, not finished
    assert (await app.get_job(job_id)).state is JobState.CANCELLED
    assert job.finalized_at is not None


async def test_cancel_waiting_and_finished_jobs(app: baton.Baton) -> None:
    waiting = await app.enqueue(basic.echo.new(value=1).options(schedule_in=3600))
    assert await app.cancel(waiting) is True
    assert await app.cancel(waiting) is False
    with pytest.raises(baton.JobNotFound):
        await app.cancel(999_999)


async def test_retry_makes_finished_job_run_again(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.echo.new(value="again"))
    async with running_worker(app):
        await wait_for_job(app, job_id, "completed")
        assert await app.retry(job_id) is True
        with anyio.fail_after(10):
            while len(basic.CALLS["echo"]) < 2:
                await anyio.sleep(0.01)
        job = await wait_for_job(app, job_id, "completed")
    assert basic.CALLS["echo"] == ["again", "again"] and job.attempt == 2


async def test_retry_discarded_job_gets_another_attempt(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.always_fails.new())
    async with running_worker(app):
        await wait_for_job(app, job_id, "discarded")
        assert await app.retry(job_id)
        job = await wait_for_job(app, job_id, "discarded", timeout=10)
        with anyio.fail_after(10):
            while (job := await app.get_job(job_id)).attempt < 3:
                await anyio.sleep(0.01)
    assert job.max_attempts == 3 and len(job.errors) == 3


async def test_invalid_stored_args_are_discarded(app: baton.Baton) -> None:
    bad = baton.JobSpec(step=basic.typed.name, args={"count": "lots"})
    [bad_id, good_id] = await app.enqueue_many([bad, basic.echo.new(value="fine")])
    async with running_worker(app):
        job = await wait_for_job(app, bad_id, "discarded")
        await wait_for_job(app, good_id, "completed")
    assert "invalid arguments" in job.errors[0]["error"] and job.attempt == 1


async def test_two_workers_never_run_one_job(app: baton.Baton) -> None:
    ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(400)])
    async with running_worker(app, queues={"default": 7}), \
            running_worker(app, queues={"default": 5}):
        jobs = await wait_for_jobs(app, ids, ["completed"])
    assert sorted(basic.CALLS["echo"]) == list(range(400))
    assert all(j.attempt == 1 for j in jobs)
    workers = {j.attempted_by for j in jobs}
    assert len(workers) == 2


async def _peers_seen(workers: list[Any], count: int) -> None:
    """Wait until every worker's heartbeat has read ``count`` live workers of its queue."""
    with anyio.fail_after(10):
        while any(len(w._peers.get("default", ())) != count for w in workers):
            await anyio.sleep(0.02)


async def _enqueue_from(app: baton.Baton, value: int) -> tuple[int, int]:
    """Enqueue on a pooled connection; return the job's id and the process id of the
    session whose commit sent the NOTIFY."""
    async with app.connection() as conn:
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        job_id = await app.enqueue(basic.echo.new(value=value), conn=conn)
    return job_id, int(row[0])


async def test_one_worker_process_acts_on_an_insert_at_once(app: baton.Baton) -> None:
    # Neither polls nor fetches late within the test: only the worker chosen for each
    # insert's NOTIFY can claim its job.
    quiet = {"poll_interval": 60.0, "peer_wake_delay": 60.0, "heartbeat_ttl": 60.0}
    async with running_worker(app, **quiet) as a, running_worker(app, **quiet) as b:
        await _peers_seen([a, b], 2)
        for value in range(8):
            job_id, sender = await _enqueue_from(app, value)
            job = await wait_for_job(app, job_id, "completed")
            peers = a._peers["default"]
            assert job.attempted_by == peers[sender % len(peers)]
    assert sorted(basic.CALLS["echo"]) == list(range(8))


async def test_a_worker_not_chosen_still_fetches_after_the_peer_wake_delay(
    app: baton.Baton,
) -> None:
    # The chosen worker never fetches (a registry row of a worker that does not run): the
    # only one running claims the job once the delay is over, with no poll to help it.
    settings = WorkerSettings(**{**FAST_SETTINGS, "poll_interval": 60.0,
                                 "peer_wake_delay": 0.05, "heartbeat_ttl": 60.0})
    async with Worker(app, settings, worker_id="m-worker") as worker, \
            app.connection(autocommit=True) as conn:
        await _peers_seen([worker], 1)
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        # Sorted by id (letters: the same in any collation), the ghost is the one this
        # session's process id chooses.
        ghost = "z-ghost" if row[0] % 2 else "a-ghost"
        await conn.execute(
            "INSERT INTO baton.worker_registry (id, hostname, pid, queues, expires_at)"
            " VALUES (%s, 'nowhere', 0, '{\"default\": 5}', now() + interval '1 hour')",
            (ghost,))
        await _peers_seen([worker], 2)
        assert worker._peers["default"][row[0] % 2] == ghost
        job_id = await app.enqueue(basic.echo.new(value=1), conn=conn)
        job = await wait_for_job(app, job_id, "completed")
    assert job.attempted_by == "m-worker"


async def test_graceful_shutdown_hands_back_unfinished(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.blocker.new(key="stuck"))
    async with running_worker(app, shutdown_grace=0.1):
        with anyio.fail_after(10):
            await basic.STARTED.setdefault("stuck", anyio.Event()).wait()
    job = await app.get_job(job_id)
    assert job.state is JobState.AVAILABLE
    assert job.attempt == 0 and job.attempted_by is None


async def test_graceful_shutdown_lets_running_jobs_finish(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.blocker.new(key="finish"))
    async with running_worker(app, shutdown_grace=10) as worker:
        with anyio.fail_after(10):
            await basic.STARTED.setdefault("finish", anyio.Event()).wait()
        worker.stop()
        basic.GATES.setdefault("finish", anyio.Event()).set()
    assert (await app.get_job(job_id)).state is JobState.COMPLETED


async def test_drain_beside_a_flush_in_flight_writes_every_outcome(app: baton.Baton) -> None:
    """At shutdown the drain starts while the last flush may still be writing."""
    ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(3)])
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'executing', attempt = 1, "
             "attempted_by = 'w', attempted_at = now()")
    completer = Completer(app, "w", flush_interval=0, flush_max=2, max_pending=100)
    await app.open()
    for job_id in ids:
        job = FetchedJob(job_id, basic.echo.name, {}, None, "other", 1, 7, 0, 3, None, None, None)
        completer.push(Outcome(job, JobState.COMPLETED))
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.flush_once)
            tg.start_soon(completer.drain, anyio.current_time() + 10)
    assert completer.pending == []
    # Each outcome written once: a second write of a batch finds its jobs already finished.
    assert [e["job_id"] for e in logs if e["event"] == "job.completed"] == ids
    assert not [e for e in logs if e["event"] == "job.outcome_dropped"]
    assert sql_rows(app.dsn, "SELECT state FROM baton.jobs ORDER BY id") == [("completed",)] * 3


async def test_leader_is_elected_once(app: baton.Baton) -> None:
    async with running_worker(app) as one, running_worker(app) as two:
        with anyio.fail_after(10):
            while one.maintenance.ticks < 3 or two.maintenance.ticks < 3:
                await anyio.sleep(0.01)
        assert [one.maintenance.is_leader, two.maintenance.is_leader].count(True) == 1
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.worker_registry") == [(0,)]


async def test_an_error_in_the_worker_block_stops_it_gracefully_and_comes_out_as_itself(
    app: baton.Baton,
) -> None:
    job_id = await app.enqueue(basic.echo.new(value="before"))
    settings = baton.WorkerSettings(queues={"default": 2}, poll_interval=0.2)
    with pytest.raises(LookupError, match="in the block"):
        async with baton.Worker(app, settings) as worker:
            await wait_for_job(app, job_id, "completed")
            raise LookupError("in the block")
    assert worker.stopped.is_set()  # the graceful stop ran to its end: not cancelled
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.worker_registry") == [(0,)]


async def test_a_job_claimed_again_while_it_still_runs_here_runs_once(
    app: baton.Baton,
) -> None:
    """A rescue can take a job from a worker whose heartbeat stalled while it still ran it;
    if the same worker claims it again, the second claim must not start a second run."""
    job_id = await app.enqueue(basic.blocker.new(key="again"))
    with capture_logs() as logs:
        async with running_worker(app, heartbeat_ttl=60.0) as worker:
            with anyio.fail_after(10):
                await basic.STARTED.setdefault("again", anyio.Event()).wait()
            # As another process's rescue would, then a wake-up: this worker claims it again.
            sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'available', scheduled_at = now()"
                     " WHERE id = %s", (job_id,))
            worker.producers["default"].wake()
            await _rows_become(app.dsn, "SELECT attempt FROM baton.jobs WHERE id = %s",
                               (job_id,), [(2,)])
            basic.GATES.setdefault("again", anyio.Event()).set()
            job = await wait_for_job(app, job_id, "completed")
            assert not worker.stopped.is_set()
    assert basic.CALLS["again"] == ["done"]
    assert job.attempted_by == worker.id
    [line] = [e for e in logs if e["event"] == "producer.reclaimed_running"]
    assert line["job_ids"] == [job_id]


async def _rows_become(dsn: str, query: str, params: Any, expected: list[tuple[Any, ...]]
                       ) -> None:
    """Read ``query`` until it returns ``expected`` (10 s at most)."""
    with anyio.fail_after(10):
        while sql_rows(dsn, query, params) != expected:
            await anyio.sleep(0.01)


@asynccontextmanager
async def _worker_through_proxy(
    app: baton.Baton, dsn: str, job: baton.JobSpec, key: str,
) -> AsyncIterator[tuple[Proxy, Worker, list[dict[str, Any]], int]]:
    """Enqueue ``job`` and run a worker, every connection through a proxy, until the job
    has started (its gate is ``key``); yield the proxy, the worker, the logs and the job's
    id. The heartbeat's long interval keeps its registration (whose bind also names the
    steps) away from the claims the tests hold, and the long poll interval keeps a
    polling claim from being the one held: claims come only when a test wakes the worker."""
    with Proxy(dsn) as proxy:
        app.dsn = proxy.dsn
        job_id = await app.enqueue(job)
        with capture_logs() as logs:
            async with running_worker(app, heartbeat_ttl=60.0, heartbeat_interval=30.0,
                                      poll_interval=60.0) as worker:
                with anyio.fail_after(10):
                    await basic.STARTED.setdefault(key, anyio.Event()).wait()
                yield proxy, worker, logs, job_id


def _claims_for(step: str) -> Predicate:
    """The bind of a claim: its parameters name the worker's steps."""
    return lambda kind, body: kind == b"B" and step.encode() in body


async def test_a_job_that_ends_before_the_reply_of_the_claim_taking_it_again_runs_once(
    app: baton.Baton, dsn: str,
) -> None:
    """A rescue makes a running job available and this worker's next claim takes it again.
    The first attempt ends and writes its outcome (to the row claimed again) before that
    claim's reply arrives: the job must not start a second time."""
    async with _worker_through_proxy(app, dsn, basic.blocker.new(key="late"), "late") as (
            proxy, worker, logs, job_id):
        proxy.hold_next_reply_after(_claims_for(basic.blocker.name))
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("UPDATE baton.jobs SET state = 'available', scheduled_at = "
                               "now() WHERE id = %s", (job_id,))  # as a rescue would
        worker.producers["default"].wake()
        await _rows_become(dsn, "SELECT attempt FROM baton.jobs WHERE id = %s", (job_id,),
                           [(2,)])
        basic.GATES["late"].set()
        await wait_for_job(app, job_id, "completed", timeout=30)
        proxy.release()
        with anyio.fail_after(10):
            while not [e for e in logs if e["event"] == "producer.reclaimed_running"]:
                await anyio.sleep(0.01)
    assert proxy.holding.is_set()
    assert basic.CALLS["late"] == ["done"]
    [line] = [e for e in logs if e["event"] == "producer.reclaimed_running"]
    assert line["job_ids"] == [job_id]
    assert not [e for e in logs if e["event"] in ("producer.reconciled", "job.crashed")]
    assert sql_rows(dsn, "SELECT state, attempt, attempted_by FROM baton.jobs WHERE id = %s",
                    (job_id,)) == [("completed", 2, worker.id)]


async def test_a_job_snoozed_at_once_while_a_claim_is_on_its_way_is_taken_by_it_quietly(
    app: baton.Baton, dsn: str,
) -> None:
    """A job that snoozes for 0 s is available again at once, so the claim on its way may
    take it, rightly: that is no rescue, and the job runs its next attempt from that claim
    with nothing logged or handed back."""
    async with _worker_through_proxy(app, dsn, basic.gated_snoozer.new(key="soon"),
                                     "soon") as (proxy, worker, logs, job_id):
        # The next claim reaches the server only once the snooze was written.
        proxy.hold_next_message(_claims_for(basic.gated_snoozer.name))
        worker.producers["default"].wake()
        with anyio.fail_after(10):
            while not proxy.holding.is_set():
                await anyio.sleep(0.01)
        basic.GATES["soon"].set()
        query = "SELECT state, snoozes FROM baton.jobs WHERE id = %s"
        await _rows_become(dsn, query, (job_id,), [("available", 1)])
        proxy.release()
        await _rows_become(dsn, query, (job_id,), [("completed", 1)])
    assert basic.CALLS["soon"] == [(1, 0), (1, 1)]
    assert not [e for e in logs if e["event"] in (
        "producer.reclaimed_running", "producer.reconciled", "job.crashed")]


async def test_a_job_whose_outcome_came_before_the_claim_taking_it_again_runs_again(
    app: baton.Baton, dsn: str,
) -> None:
    """The same, but the first attempt's outcome reaches the row before the claim commits:
    it is refused (the rescue made the job available), so the row the claim took must not
    stay executing with nothing to write it. It is handed back at once and runs again."""
    job_id = await app.enqueue(basic.blocker.new(key="early"))
    # The claim that takes the job again waits inside its statement, on a lock held here,
    # until the first attempt's outcome was refused. (An async connection: a statement
    # that waited for a lock while holding up the event loop could wait for the worker.)
    sql_rows(dsn, """
        CREATE FUNCTION public.hold_claim() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$;
        CREATE TRIGGER hold_claim AFTER UPDATE ON baton.jobs FOR EACH ROW
        WHEN (NEW.state = 'executing' AND NEW.attempt = 2)
        EXECUTE FUNCTION public.hold_claim()""")
    with capture_logs() as logs:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as lock, \
                running_worker(app, heartbeat_ttl=60.0) as worker:
            with anyio.fail_after(10):
                await basic.STARTED.setdefault("early", anyio.Event()).wait()
            await lock.execute("SELECT pg_advisory_lock(4242)")
            await lock.execute("UPDATE baton.jobs SET state = 'available', scheduled_at = "
                               "now() WHERE id = %s", (job_id,))
            worker.producers["default"].wake()
            await _rows_become(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = "
                               "'advisory' AND NOT granted", None, [(1,)])
            basic.GATES.setdefault("early", anyio.Event()).set()
            with anyio.fail_after(10):
                while not [e for e in logs if e["event"] == "job.outcome_dropped"]:
                    await anyio.sleep(0.01)
            await lock.execute("SELECT pg_advisory_unlock(4242)")
            # Well before the periodic reconcile (10 s) would hand it back.
            job = await wait_for_job(app, job_id, "completed", timeout=5)
    assert basic.CALLS["early"] == ["done", "done"]
    assert (job.attempt, job.attempted_by) == (2, worker.id)
    [line] = [e for e in logs if e["event"] == "producer.reconciled"]
    assert line["job_ids"] == [job_id]


async def test_the_leader_never_rescues_its_own_running_jobs(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.blocker.new(key="own"))
    async with running_worker(app, heartbeat_ttl=60.0) as worker:
        with anyio.fail_after(10):
            await basic.STARTED.setdefault("own", anyio.Event()).wait()
        # Its heartbeat stalled long enough for its row to expire.
        sql_rows(app.dsn, "UPDATE baton.worker_registry SET expires_at = now() - interval "
                 "'1 minute' WHERE id = %s", (worker.id,))
        quick = WorkerSettings(heartbeat_ttl=0.001)
        assert await Worker(app, quick, worker_id=worker.id).maintenance.rescue() == 0
        assert (await app.get_job(job_id)).state is JobState.EXECUTING
        # Another process's leader does rescue it, and this worker takes it again: still
        # one run, whether the claim's reply is read before the first attempt ends or after.
        assert await Worker(app, quick, worker_id="other").maintenance.rescue() == 1
        await _rows_become(app.dsn, "SELECT attempt FROM baton.jobs WHERE id = %s",
                           (job_id,), [(2,)])
        basic.GATES.setdefault("own", anyio.Event()).set()
        await wait_for_job(app, job_id, "completed")
    assert basic.CALLS["own"] == ["done"]
