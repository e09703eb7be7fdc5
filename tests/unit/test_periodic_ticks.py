"""The tick rule without a database: which tick a leader enqueues at a given time,
across missed ticks and daylight saving time changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from baton import periodic


def run_leader(expression: str, timezone: str, start: datetime, end: datetime,
               every: timedelta) -> list[periodic.Tick]:
    """Tick as a leader that wakes every ``every`` from ``start`` to ``end`` would."""
    cron = periodic.cron(expression, timezone)
    next_tick = cron.following(start)
    enqueued = []
    now = start
    while now <= end and next_tick is not None:
        tick = periodic.due("s", expression, timezone, next_tick, now)
        if tick is not None:
            enqueued.append(tick)
            next_tick = tick.following
        now += every
    return enqueued


def test_not_due_before_its_tick() -> None:
    at = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    assert periodic.due("s", "0 * * * *", "UTC", at, at - timedelta(microseconds=1)) is None
    tick = periodic.due("s", "0 * * * *", "UTC", at, at)
    assert tick is not None and tick.tick == at and tick.missed_since is None
    assert tick.following == at + timedelta(hours=1)


def test_missed_ticks_make_one_late_job_for_the_latest() -> None:
    first = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    tick = periodic.due("s", "0 * * * *", "UTC", first, first + timedelta(hours=5, minutes=1))
    assert tick is not None
    assert (tick.tick, tick.missed_since) == (first + timedelta(hours=5), first)
    assert tick.following == first + timedelta(hours=6)
    assert '"missed_since":"2026-12-03T10:00:00+00:00"' in tick.meta()


@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25"])  # Paris: 02:00 skipped, repeated
def test_one_run_a_day_across_daylight_saving_changes(day: str) -> None:
    midnight = datetime.fromisoformat(f"{day}T00:00:00+00:00") - timedelta(days=1)
    ticks = run_leader("30 2 * * *", "Europe/Paris", midnight, midnight + timedelta(days=3),
                       timedelta(minutes=1))
    days = [t.tick.date() for t in ticks]
    assert len(days) == len(set(days)) == 3, ticks
    assert all(t.missed_since is None for t in ticks)


def test_every_second_on_time_has_no_gaps() -> None:
    start = datetime(2026, 12, 3, 10, 0, 0, 500_000, tzinfo=UTC)
    ticks = run_leader("* * * * * *", "UTC", start, start + timedelta(seconds=10),
                       timedelta(milliseconds=250))
    assert [t.tick.second for t in ticks] == list(range(1, 11))
    assert all(t.missed_since is None for t in ticks)


@pytest.mark.parametrize(("day", "hours"), [("2026-03-29", 23), ("2026-10-25", 25)])
def test_hourly_follows_the_clock_across_daylight_saving_changes(day: str, hours: int) -> None:
    """An hourly job runs once an hour of real time: 23 runs on the day Paris skips an
    hour, 25 on the day it repeats one."""
    start = datetime.fromisoformat(f"{day}T00:00:00+01:00")
    end = datetime.fromisoformat(f"{day}T23:59:00+01:00") + timedelta(hours=1 if hours == 25
                                                                       else -1)
    ticks = run_leader("0 * * * *", "Europe/Paris", start - timedelta(seconds=1), end,
                       timedelta(minutes=1))
    moments = [t.tick.astimezone(UTC) for t in ticks]
    assert len(moments) == len(set(moments)) == hours, ticks
    assert all(t.missed_since is None for t in ticks)


def test_shorthands_are_spelled_out() -> None:
    at = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)
    assert periodic.cron("@daily", "UTC").following(at) == datetime(2026, 12, 4, tzinfo=UTC)
    assert periodic.cron("@HOURLY", "UTC").latest(at) == datetime(2026, 12, 3, 10, tzinfo=UTC)
    assert periodic.cron("@weekly", "Europe/Paris").following(at) == datetime(
        2026, 12, 5, 23, tzinfo=UTC)  # Sunday midnight in Paris
