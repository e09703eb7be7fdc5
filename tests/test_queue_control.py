"""Queue control: pause, resume and scale, obeyed by every worker, in Python and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import pytest

import baton
from baton.cli import main
from baton.testing import running_worker, wait_for_jobs
from tests.apps import basic, procs
from tests.helpers import reap, sql_rows, worker_process

PROCS_APP = "tests.apps.procs:app"


async def until(check: Callable[[], Any], *, timeout: float = 30.0) -> Any:
    """Poll ``check`` (a read of the table) until it returns something true; return it."""
    with anyio.fail_after(timeout):
        while not (value := check()):
            await anyio.sleep(0.02)
        return value


def states(dsn: str, ids: list[int]) -> list[str]:
    return [state for (state,) in sql_rows(
        dsn, "SELECT state FROM baton.jobs WHERE id = ANY(%s) ORDER BY id", (ids,))]


def db_now(dsn: str) -> datetime:
    [(now,)] = sql_rows(dsn, "SELECT now()")
    assert isinstance(now, datetime)
    return now


def counts(dsn: str, queue: str) -> dict[str, int]:
    return {state: int(n) for state, n in sql_rows(
        dsn, "SELECT state, count(*) FROM baton.jobs WHERE queue = %s GROUP BY state",
        (queue,))}


async def test_a_pause_is_obeyed_by_every_worker_within_a_second(
        procs_app: baton.Baton, dsn: str) -> None:
    # Each worker also serves a queue of its own: a job there shows it is up and fetching.
    workers = [worker_process(dsn, PROCS_APP, "--queues", f"default=2,{own}=1")
               for own in ("own_a", "own_b")]
    try:
        ready = [await procs_app.enqueue(procs.quick.new(n=0).options(queue=own))
                 for own in ("own_a", "own_b")]
        await wait_for_jobs(procs_app, ready, ["completed"])

        control = await procs_app.pause_queue("default")
        assert (control.name, control.paused, control.concurrency) == ("default", True, None)
        bound = control.updated_at + timedelta(seconds=1)
        early = await procs_app.enqueue_many([procs.quick.new(n=i) for i in range(10)])
        await until(lambda: db_now(dsn) > bound)
        late = await procs_app.enqueue_many([procs.quick.new(n=i) for i in range(10)])
        # Inserted after the jobs above: once each worker ran its own, it was told of them.
        after = [await procs_app.enqueue(procs.quick.new(n=1).options(queue=own))
                 for own in ("own_a", "own_b")]
        await wait_for_jobs(procs_app, after, ["completed"])

        claimed = sql_rows(dsn, "SELECT id, attempted_at FROM baton.jobs "
                                "WHERE queue = 'default' AND attempted_at IS NOT NULL")
        assert [job_id for job_id, at in claimed if at > bound] == []
        assert states(dsn, late) == ["available"] * 10  # accepted, and kept waiting
        assert set(states(dsn, early)) <= {"available", "completed"}

        await procs_app.resume_queue("default")
        await wait_for_jobs(procs_app, early + late, ["completed"])
    finally:
        for proc in workers:
            reap(proc)


async def test_a_pause_survives_a_restart_and_resume_drains(
        procs_app: baton.Baton, dsn: str) -> None:
    ids = await procs_app.enqueue_many([procs.quick.new(n=i) for i in range(20)])
    assert (await procs_app.pause_queue("default")).paused
    proc = worker_process(dsn, PROCS_APP, "--queues", "default=4,own=1")
    try:
        ready = await procs_app.enqueue(procs.quick.new(n=0).options(queue="own"))
        await wait_for_jobs(procs_app, [ready], ["completed"])  # it runs, and fetched...
        assert states(dsn, ids) == ["available"] * 20  # ...nothing of the paused queue
        [info] = [q for q in await procs_app.list_queues() if q.name == "default"]
        assert info.paused and info.counts == {"available": 20}
        assert [w.concurrency for w in info.workers] == [4]

        assert not (await procs_app.resume_queue("default")).paused
        await wait_for_jobs(procs_app, ids, ["completed"])
    finally:
        reap(proc)


async def test_scale_changes_how_many_run_at_once(app: baton.Baton, dsn: str) -> None:
    ids = await app.enqueue_many(
        [basic.counted.new(key="scale", gate=f"g{i}") for i in range(8)])
    async with running_worker(app, queues={"limited": 2}) as worker:
        producer = worker.producers["limited"]
        # Claimed (the table) and started (the step's own count): a claim starts a moment
        # after it commits.
        await until(lambda: counts(dsn, "limited").get("executing") == 2
                    and basic.RUNNING["scale"] == 2)

        await app.scale_queue("limited", 5)  # up: three more slots at once
        await until(lambda: counts(dsn, "limited").get("executing") == 5
                    and basic.RUNNING["scale"] == 5)
        assert counts(dsn, "limited")["available"] == 3
        assert worker.limiter.total_tokens == 5

        # Down: nothing is interrupted; slots end as their jobs finish. One job still runs.
        control = await app.scale_queue("limited", 2)
        assert control.concurrency == 2
        await until(lambda: producer.limit == 2)
        started = sorted(basic.GATES)
        assert len(started) == 5
        for gate in started[:4]:
            basic.GATES[gate].set()
        await until(lambda: counts(dsn, "limited") == {
            "completed": 4, "executing": 2, "available": 2} and basic.RUNNING["scale"] == 2)

        await app.scale_queue("limited", None)  # back to the worker's own setting (2)
        while len(basic.CALLS["scale"]) < 8:  # open each gate as its job starts
            for event in list(basic.GATES.values()):
                event.set()
            await anyio.sleep(0.02)
        await wait_for_jobs(app, ids, ["completed"])
    assert basic.PEAK["scale"] == 5
    assert sql_rows(dsn, "SELECT DISTINCT attempt FROM baton.jobs") == [(1,)]


async def test_a_lost_notification_heals_on_the_next_heartbeat(
        app: baton.Baton, dsn: str) -> None:
    await app.enqueue(basic.echo.new(value="known"))
    async with running_worker(app, queues={"default": 3}) as worker:
        producer = worker.producers["default"]
        # Written by hand, with no notification: the heartbeat's read finds it.
        sql_rows(dsn, "INSERT INTO baton.queues (name, paused, concurrency) "
                      "VALUES ('default', true, 7)")
        await until(lambda: producer.paused and producer.limit == 7, timeout=10)
        # A setting older than the one applied (a read overtaken by a change) is ignored.
        worker.queue_controls.on_message(
            {"action": "queue", "queue": "default", "paused": False, "concurrency": None,
             "version": 0})
        assert producer.paused and producer.limit == 7
        await app.resume_queue("default")
        await until(lambda: not producer.paused)


def test_sync_twins_and_errors(dsn: str) -> None:
    app = baton.Baton(dsn)
    try:
        app.enqueue_sync(basic.echo.new(value=1))
        assert app.pause_queue_sync("default").paused
        assert app.scale_queue_sync("default", 3).concurrency == 3
        control = app.resume_queue_sync("default")
        assert (control.paused, control.concurrency, control.version) == (False, 3, 3)
        [info] = app.list_queues_sync()
        assert (info.name, info.paused, info.concurrency, info.counts) == (
            "default", False, 3, {"available": 1})

        with pytest.raises(baton.QueueNotFound) as missing:
            app.pause_queue_sync("nowhere")
        assert missing.value.queue == "nowhere"
        assert "baton queue list" in str(missing.value)
        for bad in (0, -1, 10_001, 2.5, True, "3"):
            with pytest.raises(baton.OptionsError, match="concurrency"):
                app.scale_queue_sync("default", bad)  # type: ignore[arg-type]
        with pytest.raises(baton.OptionsError, match="queue"):
            app.pause_queue_sync("no such queue!")
        assert sql_rows(dsn, "SELECT name FROM baton.queues") == [("default",)]
    finally:
        app.close_sync()


async def test_a_queue_of_a_registered_step_is_known(app: baton.Baton) -> None:
    # No job or worker yet: the app's own steps name the queue.
    assert (await app.pause_queue("limited")).paused


def test_cli(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = baton.Baton(dsn)
    try:
        app.enqueue_sync(basic.echo.new(value=1))
    finally:
        app.close_sync()
    assert main(["queue", "pause", "default", "--dsn", dsn]) == 0
    assert capsys.readouterr().out.strip() == "queue default paused"
    assert main(["queue", "scale", "default", "6", "--dsn", dsn]) == 0
    assert capsys.readouterr().out.strip() == "queue default scaled to 6 at once per worker"
    assert main(["queue", "list", "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    assert header.split()[:4] == ["queue", "paused", "scale", "available"]
    assert row.split()[:4] == ["default", "yes", "6", "1"]
    assert main(["queue", "list", "--dsn", dsn, "--json"]) == 0
    [data] = json.loads(capsys.readouterr().out)
    assert (data["name"], data["paused"], data["concurrency"], data["counts"]) == (
        "default", True, 6, {"available": 1})
    assert main(["queue", "scale", "default", "default", "--dsn", dsn]) == 0
    assert capsys.readouterr().out.strip() == (
        "queue default scaled to each worker's own concurrency")
    assert main(["queue", "resume", "default", "--dsn", dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["paused"], data["concurrency"]) == (False, None)

    for argv, error in (
        (["queue", "pause", "nowhere"], "no queue named 'nowhere'"),
        (["queue", "scale", "default", "0"], "expected a whole number from 1"),
        (["queue", "scale", "default", "lots"], "expected a whole number from 1"),
        (["queue", "resume", "bad name"], "a queue name is"),
    ):
        assert main([*argv, "--dsn", dsn]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("baton: error: ") and error in captured.err, argv


async def test_a_worker_started_later_obeys_the_scale(app: baton.Baton) -> None:
    await app.scale_queue("limited", 7)
    async with running_worker(app, queues={"limited": 2, "default": 3}) as worker:
        assert worker.producers["limited"].limit == 7
        assert worker.producers["default"].limit == 3
        assert worker.limiter.total_tokens == 10


def test_bad_input_is_refused_before_connecting() -> None:
    app = baton.Baton("postgresql://baton@127.0.0.1:1/nowhere", connect_timeout=0.1)
    with pytest.raises(baton.OptionsError, match="concurrency"):
        app.scale_queue_sync("default", 0)
    with pytest.raises(baton.OptionsError, match="queue"):
        app.pause_queue_sync("")
