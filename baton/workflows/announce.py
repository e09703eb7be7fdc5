"""Workflow events: the one place their payloads are built, and how they are sent.

Every event (``workflow_step_updated``, ``workflow_finished``, ``workflow_resumed``) is
built here from what the engine knows, as the dict hooks receive and the JSON subscribers
parse. They travel by NOTIFY in the transaction that made the transition, packed a few
hundred to a notification; one too large for NOTIFY is stored in ``event_payloads`` and
travels by reference.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic_core import to_json

from baton.db import Queries
from baton.events import STEP_UPDATED, WORKFLOW_FINISHED, WORKFLOW_RESUMED
from baton.events import channel as events_channel
from baton.job import json_text
from baton.ops import Op, Stmt

Payload = dict[str, Any]

class StepEvent(NamedTuple):
    """A step transition to announce (a tuple: one is built for every step attempt)."""

    workflow_id: uuid.UUID | str
    label: str
    step_name: str
    """The step's name inside its workflow."""
    function: str
    """The registered step function it runs."""
    state: str
    job_id: int
    attempt: int
    has_result: bool = False
    error: str | None = None

    def payload(self, timestamp: str) -> Payload:
        return {"type": STEP_UPDATED, "workflow_id": str(self.workflow_id),
                "workflow_label": self.label, "step_name": self.step_name,
                "function": self.function, "state": self.state, "job_id": self.job_id,
                "attempt": self.attempt, "has_result": self.has_result,
                "error": self.error,
                "timestamp": timestamp}


def finished_payload(row: Mapping[str, Any]) -> Payload:
    """The ``workflow_finished`` event of a workflow row that just finished (``id``,
    ``label``, ``state``, ``failed_steps``, ``finished_at``, ``run``, and the counts).

    A workflow with a budget adds what its steps spent (``spent_usd``, from the row's
    ``spent_usd``) and, if a budget stopped steps of it, ``reason`` (``budget_exceeded``,
    from ``stop_reason``); other workflows' events have neither key."""
    payload: Payload = {"type": WORKFLOW_FINISHED, "workflow_id": str(row["id"]),
                        "workflow_label": row["label"], "outcome": row["state"],
                        "failed_steps": list(row["failed_steps"]), "run": row["run"],
                        "total_steps": row["total_steps"],
                        "settled_steps": row["settled_steps"],
                        "timestamp": _timestamp(row["finished_at"])}
    if row.get("spent_usd") is not None:
        payload["spent_usd"] = float(row["spent_usd"])
    if row.get("stop_reason") is not None:
        payload["reason"] = row["stop_reason"]
    return payload


def resumed_payload(workflow_id: uuid.UUID, label: str, run: int, steps: Sequence[str]
                    ) -> Payload:
    """The ``workflow_resumed`` event: ``steps`` run again, in run ``run``."""
    return {"type": WORKFLOW_RESUMED, "workflow_id": str(workflow_id),
            "workflow_label": label, "run": run, "steps": list(steps),
            "timestamp": _timestamp(datetime.now(UTC))}


def _timestamp(value: datetime | str) -> str:
    return value if isinstance(value, str) else value.isoformat()


NOTIFY_EVENT_BYTES = 7000
"""An event larger than this travels by reference to ``event_payloads``."""
NOTIFY_BYTES = 7400
"""The most event JSON one notification carries (NOTIFY's limit is 8000 bytes)."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """Events ready to send: their payloads, and the JSON of those that travel inline
    (``small``: their indexes), numbered by the notification that carries it (``chunks``).
    ``large`` are those that travel by reference."""

    payloads: list[Payload]
    small: list[int]
    bodies: list[str]
    chunks: list[int]
    large: list[Payload]

    @classmethod
    def of(cls, payloads: list[Payload]) -> Announcement:
        encoded = [to_json(p) for p in payloads]
        small = [i for i, b in enumerate(encoded) if len(b) <= NOTIFY_EVENT_BYTES]
        large = [p for p, b in zip(payloads, encoded, strict=True)
                 if len(b) > NOTIFY_EVENT_BYTES]
        return cls(payloads, small, [encoded[i].decode() for i in small],
                   chunk_numbers([encoded[i] for i in small]), large)

    @classmethod
    def steps(cls, events: Iterable[StepEvent]) -> Announcement:
        timestamp = datetime.now(UTC).isoformat()
        return cls.of([e.payload(timestamp) for e in events])

    def send(self, q: Queries) -> Op[list[Payload]]:
        """Send the events in the current transaction; return their payloads."""
        yield from self.send_large(q)
        if self.bodies:
            yield Stmt(q["events_notify"], {"chunks": pack(self.bodies, self.chunks),
                                            "channel": events_channel(q.schema)}, rows=False)
        return self.payloads

    def send_large(self, q: Queries) -> Op[None]:
        """Send the events too large to travel inline, by reference."""
        if self.large:
            yield Stmt(q["events_notify_large"], {"payloads": json_text(self.large),
                                                  "channel": events_channel(q.schema)},
                       rows=False)


def send(q: Queries, payloads: list[Payload]) -> Op[list[Payload]]:
    """Send events in the current transaction; return their payloads."""
    if not payloads:
        return []
    return (yield from Announcement.of(payloads).send(q))


def send_steps(q: Queries, events: Sequence[StepEvent]) -> Op[list[Payload]]:
    """Send ``workflow_step_updated`` events in the current transaction; return them."""
    if not events:
        return []
    return (yield from Announcement.steps(events).send(q))


def chunk_numbers(bodies: Sequence[bytes]) -> list[int]:
    """Number events' UTF-8 JSON by the notification carrying it, each a JSON array of at
    most :data:`NOTIFY_BYTES` bytes (every body is at most :data:`NOTIFY_EVENT_BYTES`)."""
    numbers: list[int] = []
    chunk = size = 0
    for body in bodies:
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
