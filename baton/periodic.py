"""Periodic jobs: schedules (a cron expression read in a time zone, and the job it
enqueues), their ticks, and the read of the ``schedules`` table. No I/O here: the
scheduler service (:mod:`baton.worker.scheduler`) writes and ticks the rows.

The rule for ticks: the leader enqueues a schedule's job once per tick, in the statement
that moves the schedule's ``next_tick`` on (a compare-and-set on the value it read), so a
tick is enqueued once whoever leads. When several ticks passed without a leader, only the
latest is enqueued, once, late; its job's meta says since when ticks were missed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from psycopg.rows import class_row, dict_row
from pydantic import BaseModel

from baton.db import Queries
from baton.errors import ScheduleError
from baton.job import JobSpec, encode_json
from baton.ops import Op, Stmt
from baton.unique import job_key

_NAME = re.compile(r"[^\x00]{1,200}")

CRON_HELP = ("five fields (minute hour day-of-month month day-of-week), or six with seconds "
             "first, such as '*/5 * * * *' or '*/10 * * * * *', or @hourly, @daily, @weekly, "
             "@monthly or @yearly")

ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The shorthands of Vixie cron, and the expressions they stand for."""


@dataclass(frozen=True)
class Cron:
    """A cron expression read in a time zone: finds its ticks.

    :raises ScheduleError: (naming ``schedule``) if the expression or the time zone is
        invalid, or the expression never matches.
    """

    expression: str
    timezone: str
    schedule: str = field(default="", compare=False)
    zone: ZoneInfo = field(init=False, repr=False, compare=False)
    fields: str = field(init=False, repr=False, compare=False)
    """The expression as cronsim reads it (a shorthand spelled out)."""

    def __post_init__(self) -> None:
        name = self.schedule or self.expression
        if not isinstance(self.expression, str) or not self.expression.strip():
            raise ScheduleError(name, f"a cron expression is {CRON_HELP}, not "
                                      f"{self.expression!r}")
        object.__setattr__(self, "zone", _zone(self.timezone, name))
        fields = ALIASES.get(self.expression.strip().lower(), self.expression)
        object.__setattr__(self, "fields", fields)
        now = datetime.now(UTC)
        try:
            first = next(CronSim(fields, now.astimezone(self.zone)), None)
        except CronSimError as exc:
            raise ScheduleError(name, f"invalid cron expression {self.expression!r} ({exc}); "
                                      f"use {CRON_HELP}") from None
        if first is None:
            raise ScheduleError(name, f"cron expression {self.expression!r} never matches "
                                      "in the next fifty years")

    def latest(self, now: datetime) -> datetime | None:
        """Return the latest tick at or before ``now`` (timezone-aware) in UTC, or None."""
        # Backwards from the second after now (cronsim's reverse iteration excludes its
        # start), counted in UTC: adding to a wall time may land in an hour the clocks skip.
        start = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        return _utc(next(CronSim(self.fields, start.astimezone(self.zone), reverse=True),
                         None))

    def following(self, now: datetime) -> datetime | None:
        """Return the first tick after ``now`` (timezone-aware) in UTC, or None if there is
        none in the next fifty years."""
        return _utc(next(CronSim(self.fields, now.astimezone(self.zone)), None))


def _utc(moment: datetime | None) -> datetime | None:
    """``moment`` in UTC. Ticks are compared in UTC only: two datetimes of one zone compare
    by their wall time, so the two 02:00 of a night that repeats an hour would be equal."""
    return None if moment is None else moment.astimezone(UTC)


def _zone(timezone: object, name: str) -> ZoneInfo:
    if not isinstance(timezone, str) or not timezone:
        raise ScheduleError(name, f"a time zone is an IANA name such as 'Europe/Paris' or "
                                  f"'UTC', not {timezone!r}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(name, f"unknown time zone {timezone!r}: use an IANA name such as "
                                  "'Europe/Paris' or 'UTC'") from None


@lru_cache(maxsize=256)
def cron(expression: str, timezone: str) -> Cron:
    """Return the :class:`Cron` of a stored schedule (parsed once per process)."""
    return Cron(expression, timezone)


@dataclass(frozen=True)
class Schedule:
    """A job enqueued at every tick of a cron expression read in a time zone.

    Build one with ``@app.step(cron=...)`` or :meth:`baton.Baton.schedule`.

    :raises ScheduleError: if the name, the expression or the time zone is invalid, or the
        job has a ``scheduled_at`` (a periodic job runs at its ticks).
    """

    name: str
    job: JobSpec
    cron: str
    timezone: str = "UTC"
    ticks: Cron = field(init=False, repr=False, compare=False)
    unique: dict[str, Any] = field(init=False, repr=False, compare=False)
    """The unique job's key (without its period), period and states, or Nones."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ScheduleError(str(self.name), "a schedule name is 1 to 200 characters")
        if not isinstance(self.job, JobSpec):
            raise ScheduleError(self.name, f"expected a job (step.new(...)), not {self.job!r}")
        if self.job.scheduled_at is not None:
            raise ScheduleError(self.name, "its job has scheduled_at set: a periodic job runs "
                                           "at its ticks; leave scheduled_at out")
        object.__setattr__(self, "ticks", Cron(self.cron, self.timezone, self.name))
        unique: dict[str, Any] = {"unique_key": None, "unique_period": None,
                                  "unique_states": None}
        if (options := self.job.unique) is not None:  # held as jobs_insert_unique holds it
            unique = json.loads("{" + options.row_fields + "}")
            unique["unique_key"] = job_key(options, self.job.step, self.job.queue,
                                           self.job.args)
        object.__setattr__(self, "unique", unique)

    def row(self, now: datetime) -> dict[str, Any]:
        """Return the schedule's row for ``schedules_define``, its first tick after ``now``."""
        job = self.job
        following = self.ticks.following(now)
        return {
            "name": self.name, "cron": self.cron, "timezone": self.timezone,
            "step": job.step, "queue": job.queue, "args": job.args, "meta": job.meta,
            "max_attempts": job.max_attempts, "priority": job.priority,
            "timeout": job.timeout, "tags": list(job.tags), **self.unique,
            "next_tick": following.isoformat() if following is not None else None,
        }


def rows_json(schedules: list[Schedule], now: datetime) -> str:
    """Return the rows of ``schedules`` (in name order) as one JSON array."""
    return encode_json([s.row(now) for s in sorted(schedules, key=lambda s: s.name)])


@dataclass(frozen=True)
class Tick:
    """What the leader enqueues for one due schedule."""

    name: str
    expected: datetime
    """The ``next_tick`` the leader read: the compare-and-set's old value."""
    tick: datetime
    """The latest tick that passed: the one enqueued."""
    following: datetime | None
    """The schedule's next tick after this one."""

    @property
    def missed_since(self) -> datetime | None:
        """The first tick missed, when the enqueued tick stands for earlier ones too."""
        return self.expected if self.tick > self.expected else None

    def meta(self) -> str:
        """The keys added to the job's meta, as JSON."""
        meta = {"schedule": self.name, "tick": _iso(self.tick)}
        if (since := self.missed_since) is not None:
            meta["missed_since"] = _iso(since)
        return encode_json(meta)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class Enqueued:
    """What became of a tick this leader enqueued."""

    job_id: int | None
    """The job's id; None when the job is unique and its key was held (no job)."""
    queue: str
    unique_key: str | None


def enqueue(q: Queries, tick: Tick, expression: str, timezone: str) -> Op[Enqueued | None]:
    """Enqueue ``tick`` of a schedule read with ``expression`` and ``timezone``, in one
    transaction with the move of its ``next_tick``; None if another leader did it first."""
    rows = yield Stmt(q["schedule_tick"], {
        "name": tick.name, "expected": tick.expected, "tick": tick.tick,
        "following": tick.following, "cron": expression, "timezone": timezone,
        "meta": tick.meta(), "channel": q.channel("insert"),
    }, row_factory=dict_row)
    if not rows:
        return None
    row = rows[0]
    if row["id"] is not None:
        yield Stmt(q["schedule_job_note"], {"name": tick.name, "job_id": row["id"]})
    return Enqueued(row["id"], row["queue"], row["unique_key"])


def due(name: str, expression: str, timezone: str, next_tick: datetime, now: datetime
        ) -> Tick | None:
    """Return the tick to enqueue for a schedule whose ``next_tick`` was read at ``now``,
    or None if it has not come.

    :raises ScheduleError: if the stored expression or time zone is invalid.
    """
    now, next_tick = now.astimezone(UTC), next_tick.astimezone(UTC)
    if next_tick > now:
        return None
    ticks = cron(expression, timezone)
    latest = ticks.latest(now)
    # The forward chain of next ticks decides: going backwards, cronsim may read a repeated
    # hour of a daylight saving change as its first occurrence.
    if latest is None or latest < next_tick:
        latest = next_tick
    return Tick(name, next_tick, latest, ticks.following(max(now, latest)))


class ScheduleInfo(BaseModel):
    """One row of the ``schedules`` table, as ``baton status`` shows it."""

    name: str
    cron: str
    timezone: str
    step: str
    queue: str
    next_tick: datetime | None
    """The next tick to enqueue (in the past: no leader ran since; it is enqueued late)."""
    last_tick: datetime | None
    last_job_id: int | None
    ticked_at: datetime | None
    defined_at: datetime
    seen_at: datetime
    live: bool
    """Whether a live worker defines the schedule: the leader ticks only those."""


def local_time(moment: datetime | None, timezone: str) -> str:
    """Return ``moment`` as people read it in ``timezone`` (``-`` for None)."""
    if moment is None:
        return "-"
    try:
        moment = moment.astimezone(ZoneInfo(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def list_schedules(q: Queries) -> Op[list[ScheduleInfo]]:
    """Return every schedule, by name."""
    rows: list[ScheduleInfo] = yield Stmt(q["schedules_list"], {},
                                          row_factory=class_row(ScheduleInfo))
    return rows
