"""Settlement: recording finished steps, releasing dependents, finishing workflows.

When steps finish, in the finishing transaction, their ``completions`` rows are written
once, their dependents' counters go down, dependents with nothing left to wait on are
released (``pending`` → ``available``) and their queues woken, and a workflow whose every
step settled is finished exactly once per run, its ``workflow_finished`` event sent.
Every writer locks the workflows it settles (in id order) before it touches their job
rows: the completer, a cancel, the sweep and a resume.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg.rows import dict_row
from pydantic_core import to_json

from baton import ops
from baton.db import Queries
from baton.job import JobState
from baton.ops import Op, Rows, Stmt
from baton.workflows import announce
from baton.workflows.announce import Payload, StepEvent

SETTLED_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


Settled = tuple[uuid.UUID, str, str, int]
"""A step that settled: workflow id, step name, final state, job id."""


def lock(q: Queries, workflow_ids: Iterable[uuid.UUID]) -> Stmt:
    """The statement that takes the locks settling steps of these workflows needs (in id
    order, so two transactions never deadlock); take them before touching job rows."""
    return Stmt(q["workflows_lock"], {"ids": sorted(str(w) for w in set(workflow_ids))},
                rows=False)


def statement(q: Queries, steps: Sequence[Settled]) -> Stmt:
    """The settlement of ``steps`` (see ``steps_settle``); its rows go to :func:`finished`."""
    rows = [{"workflow_id": w, "name": n, "outcome": s, "job_id": j} for w, n, s, j in steps]
    return Stmt(q["steps_settle"], {"rows": to_json(rows).decode(),
                                    "channel": q.channel("insert")}, row_factory=dict_row)


def finished(rows: Rows) -> list[Payload]:
    """The ``workflow_finished`` events of the workflows a settlement finished."""
    return [announce.finished_payload(row) for row in rows if row["id"] is not None]


def settle(q: Queries, steps: Sequence[Settled], *, locked: bool = False
           ) -> Op[list[Payload]]:
    """Record that ``steps`` settled, release their dependents, finish and announce the
    workflows they complete; return the ``workflow_finished`` events sent.

    Run it in the transaction that finished the steps (``locked``: it already holds their
    workflows' locks). Only a step whose job is in that final state counts, and only the
    first record of a step's settlement: a workflow finishes once per run.
    """
    if not steps:
        return []
    if not locked:
        yield lock(q, [wf_id for wf_id, *_ in steps])
    rows = yield statement(q, steps)
    return (yield from announce.send(q, finished(rows)))


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
    workflow_ids = sorted({str(row["workflow_id"]) for row in found})
    yield lock(q, [row["workflow_id"] for row in found])
    rows = yield Stmt(q["jobs_unsettled"], {"limit": limit, "workflow_ids": workflow_ids},
                      row_factory=dict_row)
    events = yield from announce.send_steps(q, [
        StepEvent(r["workflow_id"], r["label"], r["workflow_step"], r["step"], r["state"],
                  r["job_id"], r["attempt"], error=r["error"])
        for r in rows
    ])
    steps = [(r["workflow_id"], r["workflow_step"], r["state"], r["job_id"]) for r in rows]
    done = yield from settle(q, steps, locked=True)
    return events, done, len(steps)


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
        events = yield from announce.send_steps(q, [StepEvent(
            workflow_id, row["label"], step, row["step"], "cancelled", job_id, row["attempt"],
            error="cancelled")])
        events += yield from settle(
            q, [(workflow_id, step, JobState.CANCELLED.value, job_id)], locked=True)
    return cancelled, events
