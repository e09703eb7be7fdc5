"""Announcing step transitions: events built in Python, sent in few notifications."""


from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from psycopg.rows import dict_row
from pydantic_core import to_json

from baton.db import Queries
from baton.events import STEP_UPDATED
from baton.events import channel as events_channel
from baton.job import json_text
from baton.ops import Op, Stmt

Payload = dict[str, Any]


class StepEvent(NamedTuple):
    """A step transition to announce (a tuple: one is built for every step attempt).

    ``label`` is the workflow's label where the caller knows it (from the step's gate row);
    without it the database fills it in.
    """

    workflow_id: uuid.UUID
    step_name: str
    worker: str
    state: str
    job_id: int
    attempt: int
    has_result: bool = False
    error: str | None = None
    label: str | None = None

    def row(self) -> dict[str, Any]:
        return {"workflow_id": uuid_text(self.workflow_id), "step_name": self.step_name,
                "worker": self.worker, "state": self.state, "job_id": self.job_id,
                "attempt": self.attempt, "has_result": self.has_result, "error": self.error}

    def payload(self, timestamp: str) -> Payload:
        """The event as sent: what ``events_emit_steps`` would build in the database."""
        return {"type": STEP_UPDATED, "workflow_id": uuid_text(self.workflow_id),
                "workflow_label": self.label, "step_name": self.step_name, "worker": self.worker,
                "state": self.state, "job_id": self.job_id, "attempt": self.attempt,
                "has_result": self.has_result, "error": self.error, "timestamp": timestamp}


@functools.lru_cache(maxsize=1024)
def uuid_text(value: uuid.UUID) -> str:
    """``str(value)``, remembered: a batch of outcomes mostly shares a few workflows."""
    return str(value)


NOTIFY_EVENT_BYTES = 7000
"""An event larger than this travels by reference to ``event_payloads`` (as in
``emit_many``), which only the database path does."""
NOTIFY_BYTES = 7400
"""The most event JSON one notification carries (NOTIFY's limit is 8000 bytes)."""


def emit_steps(q: Queries, events: Sequence[StepEvent]) -> Op[list[Payload]]:
    """Send ``workflow_step_updated`` events in the current transaction; return them."""
    if not events:
        return []
    return (yield from Announcement.build(events).send(q))


@dataclass(frozen=True, slots=True)
class Announcement:
    """``workflow_step_updated`` events ready to send.

    When every event carries its workflow's label, the payloads are built here, their JSON
    numbered by the notification that carries it (``chunks``): they go out in a few
    notifications, by one cheap statement or by the finish statement of their outcomes.
    Otherwise, or when one is too large to travel inline, the database builds them.
    """

    events: Sequence[StepEvent]
    payloads: list[Payload]
    bodies: list[str]
    chunks: list[int] | None

    @classmethod
    def build(cls, events: Sequence[StepEvent]) -> Announcement:
        if all(e.label is not None for e in events):
            timestamp = datetime.now(UTC).isoformat()
            payloads = [e.payload(timestamp) for e in events]
            encoded = [to_json(p) for p in payloads]
            chunks = chunk_numbers(encoded)
            if chunks is not None:
                return cls(events, payloads, [b.decode() for b in encoded], chunks)
        return cls(events, [], [], None)

    @property
    def inline(self) -> bool:
        """Whether the payloads were built here (and may ride with the finish)."""
        return self.chunks is not None

    def finish_params(self) -> dict[str, Any]:
        """The events as parameters of ``jobs_finish``, which sends those of the outcomes
        it applies."""
        assert self.chunks is not None
        return {"event_jobs": [e.job_id for e in self.events], "event_chunks": self.chunks,
                "event_bodies": self.bodies}

    def sent(self, applied: set[int]) -> list[Payload]:
        """The payloads ``jobs_finish`` sent, having applied the outcomes of ``applied``."""
        return [p for p, e in zip(self.payloads, self.events, strict=True)
                if e.job_id in applied]

    def send(self, q: Queries) -> Op[list[Payload]]:
        """Send the events by their own statement; return their payloads."""
        if self.chunks is not None:
            yield Stmt(q["events_notify"], {"chunks": pack(self.bodies, self.chunks),
                                            "channel": events_channel(q.schema)}, rows=False)
            return self.payloads
        rows = yield Stmt(q["events_emit_steps"], {
            "rows": json_text([e.row() for e in self.events]),
            "channel": events_channel(q.schema),
        }, row_factory=dict_row)
        return list(rows[0]["payloads"]) if rows else []


NO_EVENTS: dict[str, Any] = {"event_jobs": [], "event_chunks": [], "event_bodies": []}
"""``jobs_finish`` parameters for a batch that sends no step events."""


def chunk_numbers(bodies: Sequence[bytes]) -> list[int] | None:
    """Number events' UTF-8 JSON by the notification carrying it, each a JSON array of at
    most :data:`NOTIFY_BYTES` bytes; ``None`` if one is too large to travel inline."""
    numbers: list[int] = []
    chunk = size = 0
    for body in bodies:
        if len(body) > NOTIFY_EVENT_BYTES:
            return None
        if size and size + len(body) + 1 > NOTIFY_BYTES:
            chunk, size = chunk + 1, 0
        numbers.append(chunk)
        size += len(body) + 1
    return numbers


def pack(bodies: Sequence[str], numbers: Sequence[int]) -> list[str]:
    """Join event JSON texts into one JSON array per notification number."""
    chunks: list[list[str]] = []
    for body, number in zip(bodies, numbers, strict=True):
        if number == len(chunks):
            chunks.append([])
        chunks[number].append(body)
    return ["[" + ",".join(chunk) + "]" for chunk in chunks]

