"""Queue control: pause, resume and scale a queue for every worker, and list the queues.

A queue's settings are a row of the ``queues`` table, so a worker started later obeys them
too; a change is announced on the control channel in the same transaction, so running
workers obey it at once (and re-read the table on every heartbeat, should they miss it).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from psycopg.rows import class_row
from pydantic import BaseModel, Field

from baton.db import Queries
from baton.errors import OptionsError, QueueNotFound
from baton.job import check_queue
from baton.logs import get_logger
from baton.ops import Op, Stmt

log = get_logger("baton.queues")

MAX_CONCURRENCY = 10_000
"""The most jobs of one queue a worker may be scaled to run at once."""


class QueueControl(BaseModel):
    """A queue's control settings, as the ``queues`` table holds them."""

    name: str
    paused: bool
    """Workers fetch none of its jobs; they are still accepted, and wait."""
    concurrency: int | None
    """How many of its jobs each worker serving it runs at once; ``None``: each worker's
    own setting (``WorkerSettings.queues``, ``baton worker --queues``)."""
    version: int
    """Grows by one with every change."""
    updated_at: datetime


class QueueWorker(BaseModel):
    """A live worker serving a queue."""

    id: str
    concurrency: int
    """The concurrency it was started with for the queue (a scale overrides it)."""


class QueueInfo(BaseModel):
    """A queue: its settings, its jobs by state and the live workers serving it."""

    name: str
    paused: bool
    concurrency: int | None
    """The scale set for it, or ``None``: each worker runs its own setting."""
    updated_at: datetime | None
    """When it was last paused, resumed or scaled (``None``: never)."""
    counts: dict[str, int] = Field(default_factory=dict)
    workers: list[QueueWorker] = Field(default_factory=list)


_CONTROL_ROW = class_row(QueueControl)
_INFO_ROW = class_row(QueueInfo)


def check_concurrency(concurrency: object) -> int | None:
    """Return ``concurrency`` if it is a valid scale (a whole number from 1 to
    :data:`MAX_CONCURRENCY`, or ``None`` for each worker's own setting).

    :raises OptionsError: if it is not.
    """
    if concurrency is None:
        return None
    if (not isinstance(concurrency, int) or isinstance(concurrency, bool)
            or not 1 <= concurrency <= MAX_CONCURRENCY):
        raise OptionsError("concurrency", f"expected a whole number from 1 to "
                           f"{MAX_CONCURRENCY} (pause the queue to run none), got "
                           f"{concurrency!r:.80}")
    return concurrency


def set_control(
    q: Queries, name: str, *, registered: Iterable[str], paused: bool | None = None,
    scale: bool = False, concurrency: int | None = None,
) -> Op[QueueControl]:
    """Change a queue's settings and announce them to the workers; return them.

    :param registered: queue names known without asking the database (those of the
        caller's steps).
    :param paused: pause (``True``) or resume (``False``); ``None`` leaves it as it is.
    :param scale: set ``concurrency`` (``None``: back to each worker's own setting).
    :raises OptionsError: if the name or the concurrency is invalid.
    :raises QueueNotFound: if no job, live worker or registered step uses the queue.
    """
    # Checked here, before a connection is taken: the operation itself runs later.
    if (problem := check_queue(name)) is not None:
        raise OptionsError("queue", problem)
    if scale:
        concurrency = check_concurrency(concurrency)
    return _set_control(q, name, sorted(set(registered)), paused, scale, concurrency)


def _set_control(q: Queries, name: str, registered: list[str], paused: bool | None,
                 scale: bool, concurrency: int | None) -> Op[QueueControl]:
    rows = yield Stmt(q["queue_control_set"], {
        "name": name, "registered": registered, "paused": paused,
        "set_concurrency": scale, "concurrency": concurrency,
        "channel": q.channel("control"),
    }, row_factory=_CONTROL_ROW)  # its extra column (announced) is ignored
    if not rows:
        raise QueueNotFound(name)
    control: QueueControl = rows[0]
    if paused is not None:
        log.info("queue.paused" if paused else "queue.resumed", queue=name,
                 version=control.version)
    if scale:
        log.info("queue.scaled", queue=name, concurrency=control.concurrency,
                 version=control.version)
    return control


def list_queues(q: Queries) -> Op[list[QueueInfo]]:
    """Return every queue that has a setting, jobs or a live worker, by name."""
    rows = yield Stmt(q["queues_list"], {}, row_factory=_INFO_ROW)
    return list(rows)
