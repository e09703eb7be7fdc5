"""The worker off the happy path: lost claim replies, lost wake-ups, unknown steps, steps
that block the event loop, plain def steps past their timeout or the shutdown grace."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from typing import Any

import anyio
import psycopg

import baton
from baton.logs import capture_logs
from baton.testing import (
    FAST_SETTINGS,
    running_worker,
    wait_for_job,
    wait_for_jobs,
    wait_for_workflow,
)
from baton.worker.executor import FetchedJob
from tests.apps import basic
from tests.helpers import reap, sql_rows, worker_process


def unstarted_worker(app: baton.Baton, **settings: Any) -> baton.Worker:
    """A worker built but not started, so a test can patch it before its first fetch."""
    return baton.Worker(app, baton.WorkerSettings(**{**FAST_SETTINGS, **settings}))


async def test_unknown_step_stays_for_a_worker_that_knows_it(app: baton.Baton) -> None:
    missing = "tests.apps.nowhere.missing"
    bad = baton.JobSpec(step=missing, args={})
    [bad_id, good_id] = await app.enqueue_many([bad, basic.echo.new(value="fine")])
    await app.enqueue(basic.echo.new(value="idle").options(queue="elsewhere"))
    async with running_worker(app):
        await wait_for_job(app, good_id, "completed")
        status = await app.query.status()
    # The fetch that took the later job passed over it: it was never claimed.
    job = await app.get_job(bad_id)
    assert (job.state, job.attempt, job.errors) == ("available", 0, [])
    assert [(u.queue, u.step, u.jobs) for u in status.unrunnable] == [
        ("default", missing, 1), ("elsewhere", basic.echo.name, 1)]

    async def found() -> None:
        basic.CALLS["found"].append(1)

    app.step(name=missing)(found)  # a newer deploy knows the step
    try:
        async with running_worker(app):
            await wait_for_job(app, bad_id, "completed")
    finally:
        del app.steps[missing]
    assert basic.CALLS["found"] == [1]


async def test_claim_with_lost_reply_is_handed_back(app: baton.Baton) -> None:
    """The claim commits but its reply is lost: the jobs go back without losing an attempt,
    and run once."""
    ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(20)])
    lost: list[int] = []
    worker = unstarted_worker(app)
    producer = worker.producers["default"]
    real = producer.fetch

    async def fetch_losing_reply(demand: int) -> list[FetchedJob]:
        jobs = await real(demand)  # committed: the rows are executing under this worker
        if lost or not jobs:
            return jobs
        for job in jobs:  # the reply never arrived: this worker knows of none of them
            producer.running.pop(job.id)
        lost.extend(job.id for job in jobs)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    producer.fetch = fetch_losing_reply  # type: ignore[method-assign]
    async with worker:
        await wait_for_jobs(app, ids, ["completed"])
    assert lost
    for job_id in lost:
        assert (await app.get_job(job_id)).attempt == 1
    assert sorted(basic.CALLS["echo"]) == list(range(20))


async def test_jobs_held_in_the_table_but_not_here_are_reconciled(app: baton.Baton) -> None:
    """Rows marked executing under a live worker that does not run them are handed back by
    its periodic reconcile; the rescue would never touch them (its heartbeat is fresh)."""
    job_id = await app.enqueue(basic.echo.new(value="stray"))
    async with running_worker(app, queues={"other": 1}, reconcile_interval=0.05) as worker:
        sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'executing', attempt = 1, "
                          "attempted_by = %s, queue = 'other' WHERE id = %s",
                 (worker.id, job_id))
        job = await wait_for_job(app, job_id, "completed")
    assert job.attempt == 1 and basic.CALLS["echo"] == ["stray"]


async def test_wake_during_a_fetch_leads_to_another_fetch(app: baton.Baton) -> None:
    """A wake-up that arrives while a fetch is in flight is not overwritten by its result:
    with the poll an hour away, only the wake-up can start the job."""
    inserted: list[int] = []
    worker = unstarted_worker(app, poll_interval=3600)
    producer = worker.producers["default"]
    real = producer.fetch

    async def fetch_then_insert(demand: int) -> list[FetchedJob]:
        jobs = await real(demand)
        if not inserted:  # an insert commits while this fetch's reply travels back
            rows = sql_rows(app.dsn, "INSERT INTO baton.jobs (step, args) "
                                     "VALUES (%s, '{\"value\": 1}') RETURNING id",
                            (basic.echo.name,))
            inserted.append(rows[0][0])
            producer.wake()  # its notification, delivered meanwhile
        return jobs

    producer.fetch = fetch_then_insert  # type: ignore[method-assign]
    async with worker:
        while not inserted:
            await anyio.sleep(0.01)
        await wait_for_job(app, inserted[0], "completed", timeout=30)


async def test_heartbeat_beats_while_a_step_blocks_the_loop(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.blocks_and_checks.new(seconds=2.5))  # ttl is 1 s
    with capture_logs() as logs:
        async with running_worker(app, loop_blocked_after=0.5):
            job = await wait_for_job(app, job_id, "completed")
    assert basic.CALLS["alive"] == [True]
    assert job.attempt == 1 and job.errors == []
    blocked = [e for e in logs if e["event"] == "worker.loop_blocked"]
    assert blocked and blocked[0]["step"] == basic.blocks_and_checks.name
    assert blocked[0]["job_id"] == job_id
    assert any(e["event"] == "worker.loop_unblocked" for e in logs)


async def test_async_step_past_its_timeout_is_recorded(app: baton.Baton) -> None:
    job_id = await app.enqueue(basic.blocks_loop.new(seconds=0.8))
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "completed")
    [entry] = job.errors
    assert entry["kind"] == "timeout_not_enforced" and entry["enforced"] is False
    assert "blocked the event loop" in entry["error"]


def _overlaps(spans: list[tuple[int, float, float]]) -> list[Any]:
    ordered = sorted(spans, key=lambda s: s[1])
    return [(a, b) for a, b in itertools.pairwise(ordered) if b[1] < a[2]]


async def test_thread_past_its_timeout_keeps_its_slot(app: baton.Baton) -> None:
    """Attempt 2 of a plain def step never starts while attempt 1's thread still runs."""
    job_id = await app.enqueue(basic.slow_thread.new(key="t"))
    again = basic.thread_gate("t:again")
    async with running_worker(app):
        started = basic.STARTED_THREADS.setdefault("t", __import__("threading").Event())
        await anyio.to_thread.run_sync(started.wait, 10)
        # Five times the timeout: the old worker started attempt 2 after 0.2 s.
        assert not await anyio.to_thread.run_sync(again.wait, 1.0)
        job = await app.get_job(job_id)
        assert (job.state, job.attempt) == ("executing", 1)
        basic.thread_gate("t").set()
        job = await wait_for_job(app, job_id, "completed")
    assert [s[0] for s in sorted(basic.SPANS["t"], key=lambda s: s[1])] == [1, 2]
    assert _overlaps(basic.SPANS["t"]) == []
    [entry] = job.errors
    assert entry["kind"] == "timeout" and entry["enforced"] is False
    assert "cannot be stopped" in entry["error"]


async def test_shutdown_waits_for_a_thread_instead_of_handing_it_back(
    app: baton.Baton,
) -> None:
    """Past the grace an embedded worker keeps a running thread's job (and its heartbeat)
    until the thread returns: the job is never handed back while its body still runs."""
    job_id = await app.enqueue(basic.slow_thread.new(key="s").options(timeout=None))
    states: list[str] = []
    with capture_logs() as logs:
        async with running_worker(app, shutdown_grace=0.1) as worker:
            started = basic.STARTED_THREADS.setdefault("s", __import__("threading").Event())
            await anyio.to_thread.run_sync(started.wait, 10)
            worker.stop()
            while not any(e["event"] == "worker.waiting_for_threads" for e in logs):
                await anyio.sleep(0.01)
            states.append((await app.get_job(job_id)).state)
            basic.thread_gate("s").set()
    job = await app.get_job(job_id)
    assert states == ["executing"]
    assert (job.state, job.attempt) == ("completed", 1)
    assert [s[0] for s in basic.SPANS["s"]] == [1]


async def test_step_sent_back_by_its_gate_is_released_by_its_dependency(
    flows_app: baton.Baton,
) -> None:
    """A step that starts before its dependency completed (here: retried by hand while
    held) goes back to held and is released by that completion, not by maintenance."""
    from baton.testing import wait_for_workflow
    from tests.apps import flows

    wf = baton.Workflow("gated")
    wf.add("first", flows.hold.new(key="first"))
    wf.add("second", flows.value.new(v=2), deps=["first"])
    wf_id = await flows_app.insert(wf)
    [(first_id, second_id)] = sql_rows(
        flows_app.dsn, "SELECT max(id) FILTER (WHERE workflow_step = 'first'), "
        "max(id) FILTER (WHERE workflow_step = 'second') FROM baton.jobs")
    with capture_logs() as logs:
        # Maintenance (the stager and the sweep) runs once at start, then not for an hour.
        async with running_worker(flows_app, maintenance_interval=3600):
            await wait_for_job(flows_app, first_id, "executing")
            assert await flows_app.retry(second_id)
            while not any(e["event"] == "job.held" and e["job_id"] == second_id
                          for e in logs):
                await anyio.sleep(0.01)
            assert (await flows_app.get_job(second_id)).state == "pending"
            flows.HOLDS.setdefault("first", anyio.Event()).set()
            info = await wait_for_workflow(flows_app, wf_id, timeout=30)
    assert info.state == "completed"
    assert await flows_app.result(wf_id, "second") == 2


def test_a_step_named_after_main_warns_once(tmp_path: Any) -> None:
    """A job built in a script for a step defined in that script would wait forever for a
    `baton worker` process, which knows the step under its module's name."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "import baton\n"
        "app = baton.Baton(dsn='postgresql://unused/db')\n"
        "@app.step\n"
        "async def hello(x: int) -> int:\n"
        "    return x\n"
        "@app.step(name='script.named')\n"
        "async def named(x: int) -> int:\n"
        "    return x\n"
        "hello.new(x=1)\n"
        "hello.new(x=2)\n"
        "named.new(x=3)\n")
    done = subprocess.run([sys.executable, "-W", "always", str(script)], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stderr.count("StepNameWarning") == 1
    assert "'__main__.hello'" in done.stderr and "@app.step(name=" in done.stderr


async def test_lost_claim_reply_just_before_a_stop_is_handed_back(app: baton.Baton) -> None:
    """A stop right after a claim whose reply was lost: the jobs go back with their attempt
    at shutdown, not left executing for a rescue that would count it."""
    ids: list[int] = []
    worker = unstarted_worker(app)
    producer = worker.producers["default"]
    real = producer.fetch

    async def fetch_then_stop(demand: int) -> list[FetchedJob]:
        jobs = await real(demand)
        if not jobs:
            return jobs
        for job in jobs:
            producer.running.pop(job.id)
        worker.stop()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    producer.fetch = fetch_then_stop  # type: ignore[method-assign]
    async with worker:
        ids.extend(await app.enqueue_many([basic.echo.new(value=i) for i in range(5)]))
        await worker.stopped.wait()
    jobs = [await app.get_job(job_id) for job_id in ids]
    assert [(j.state, j.attempt) for j in jobs] == [("available", 0)] * 5
    assert basic.CALLS["echo"] == []


async def test_a_later_outcome_of_one_job_in_a_batch_wins(app: baton.Baton) -> None:
    """A job snoozed, then run again here before the snooze's write was known to have
    landed: the batch holds two outcomes of it, and only the latest is written."""
    from baton.job import JobState
    from baton.worker.completer import Completer
    from baton.worker.executor import Outcome

    [job_id] = await app.enqueue_many([basic.echo.new(value=1)])
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'executing', attempt = 1, "
                      "attempted_by = 'w', attempted_at = now()")
    completer = Completer(app, "w", flush_interval=0, flush_max=10, max_pending=100)
    job = FetchedJob(job_id, basic.echo.name, {}, None, "default", 1, 7, 0, 0, None, None,
                     None)
    completer.push(Outcome(job, JobState.AVAILABLE, delay=0.0, snooze=True))
    completer.push(Outcome(job, JobState.COMPLETED))
    await completer.flush_once()
    assert completer.pending == []
    assert sql_rows(app.dsn, "SELECT state, snoozes FROM baton.jobs") == [("completed", 0)]


async def test_one_write_of_plain_completions_and_other_outcomes_applies_each(
        app: baton.Baton) -> None:
    """Plain completions go to the finish as ids, other outcomes as JSON rows: one batch of
    both writes every outcome, the latest of a job's two, reports the one whose job was
    cancelled meanwhile, and wakes the queue of the job made available (ids past 2**31)."""
    from baton.job import JobState
    from baton.worker.completer import Completer
    from baton.worker.executor import Outcome

    sql_rows(app.dsn, "SELECT setval('baton.jobs_id_seq', 3000000000)")
    ids = await app.enqueue_many([basic.echo.new(value=i) for i in range(6)])
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'executing', attempt = 1, "
                      "attempted_by = 'w', attempted_at = now()")
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'cancelled', finalized_at = now() "
                      "WHERE id = %s", (ids[4],))
    woken: list[set[str]] = []
    completer = Completer(app, "w", flush_interval=0, flush_max=10, max_pending=100,
                          on_available=woken.append)
    jobs = [FetchedJob(i, basic.echo.name, {}, None, "default", 1, 7, 0, 0, None, None, None)
            for i in ids]
    completer.push(Outcome(jobs[0], JobState.COMPLETED))
    completer.push(Outcome(jobs[1], JobState.RETRYABLE, delay=30.0, error={"error": "x"}))
    completer.push(Outcome(jobs[2], JobState.COMPLETED))
    completer.push(Outcome(jobs[3], JobState.AVAILABLE, delay=0.0, snooze=True))
    completer.push(Outcome(jobs[4], JobState.COMPLETED))
    completer.push(Outcome(jobs[5], JobState.COMPLETED))
    completer.push(Outcome(jobs[5], JobState.RETRYABLE, delay=30.0, error={"error": "y"}))
    with capture_logs() as logs:
        await completer.flush_once()
    assert completer.pending == []
    assert sql_rows(app.dsn, "SELECT id, state, finalized_at IS NOT NULL, snoozes, "
                             "jsonb_array_length(errors) FROM baton.jobs ORDER BY id") == [
        (ids[0], "completed", True, 0, 0), (ids[1], "retryable", False, 0, 1),
        (ids[2], "completed", True, 0, 0), (ids[3], "available", False, 1, 0),
        (ids[4], "cancelled", True, 0, 0), (ids[5], "retryable", False, 0, 1)]
    assert ids[0] > 2**31 and woken == [{"default"}]
    assert [e["job_id"] for e in logs if e["event"] == "job.outcome_dropped"] == [ids[4]]


async def test_cancel_while_its_claim_is_still_loading_is_kept(
    flows_app: baton.Baton,
) -> None:
    """A cancel that reaches the worker after the claim but before the job joined the
    waiting line (its gate still loading) keeps the step from ever starting."""
    from tests.apps import flows

    wf = baton.Workflow("cancel-early")
    wf.add("only", flows.recorded.new(key="early"))
    await flows_app.insert(wf)
    [(job_id,)] = sql_rows(flows_app.dsn, "SELECT id FROM baton.jobs")
    loading = anyio.Event()
    go_on = anyio.Event()
    worker = unstarted_worker(flows_app)
    real = worker.engine.claimed

    async def slow_gates(conn: Any, jobs: list[FetchedJob]) -> list[dict[str, Any]]:
        loading.set()
        await go_on.wait()
        return await real(conn, jobs)

    worker.engine.claimed = slow_gates  # type: ignore[method-assign]
    async with worker:
        await loading.wait()
        assert await flows_app.cancel(job_id)
        while job_id not in worker.producers["default"]._cancelled:
            await anyio.sleep(0.01)
        go_on.set()
        while worker.producers["default"].running:
            await anyio.sleep(0.01)
    assert "early" not in flows.CALLS
    assert (await flows_app.get_job(job_id)).state == "cancelled"


async def test_a_result_kept_before_a_kill_is_not_paid_for_twice(
    app: baton.Baton, tmp_path: Path
) -> None:
    """SIGKILL between a step's body and its completion: the result was committed ahead
    of the completion, so the attempt after the rescue returns it without running again."""
    from tests.apps import procs

    procs.app.dsn = app.dsn
    calls = tmp_path / "calls"
    wf = baton.Workflow("paid-kill")
    wf.add("call", procs.paid.new(path=str(calls)))
    await app.insert(wf)
    # Holding the workflow's lock stops the completion, not the result written before it.
    async with await psycopg.AsyncConnection.connect(app.dsn) as holder:
        await holder.execute("SELECT id FROM baton.workflows WHERE id = %s FOR UPDATE",
                             (wf.id,))
        proc = worker_process(app.dsn, "tests.apps.procs:app", "--heartbeat-interval", "0.2",
                              "--heartbeat-ttl", "1")
        try:
            with anyio.fail_after(30):
                while not sql_rows(app.dsn, "SELECT has_result FROM baton.nodes "
                                   "WHERE workflow_id = %s", (wf.id,))[0][0]:
                    await anyio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            reap(proc)
        await holder.rollback()
    [(state,)] = sql_rows(app.dsn, "SELECT state FROM baton.jobs")
    assert state == "executing"  # the completion never committed
    async with running_worker(procs.app):  # rescues the job, then runs it again
        info = await wait_for_workflow(procs.app, wf.id)
    await procs.app.close()
    assert info.state == "completed"
    assert calls.read_text().splitlines() == ["called"]  # paid once
    assert await app.result(wf.id, "call") == {"answer": 42}
    assert sql_rows(app.dsn, "SELECT attempt FROM baton.jobs") == [(2,)]
