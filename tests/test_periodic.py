"""Periodic jobs against a real PostgreSQL: one job per tick whoever leads, a missed tick
enqueued late once, schedules in `baton status`, and clear errors at registration."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import anyio
import pytest

import baton
from baton import periodic
from baton.cli import main
from baton.logs import capture_logs
from baton.testing import running_worker
from tests.apps import periodic as periodic_app
from tests.conftest import bound
from tests.helpers import reap, sql_rows, worker_process

BEAT = periodic_app.beat.name
EVERY_SECOND = "* * * * * *"


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(periodic_app.app, dsn) as bound_app:
        yield bound_app


def ticks(dsn: str, schedule: str = BEAT) -> list[dict[str, Any]]:
    """The meta of every job the schedule enqueued, by tick."""
    rows = sql_rows(dsn, "SELECT meta FROM baton.jobs WHERE meta->>'schedule' = %s "
                         "ORDER BY meta->>'tick'", (schedule,))
    return [meta for (meta,) in rows]


async def wait_for_ticks(dsn: str, count: int, *, after: str = "", timeout: float = 30.0
                         ) -> list[dict[str, Any]]:
    """Return the schedule's jobs once ``count`` of them have a tick later than ``after``."""
    with anyio.fail_after(timeout):
        while True:
            found = ticks(dsn)
            if len([m for m in found if m["tick"] > after]) >= count:
                return found
            await anyio.sleep(0.05)


def assert_one_job_per_tick(metas: list[dict[str, Any]], expression: str = EVERY_SECOND
                            ) -> None:
    """Every tick has at most one job, and none is skipped silently: each job's tick is the
    tick after the previous job's, or its meta says it stands for the ticks missed since
    that one."""
    tick_times = [datetime.fromisoformat(m["tick"]) for m in metas]
    assert len(set(tick_times)) == len(tick_times), metas
    cron = periodic.cron(expression, "UTC")
    for before, meta in zip(tick_times, metas[1:], strict=False):
        expected = cron.following(before)
        assert expected is not None
        tick = datetime.fromisoformat(meta["tick"])
        if tick != expected:
            assert datetime.fromisoformat(meta["missed_since"]) == expected, metas
        else:
            assert "missed_since" not in meta, metas


async def test_every_second_ticks_once_across_two_workers(app: baton.Baton, dsn: str) -> None:
    async with running_worker(app), running_worker(app):
        metas = await wait_for_ticks(dsn, 3)
    assert_one_job_per_tick(ticks(dsn))
    assert all(m["tick"].endswith("+00:00") for m in metas)
    [(args, queue)] = sql_rows(dsn, "SELECT DISTINCT args, queue FROM baton.jobs "
                                    "WHERE step = %s", (BEAT,))
    assert (args, queue) == ({"label": "every second"}, "default")
    # The schedule's row names the latest tick and its job.
    [(last_tick, last_job, state)] = sql_rows(dsn, """
        SELECT s.last_tick, s.last_job_id, j.meta->>'tick' = to_char(
            s.last_tick AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')
        FROM baton.schedules s JOIN baton.jobs j ON j.id = s.last_job_id
        WHERE s.name = %s""", (BEAT,))
    assert last_tick is not None and last_job is not None and state is True


async def test_killed_leader_neither_double_ticks_nor_skips_silently(
        app: baton.Baton, dsn: str) -> None:
    """A `baton worker` process leads (a lease of 3 s) and is SIGKILLed: the worker that
    takes over enqueues the latest tick missed meanwhile, once, saying since when ticks
    were missed, and goes on ticking."""
    leader = worker_process(dsn, "tests.apps.periodic:app", "--leader-ttl", "3",
                            "--maintenance-interval", "0.05", "--heartbeat-interval", "0.1",
                            "--heartbeat-ttl", "2", "--poll-interval", "0.2")
    try:
        with anyio.fail_after(30):
            while not sql_rows(dsn, "SELECT 1 FROM baton.leader WHERE leader_id LIKE %s",
                               (f"%:{leader.pid}:%",)):
                await anyio.sleep(0.05)
        await wait_for_ticks(dsn, 1)
        async with running_worker(app):
            [(leading,)] = sql_rows(dsn, "SELECT leader_id FROM baton.leader")
            leader.send_signal(signal.SIGKILL)
            leader.wait()
            assert f":{leader.pid}:" in leading  # it led when it was killed
            [(killed_at,)] = sql_rows(dsn, "SELECT to_char(now() AT TIME ZONE 'UTC', "
                                           "'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')")
            metas = await wait_for_ticks(dsn, 3, after=killed_at)
    finally:
        reap(leader)
    assert_one_job_per_tick(metas)
    # The lease outlived the leader by more than a tick: a job stands for those missed.
    late = [m for m in metas if "missed_since" in m and m["tick"] > killed_at]
    assert late and all(m["missed_since"] < m["tick"] for m in late), metas


async def test_only_the_latest_missed_tick_is_enqueued(app: baton.Baton, dsn: str) -> None:
    """With the clock given: ticks not yet due wait, several missed ticks make one job,
    and two leaders ticking at once enqueue it once."""
    hourly = baton.Baton()

    @hourly.step(name="tests.hourly", cron="0 * * * *", timezone="Europe/Paris")
    async def hourly_step() -> None: ...

    async with bound(hourly, dsn):
        workers = [baton.Worker(hourly), baton.Worker(hourly)]
        scheduler = workers[0].scheduler
        await scheduler.define()
        [(first,)] = sql_rows(dsn, "SELECT next_tick FROM baton.schedules")
        assert (first.minute, first.second) == (0, 0)
        until = await scheduler.tick(now=first - timedelta(minutes=1))
        assert until is not None and 59 <= until <= 60
        assert ticks(dsn, "tests.hourly") == []

        later = first + timedelta(hours=3, minutes=20)
        await scheduler.tick(now=later)
        await scheduler.tick(now=later)  # nothing more is due
        [meta] = ticks(dsn, "tests.hourly")
        assert datetime.fromisoformat(meta["tick"]) == first + timedelta(hours=3)
        assert datetime.fromisoformat(meta["missed_since"]) == first
        [(next_tick,)] = sql_rows(dsn, "SELECT next_tick FROM baton.schedules")
        assert next_tick == first + timedelta(hours=4)

        at_once = first + timedelta(hours=4, seconds=1)
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(worker.scheduler.tick, at_once)
        metas = ticks(dsn, "tests.hourly")
        assert len(metas) == 2 and "missed_since" not in metas[1]
        assert datetime.fromisoformat(metas[1]["tick"]) == first + timedelta(hours=4)


async def test_a_tick_that_fails_does_not_hold_up_the_others(dsn: str) -> None:
    app = baton.Baton(dsn)
    for name in ("broken", "sound"):
        app.schedule(baton.JobSpec(step="elsewhere.step"), cron="0 * * * *", name=name)
    worker = baton.Worker(app)
    try:
        await worker.scheduler.define()
        sql_rows(dsn, "UPDATE baton.schedules SET queue = '' WHERE name = 'broken'")
        [(first,)] = sql_rows(dsn, "SELECT min(next_tick) FROM baton.schedules")
        with capture_logs() as logs:
            await worker.scheduler.tick(now=first)
        assert [len(ticks(dsn, name)) for name in ("broken", "sound")] == [0, 1]
        [failed] = [e for e in logs if e["event"] == "schedule.tick_failed"]
        assert failed["schedule"] == "broken" and "jobs_queue_length" in failed["error"]
        [(next_tick,)] = sql_rows(dsn, "SELECT next_tick FROM baton.schedules "
                                       "WHERE name = 'broken'")
        assert next_tick == first  # tried again at the next pass
    finally:
        await app.close()


async def test_a_unique_periodic_job_skips_ticks_while_its_last_run_is_unfinished(
        dsn: str) -> None:
    app = baton.Baton(dsn)
    app.schedule(baton.JobSpec(step="elsewhere.sync", args={"n": 1}, tags=("nightly",),
                               unique=True), cron="0 * * * *", name="sync")
    scheduler = baton.Worker(app).scheduler
    try:
        await scheduler.define()
        [(first,)] = sql_rows(dsn, "SELECT next_tick FROM baton.schedules")
        await scheduler.tick(now=first)
        with capture_logs() as logs:
            await scheduler.tick(now=first + timedelta(hours=1))  # the first job waits
        [(job_id, tags)] = sql_rows(dsn, "SELECT id, tags FROM baton.jobs")
        assert tags == ["nightly"]
        assert [e["event"] for e in logs if e["event"].startswith("schedule.")] == [
            "schedule.skipped"]
        [(last_tick, last_job)] = sql_rows(dsn, "SELECT last_tick, last_job_id "
                                                "FROM baton.schedules")
        assert (last_tick, last_job) == (first + timedelta(hours=1), job_id)

        sql_rows(dsn, "UPDATE baton.jobs SET state = 'completed', finalized_at = now()")
        await scheduler.tick(now=first + timedelta(hours=2))
        metas = ticks(dsn, "sync")
        assert [datetime.fromisoformat(m["tick"]) for m in metas] == [
            first, first + timedelta(hours=2)]
    finally:
        await app.close()


async def test_definitions_keep_or_restart_the_next_tick(dsn: str) -> None:
    """A worker that starts with the same expression keeps the next tick (a tick missed
    while no worker ran is still enqueued); a changed expression starts from now; a schedule
    no live worker defines is not ticked."""

    def define(expression: str) -> baton.Baton:
        app = baton.Baton(dsn)
        app.schedule(baton.JobSpec(step="elsewhere.step"), cron=expression, name="nightly")
        return app

    first, same, changed = define("0 3 * * *"), define("0 3 * * *"), define("0 4 * * *")
    logged = []
    for app in (first, same, changed):
        try:
            with capture_logs() as logs:
                await baton.Worker(app).scheduler.define()
            logged.append([e["event"] for e in logs if e["event"].startswith("schedule.")])
            [(next_tick, cron)] = sql_rows(
                dsn, "SELECT next_tick, cron FROM baton.schedules WHERE name = 'nightly'")
            if app is first:
                sql_rows(dsn, "UPDATE baton.schedules SET next_tick = next_tick - "
                              "interval '2 days'")
                kept = next_tick - timedelta(days=2)
            elif app is same:
                assert next_tick == kept
            else:
                assert (next_tick.hour, cron) == (4, "0 4 * * *")
        finally:
            await app.close()
    assert logged == [["schedule.created"], [], ["schedule.changed"]]
    worker = baton.Worker(changed)
    try:
        sql_rows(dsn, "UPDATE baton.schedules SET live_until = now() - interval '1 second'")
        await worker.scheduler.tick(now=next_tick + timedelta(days=3))
        assert ticks(dsn, "nightly") == []
    finally:
        await changed.close()


def test_status_lists_schedules(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def tick_once() -> list[str]:
        async with bound(periodic_app.app, dsn) as app, running_worker(app):
            await wait_for_ticks(dsn, 1)
            return [s.name for s in await app.query.schedules()]

    names = anyio.run(tick_once)
    assert main(["status", "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    for name in (BEAT, "report-hourly", "report-daily"):
        assert name in out
    assert "Europe/Paris" in out and "30 6 * * *" in out and "next tick" in out
    assert main(["status", "--dsn", dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in data["schedules"]}
    assert names == sorted(by_name)
    assert by_name[BEAT]["last_tick"] is not None and "live" in by_name[BEAT]
    assert by_name["report-daily"]["timezone"] == "America/New_York"


def test_bad_schedules_raise_clear_errors() -> None:
    app = baton.Baton("postgresql://unused")

    async def job(n: int = 0) -> None: ...

    with pytest.raises(baton.ScheduleError, match=r"invalid cron expression '61 \* \* \* \*' "
                                                  r"\(Bad minute\); use five fields"):
        app.step(name="t.minute", cron="61 * * * *")(job)
    with pytest.raises(baton.ScheduleError, match=r"'t\.words'.*invalid cron expression"):
        app.step(name="t.words", cron="every day")(job)
    with pytest.raises(baton.ScheduleError, match="unknown time zone 'Europe/Pariss': use an "
                                                  "IANA name"):
        app.step(name="t.zone", cron="0 * * * *", timezone="Europe/Pariss")(job)
    with pytest.raises(baton.ScheduleError, match=r"never matches|Bad day-of-month"):
        app.step(name="t.never", cron="0 0 31 2 *")(job)
    with pytest.raises(baton.ArgsError, match="n: Input should be a valid integer"):
        app.step(name="t.args", cron="0 * * * *", args={"n": "many"})(job)
    with pytest.raises(baton.StepError, match="pass cron= too"):
        app.step(name="t.nocron", args={"n": 1})(job)
    assert set(app.steps) & {"t.minute", "t.words", "t.zone", "t.never", "t.args"} == set()
    assert app.schedules == {}

    step = app.step(name="t.ok", cron="*/5 * * * *", timezone="Europe/Paris")(job)
    with pytest.raises(baton.ScheduleError, match="already registered; pass name="):
        app.schedule(step.new(n=2), cron="0 * * * *")
    app.schedule(step.new(n=2), cron="0 * * * *", name="t.ok hourly")
    with pytest.raises(baton.ScheduleError, match="leave scheduled_at out"):
        app.schedule(step.new().options(schedule_in=60), cron="0 * * * *", name="t.later")
    assert sorted(app.schedules) == ["t.ok", "t.ok hourly"]
