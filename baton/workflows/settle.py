"""Settlement: recording finished steps, releasing dependents, finishing workflows."""


from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg.rows import dict_row
from pydantic_core import to_json

from baton import ops
from baton.db import Queries
from baton.events import channel as events_channel
from baton.job import JobState
from baton.ops import Op, Stmt
from baton.workflows.announce import Payload, StepEvent, emit_steps, uuid_text

SETTLED_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


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

