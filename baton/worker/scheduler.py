"""The scheduler service: every worker writes the schedules its app defines and keeps them
live; the elected leader enqueues their ticks (see :mod:`baton.periodic` for the rule)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import psycopg
from psycopg.rows import dict_row

from baton import ops, periodic
from baton.db import describe, translate_errors
from baton.errors import DatabaseError, ScheduleError
from baton.logs import get_logger

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = get_logger("baton.scheduler")

WAKE_SLACK = 0.001
"""Seconds past a tick the leader wakes, so that the tick has passed on the server's clock
as well (a tick found not yet due costs one more read a little later)."""


class Scheduler:
    """Defines the app's schedules when the worker starts, renews them while it lives, and
    ticks every live schedule while the worker leads.

    It wakes at the earliest next tick, or after ``maintenance_interval`` when that comes
    first (a leader elected meanwhile starts ticking then).
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.schedules = list(worker.app.schedules.values())
        self.passes = 0
        """Leader passes done (each enqueues whatever ticks were due)."""
        self._invalid: set[tuple[str, str, str]] = set()
        """Stored schedules found invalid (each is reported once)."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Define the schedules, report started, then renew and tick until cancelled."""
        settings = self.worker.settings
        await self.define()
        task_status.started()
        # Three renewals in a heartbeat's lifetime: a schedule stays live through a missed one.
        renew_every = max(settings.heartbeat_interval, settings.heartbeat_ttl / 3)
        renew_at = anyio.current_time() + renew_every
        while not self.worker.passes.closing:
            wait = settings.maintenance_interval
            with self.worker.passes.shielded():  # a shutdown does not cut a pass off
                try:
                    if self.schedules and anyio.current_time() >= renew_at:
                        await self.renew()
                        renew_at = anyio.current_time() + renew_every
                    if self.worker.maintenance.is_leader:
                        until = await self.tick()
                        if until is not None:
                            wait = min(wait, max(until, 0.0) + WAKE_SLACK)
                except (psycopg.Error, DatabaseError) as exc:
                    log.warning("scheduler.failed", error=describe(exc))
            await anyio.sleep(wait)

    async def define(self) -> None:
        """Write the app's schedules (a changed expression starts again from now)."""
        if not self.schedules:
            return
        app = self.worker.app
        rows = periodic.rows_json(self.schedules, datetime.now(UTC))
        with translate_errors("define schedules"):
            async with app.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(app.sql["schedules_define"], {
                    "rows": rows, "ttl": self.worker.settings.heartbeat_ttl})
                defined = await cur.fetchall()
        for row in defined:
            if row["created"] or row["changed"]:
                log.info("schedule.created" if row["created"] else "schedule.changed",
                         schedule=row["name"], cron=row["cron"], timezone=row["timezone"],
                         next_tick=row["next_tick"] and row["next_tick"].isoformat())
        log.info("schedules.defined", worker_id=self.worker.id,
                 schedules=sorted(s.name for s in self.schedules))

    async def renew(self) -> None:
        """Mark the app's schedules as defined by a live worker."""
        app = self.worker.app
        async with app.connection(autocommit=True) as conn:
            await conn.execute(app.sql["schedules_seen"], {
                "names": [s.name for s in self.schedules],
                "ttl": self.worker.settings.heartbeat_ttl})

    async def tick(self, now: datetime | None = None) -> float | None:
        """Enqueue the due tick of every live schedule; return the seconds until the
        earliest next tick (None if no schedule has one).

        :param now: the time to tick at (default: the database's clock); for tests.
        """
        app = self.worker.app
        async with app.connection(autocommit=True) as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(app.sql["schedules_live"], {"now": now})
            rows = await cur.fetchall()
        self.passes += 1
        soonest: float | None = None
        for row in rows:
            if row["next_tick"] is None:
                continue
            try:
                tick = periodic.due(row["name"], row["cron"], row["timezone"],
                                    row["next_tick"], row["now"])
            except ScheduleError as exc:  # a row written by hand or by a newer version
                if (row["name"], row["cron"], row["timezone"]) not in self._invalid:
                    self._invalid.add((row["name"], row["cron"], row["timezone"]))
                    log.error("schedule.invalid", schedule=row["name"], error=str(exc))
                continue
            following = row["next_tick"] if tick is None else tick.following
            if tick is not None:
                try:
                    await self._enqueue(tick, row)
                except (psycopg.Error, DatabaseError) as exc:  # the others are still enqueued
                    log.warning("schedule.tick_failed", schedule=tick.name,
                                tick=tick.tick.isoformat(), error=describe(exc))
                    following = None  # tried again after maintenance_interval
            if following is not None:
                until = (following - row["now"]).total_seconds()
                soonest = until if soonest is None else min(soonest, until)
        return soonest

    async def _enqueue(self, tick: periodic.Tick, row: dict[str, Any]) -> int | None:
        """Enqueue ``tick`` unless another leader did; return the job's id if this one did."""
        app = self.worker.app
        async with app.connection() as conn:
            done = await ops.run_async(
                conn, periodic.enqueue(app.sql, tick, row["cron"], row["timezone"]),
                "enqueue a periodic job")
        if done is None:
            log.info("schedule.tick_taken", schedule=tick.name, tick=tick.tick.isoformat())
            return None
        if done.job_id is None:
            log.info("schedule.skipped", schedule=tick.name, tick=tick.tick.isoformat(),
                     unique_key=done.unique_key,
                     reason="a job holds the unique key (the last run has not finished)")
            return None
        job_id = done.job_id
        if tick.missed_since is not None:
            log.warning("schedule.missed", schedule=tick.name, job_id=job_id,
                        missed_since=tick.missed_since.isoformat(), tick=tick.tick.isoformat(),
                        reason="no leader ran at these ticks: the latest is enqueued, once")
        else:
            log.info("schedule.ticked", schedule=tick.name, job_id=job_id, queue=done.queue,
                     tick=tick.tick.isoformat())
        return job_id
