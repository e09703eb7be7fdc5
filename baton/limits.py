"""Queue limits: how many jobs of a queue run at once across all workers, how many start
per window of time and how many recorded tokens a window may use, optionally per partition.

This module owns the settings (a :class:`QueueLimit` per row of ``queue_limits``, migration
14) and the operations that change and read them. The worker enforces them in the fetch
(:mod:`baton.worker.limits`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field

from baton.db import Queries
from baton.errors import ConfigurationError
from baton.job import check_queue
from baton.ops import Op, Stmt

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_WINDOW_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)\s*$")


class Window(BaseModel):
    """At most ``limit`` in any ``seconds`` (a sliding window)."""

    model_config = ConfigDict(frozen=True)

    limit: int = Field(ge=1)
    seconds: float = Field(gt=0)

    def __str__(self) -> str:
        return f"{self.limit}/{self.seconds:g}s"


WindowSpec = Window | tuple[int, float] | str
"""A window as :class:`Window`, ``(limit, seconds)`` or text such as ``"20/1s"``."""


def parse_window(spec: WindowSpec, *, what: str = "rate") -> Window:
    """Return ``spec`` as a :class:`Window`.

    Text is ``LIMIT/PERIOD`` with a unit: ``20/s``, ``20/1s``, ``100/500ms``, ``1000/1m``,
    ``5/1h``.

    :raises ConfigurationError: if it is none of these, or not positive.
    """
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        match = _WINDOW_RE.fullmatch(spec)
        if match is None:
            raise ConfigurationError(
                f"invalid {what} {spec!r}: expected LIMIT/PERIOD such as 20/1s, 100/500ms, "
                "1000/1m or 5/1h")
        limit, amount, unit = match.groups()
        spec = (int(limit), float(amount or 1) * _UNITS[unit])
    if (not isinstance(spec, tuple) or len(spec) != 2 or isinstance(spec[0], bool)
            or not isinstance(spec[0], int) or not isinstance(spec[1], int | float)
            or spec[0] < 1 or not spec[1] > 0):
        raise ConfigurationError(
            f"invalid {what} {spec!r}: expected (limit, seconds) with a limit of at least 1 "
            "and a positive number of seconds, or text such as '20/1s'")
    return Window(limit=spec[0], seconds=float(spec[1]))


class QueueLimit(BaseModel):
    """The limits of one queue, shared by every worker that serves it.

    With ``partition_by``, each limit applies to every value of that key of the jobs'
    args on its own (jobs without the key share one partition).
    """

    model_config = ConfigDict(frozen=True)

    queue: str
    concurrency: int | None = None
    """The most jobs executing at once, across all workers."""
    total_concurrency: int | None = None
    """With ``partition_by``: the most jobs of the whole queue executing at once."""
    rate: Window | None = None
    """The most jobs started in any window of ``rate.seconds``."""
    tokens: Window | None = None
    """No job starts while the jobs recorded this many tokens (input + output) within the
    window."""
    partition_by: str | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> QueueLimit:
        rate = tokens = None
        if row["rate_limit"] is not None:
            rate = Window(limit=row["rate_limit"], seconds=row["rate_period"])
        if row["token_limit"] is not None:
            tokens = Window(limit=row["token_limit"], seconds=row["token_period"])
        return cls(queue=row["queue"], concurrency=row["concurrency"],
                   total_concurrency=row["total_concurrency"], rate=rate,
                   tokens=tokens, partition_by=row["partition_by"],
                   updated_at=row.get("updated_at"))

    def describe(self) -> str:
        """The limits in words, e.g. ``concurrency 3, rate 20/1s per customer``."""
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if self.rate is not None:
            parts.append(f"rate {self.rate}")
        if self.tokens is not None:
            parts.append(f"tokens {self.tokens}")
        text = ", ".join(parts)
        if self.partition_by:
            text = f"{text} per {self.partition_by}" if text else f"per {self.partition_by}"
        if self.total_concurrency is not None:
            text += f"; concurrency {self.total_concurrency} in all"
        return text


def queue_limit(
    queue: str, *, concurrency: int | None = None, rate: WindowSpec | None = None,
    tokens: WindowSpec | None = None, partition_by: str | None = None,
    total_concurrency: int | None = None,
) -> QueueLimit:
    """Validate limits for ``queue`` (see :meth:`baton.Baton.limit_queue`).

    :raises ConfigurationError: for a bad queue name or limit, or no limit at all.
    """
    if (problem := check_queue(queue)) is not None:
        raise ConfigurationError(problem)
    for name, value in (("concurrency", concurrency), ("total_concurrency", total_concurrency)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigurationError(f"invalid {name} {value!r}: expected an integer of at "
                                     "least 1")
    if total_concurrency is not None and partition_by is None:
        raise ConfigurationError("total_concurrency caps a partitioned queue as a whole: "
                                 "without partition_by, use concurrency")
    if partition_by is not None and (not isinstance(partition_by, str)
                                     or not 0 < len(partition_by) <= 128):
        raise ConfigurationError(f"invalid partition_by {partition_by!r}: expected the name "
                                 "of a key of the jobs' args (1 to 128 characters)")
    if concurrency is None and total_concurrency is None and rate is None and tokens is None:
        raise ConfigurationError(f"no limit given for queue {queue!r}: pass concurrency, rate "
                                 "or tokens (remove limits with unlimit_queue)")
    return QueueLimit(
        queue=queue, concurrency=concurrency, total_concurrency=total_concurrency,
        rate=parse_window(rate) if rate is not None else None,
        tokens=parse_window(tokens, what="tokens") if tokens is not None else None,
        partition_by=partition_by)


def set_limit(q: Queries, limit: QueueLimit) -> Op[QueueLimit]:
    """Store ``limit`` (replacing the queue's limits) and tell the workers."""
    rows = yield Stmt(q["queue_limit_set"], {
        "queue": limit.queue, "concurrency": limit.concurrency,
        "total_concurrency": limit.total_concurrency,
        "rate_limit": limit.rate.limit if limit.rate else None,
        "rate_period": limit.rate.seconds if limit.rate else None,
        "token_limit": limit.tokens.limit if limit.tokens else None,
        "token_period": limit.tokens.seconds if limit.tokens else None,
        "partition_by": limit.partition_by,
        "control": q.channel("control"), "insert": q.channel("insert"),
    }, row_factory=dict_row)
    return QueueLimit.from_row(rows[0])


def remove_limit(q: Queries, queue: str) -> Op[bool]:
    """Remove the limits of ``queue`` and tell the workers; ``False`` if it had none."""
    rows = yield Stmt(q["queue_limit_remove"], {
        "queue": queue, "control": q.channel("control"), "insert": q.channel("insert")})
    return bool(rows)


def list_limits(q: Queries, queues: Sequence[str] | None = None) -> Op[list[QueueLimit]]:
    """Return the limits of ``queues`` (every limited queue when ``None``)."""
    rows = yield Stmt(q["queue_limits_list"],
                      {"queues": list(queues) if queues is not None else None},
                      row_factory=dict_row)
    return [QueueLimit.from_row(row) for row in rows]
