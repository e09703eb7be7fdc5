"""Workflow operations on the database: insert, append, settle, cancel, read results.

Written as :mod:`baton.ops` generators, so async and sync callers share one version.
Settlement is the heart of it: when steps finish, in the finishing transaction, their
``completions`` rows are written once, their dependents' counters go down, dependents with
nothing left to wait on are released (``pending`` → ``available``) and their queues woken,
and a workflow whose every step settled is finished exactly once.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Self

from psycopg.rows import class_row, dict_row
from pydantic import BaseModel
from pydantic_core import to_json, to_jsonable_python

from baton import ops
from baton.dag import Workflow
from baton.db import Queries
from baton.errors import NoResultError, NoSuchStepError, WorkflowError, WorkflowNotFound
from baton.events import STEP_UPDATED
from baton.events import channel as events_channel
from baton.job import JobState, json_text
from baton.ops import Op, Stmt, insert_jobs

SETTLED_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


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


class WorkflowInfo(BaseModel):
    """A workflow row: its outcome so far."""

    id: uuid.UUID
    label: str
    state: str
    """``running``, ``completed`` or ``failed``."""
    total_steps: int
    settled_steps: int
    failed_steps: list[str]
    inserted_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """Build from a ``workflow_get`` / ``workflows_list`` row read by column name."""
        return cls.model_validate(row)


def insert(q: Queries, wf: Workflow) -> Op[uuid.UUID]:
    """Validate ``wf`` and insert it in one transaction, one statement per table."""
    order = wf.validate()
    yield Stmt(q["workflow_insert"], {
        "id": wf.id, "label": wf.label, "ignore_cancelled": wf.ignore_cancelled,
        "ignore_discarded": wf.ignore_discarded, "debug": wf.debug, "total": len(order),
    })
    yield from _insert_steps(q, wf, order, settled=set())
    return wf.id


def _insert_steps(q: Queries, wf: Workflow, order: list[str], *, settled: set[str]) -> Op[None]:
    edges = {name: wf.expand(wf.nodes[name].deps) for name in order}
    pending = {name: sum(1 for d in deps if d not in settled) for name, deps in edges.items()}
    ids = yield from insert_jobs(
        q, [wf.nodes[name].job for name in order],
        states=[JobState.PENDING if pending[name] else JobState.AVAILABLE for name in order],
        workflow_id=wf.id, workflow_steps=order,
    )
    node_rows = []
    for name, job_id in zip(order, ids, strict=True):
        node = wf.nodes[name]
        node_rows.append({
            "workflow_id": str(wf.id), "name": name, "job_id": job_id, "step": node.job.step,
            "deps": node.deps, "group_name": node.group, "model": node.model,
            "ignore_cancelled": node.ignore_cancelled,
            "ignore_discarded": node.ignore_discarded, "min_success": node.min_success,
            "pending_deps": pending[name],
        })
    yield Stmt(q["nodes_insert"], {"rows": json_text(node_rows)})
    edge_rows = [{"dep": dep, "node": name} for name, deps in edges.items() for dep in deps]
    if edge_rows:
        yield Stmt(q["edges_insert"], {"workflow_id": wf.id, "rows": json_text(edge_rows)})


def append(q: Queries, workflow_id: uuid.UUID, wf: Workflow) -> Op[list[str]]:
    """Add the steps of ``wf`` to a running workflow; they may depend on existing steps.

    :raises WorkflowNotFound: if there is no such workflow.
    :raises WorkflowError: if it already finished, or ``wf`` is invalid.
    """
    rows = yield Stmt(q["workflow_lock_for_append"], {"id": workflow_id}, row_factory=dict_row)
    if not rows:
        raise WorkflowNotFound(str(workflow_id))
    row = rows[0]
    if row["finished"]:
        raise WorkflowError(f"workflow {workflow_id} has finished; it cannot grow")
    wanted_groups = sorted({d for n in wf.nodes.values() for d in n.deps} & set(row["groups"]))
    if wanted_groups:
        found = yield Stmt(q["workflow_group_members"],
                           {"id": workflow_id, "groups": wanted_groups}, row_factory=dict_row)
        for group in found:
            wf.groups.setdefault(group["group_name"], list(group["members"]))
    order = wf.validate(existing=set(row["names"]))
    wf.id = workflow_id
    yield Stmt(q["workflow_grow"], {"id": workflow_id, "count": len(order)})
    yield from _insert_steps(q, wf, order, settled=set(row["settled"]))
    return order


Settled = tuple[uuid.UUID, str, str, int]
"""A step that settled: workflow id, step name, final state, job id."""


def settle(q: Queries, steps: Sequence[Settled], *, locked: bool = False
           ) -> Op[list[Payload]]:
    """Record that ``steps`` settled; release dependents.

    Run it in the transaction that finished the steps (``locked``: it already holds their
    workflows' locks). Only a step whose job is in that final state counts, so the
    statement may go out along with the finish before its rows are read. A workflow whose
    last step settled finishes here, and its ``workflow_finished`` event is sent: exactly
    once, because only the first record of a step's settlement counts. Returns those
    events' payloads.
    """
    if not steps:
        return []
    if not locked:
        yield lock(q, [wf_id for wf_id, *_ in steps])
    return (yield from settlement(settle_statement(q, steps)))


def settle_statement(q: Queries, steps: Sequence[Settled], *, commit: bool = False) -> Stmt:
    """The statement of :func:`settle` (``commit``: the transaction commits with it)."""
    rows = [{"workflow_id": w, "name": n, "outcome": s, "job_id": j} for w, n, s, j in steps]
    return Stmt(q["steps_settle"], {
        "rows": to_json(rows).decode(), "channel": q.channel("insert"),
        "events_channel": events_channel(q.schema),
    }, commit=commit, row_factory=dict_row)


def settlement(stmt: Stmt) -> Op[list[Payload]]:
    """Run a :func:`settle_statement`; return the ``workflow_finished`` events it sent."""
    result = yield stmt
    return list(result[0]["finished"] or [])


def sweep(q: Queries, limit: int) -> Op[tuple[list[Payload], list[Payload], int]]:
    """Settle up to ``limit`` finished steps of running workflows whose settlement was
    never recorded (a rescue that discarded one, a cancel made by hand in SQL).

    Their workflows are locked before the steps are read for good, so a sweep running at
    the same time neither settles nor announces one of them again. Returns the steps'
    events, the ``workflow_finished`` events and how many steps settled.
    """
    found = yield Stmt(q["jobs_unsettled"], {"limit": limit, "workflow_ids": None},
                       row_factory=dict_row)
    if not found:
        return [], [], 0
    workflow_ids = sorted({uuid_text(row["workflow_id"]) for row in found})
    yield lock(q, [row["workflow_id"] for row in found])
    rows = yield Stmt(q["jobs_unsettled"], {"limit": limit, "workflow_ids": workflow_ids},
                      row_factory=dict_row)
    events = yield from emit_steps(q, [
        StepEvent(r["workflow_id"], r["workflow_step"], r["step"], r["state"], r["job_id"],
                  r["attempt"], error=r["error"])
        for r in rows
    ])
    steps = [(r["workflow_id"], r["workflow_step"], r["state"], r["job_id"]) for r in rows]
    finished = yield from settle(q, steps, locked=True)
    return events, finished, len(steps)


def lock(q: Queries, workflow_ids: Iterable[uuid.UUID]) -> Stmt:
    """The statement that takes the locks settling steps of these workflows needs (in id
    order, so two transactions never deadlock); take them before touching job rows."""
    return Stmt(q["workflows_lock"], {"ids": sorted({uuid_text(w) for w in workflow_ids})},
                rows=False)


def cancel_step(q: Queries, job_id: int) -> Op[tuple[bool, list[Payload]]]:
    """Cancel a job; if it is a workflow step, settle it and announce it."""
    found = yield Stmt(q["job_workflow"], {"id": job_id}, row_factory=dict_row)
    row: dict[str, Any] = found[0] if found else {"workflow_id": None, "workflow_step": None}
    workflow_id = row["workflow_id"]
    if workflow_id is not None:
        # Lock the workflow before the job row, as the completer does, so they never deadlock.
        yield lock(q, [workflow_id])
    cancelled = yield from ops.cancel(q, job_id)
    events: list[Payload] = []
    step = row["workflow_step"]
    if cancelled and workflow_id is not None and step is not None:
        events = yield from emit_steps(q, [StepEvent(
            workflow_id, step, row["step"], "cancelled", job_id, row["attempt"],
            error="cancelled")])
        events += yield from settle(
            q, [(workflow_id, step, JobState.CANCELLED.value, job_id)], locked=True)
    return cancelled, events


def store_result(q: Queries, workflow_id: uuid.UUID, name: str, value: Any) -> Op[None]:
    """Keep a step's result (wrapped, so a bare number or string survives)."""
    yield Stmt(q["node_store_result"], {
        "workflow_id": workflow_id, "name": name, "result": json_text(dump_result(value)),
    })


def dump_result(value: Any) -> Any:
    """Return the JSON form of a step's result (pydantic models are dumped)."""
    return to_jsonable_python(value)


def result(q: Queries, workflow_id: uuid.UUID, name: str) -> Op[Any]:
    """Return one step's stored result."""
    rows = yield Stmt(q["node_result"], {"workflow_id": workflow_id, "name": name},
                      row_factory=dict_row)
    if not rows:
        raise NoSuchStepError(str(workflow_id), name)
    if not rows[0]["has_result"]:
        raise NoResultError(name)
    return rows[0]["value"]


def results(q: Queries, workflow_id: uuid.UUID) -> Op[dict[str, Any]]:
    """Return every stored result of a workflow by step name."""
    rows = yield Stmt(q["workflow_results"], {"workflow_id": workflow_id},
                      row_factory=dict_row)
    return {row["name"]: row["value"] for row in rows}


_WORKFLOW_ROW = class_row(WorkflowInfo)


def get(q: Queries, workflow_id: uuid.UUID) -> Op[WorkflowInfo]:
    """Return a workflow's row."""
    rows = yield Stmt(q["workflow_get"], {"id": workflow_id}, row_factory=_WORKFLOW_ROW)
    if not rows:
        raise WorkflowNotFound(str(workflow_id))
    info: WorkflowInfo = rows[0]
    return info
