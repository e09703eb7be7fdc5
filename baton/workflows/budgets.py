"""Cost budgets of workflows: keeping them, charging usage to them, stopping steps.

A budget limits what the priced usage recorded by the steps of a workflow (or of one fan-out
group or sub-workflow in it: its scope) may cost, in US dollars. The write that records a
step's usage charges it to the budgets of that step (``budgets_charge``) in the same
transaction; once a budget is reached there, the steps in its scope that have not started
(held, available, scheduled, or waiting to retry) are cancelled with ``budget_exceeded`` in
their error entry, announced and settled in that transaction, so the workflow finishes as
soon as its running steps end, its ``workflow_finished`` carrying the reason and what it
spent. A workflow without a budget has no rows here, and no write of its runs these
statements.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.rows import class_row, dict_row
from pydantic import BaseModel

from baton.dag import Workflow, check_budget
from baton.db import Queries
from baton.errors import BudgetExceededError, WorkflowError, WorkflowNotFound
from baton.job import JobState, json_text
from baton.logs import get_logger
from baton.ops import Op, Rows, Stmt
from baton.workflows import announce, settle
from baton.workflows.announce import Payload, StepEvent

log = get_logger("baton.workflow")


class Budget(BaseModel):
    """One budget of a workflow, as it stands."""

    scope: str
    """``""`` for the whole workflow, else the fan-out group or sub-workflow it limits."""
    budget_usd: Decimal
    spent_usd: Decimal
    """What the priced usage of the steps in scope cost so far."""
    exceeded_at: datetime | None
    """When the spending reached the budget (``None`` while it has room)."""


def rows(wf: Workflow) -> list[dict[str, str]]:
    """The ``budgets`` rows of a workflow being inserted (none for most workflows)."""
    found = [{"scope": scope, "budget_usd": str(check_budget(usd, repr(scope)))}
             for scope, usd in wf.budgets.items()]
    if wf.budget_usd is not None:  # checked again: it may have been set after construction
        usd = check_budget(wf.budget_usd, f"workflow {wf.label!r}")
        found.insert(0, {"scope": "", "budget_usd": str(usd)})
    return found


def insert(q: Queries, workflow_id: uuid.UUID, wf: Workflow) -> Op[None]:
    """Keep the budgets of ``wf``, just inserted (or appended) as ``workflow_id``."""
    found = rows(wf)
    if found:
        yield Stmt(q["budgets_insert"], {"workflow_id": workflow_id, "rows": json_text(found)},
                   rows=False)


def charge(q: Queries, charges: Sequence[dict[str, Any]], workflow_ids: Iterable[uuid.UUID]
           ) -> Stmt:
    """The statement charging priced usage (``workflow_id``, ``step_name``, ``cost``) to
    budgets and stopping the steps of those reached, in ``workflow_ids`` (locked); its rows
    go to :func:`stop`."""
    return Stmt(q["budgets_charge"], {"charges": json_text(list(charges)),
                                      "workflow_ids": sorted({str(w) for w in workflow_ids})},
                row_factory=dict_row)


def stop(q: Queries, stopped: Rows, settled: Sequence[settle.Settled]
         ) -> Op[list[Payload]]:
    """Announce the steps a charge stopped, and settle them with ``settled`` (the steps the
    write finished); return the events sent. Their workflows are locked already."""
    events: list[Payload] = []
    if stopped:
        for workflow_id in sorted({r["workflow_id"] for r in stopped}):
            mine = [r for r in stopped if r["workflow_id"] == workflow_id]
            log.warning("workflow.budget_exceeded", workflow_id=str(workflow_id),
                        workflow_label=mine[0]["label"], reason=mine[0]["reason"],
                        stopped=len(mine), steps=[r["workflow_step"] for r in mine][:20])
        events = yield from announce.send_steps(q, [StepEvent(
            r["workflow_id"], r["label"], r["workflow_step"], r["step"], "cancelled",
            r["job_id"], r["attempt"], error=r["reason"]) for r in stopped])
    steps = [*settled, *((r["workflow_id"], r["workflow_step"], JobState.CANCELLED.value,
                          r["job_id"]) for r in stopped)]
    events += yield from settle.settle(q, steps, locked=True)
    return events


def set_budget(q: Queries, workflow_id: uuid.UUID, usd: Decimal | float, group: str | None
               ) -> Op[tuple[Budget, list[Payload]]]:
    """Set a budget of a workflow (its own, or ``group``'s); stop its steps now if what
    they spent already reaches it. Returns the budget and the events sent.

    :raises WorkflowNotFound: if there is no such workflow.
    :raises WorkflowError: if it has no such group or sub-workflow, or ``usd`` is not a
        positive number.
    """
    scope = group or ""
    amount = check_budget(usd, f"workflow {workflow_id}" if not scope else repr(scope))
    found = yield Stmt(q["workflows_lock"], {"ids": [str(workflow_id)]})
    if not found:
        raise WorkflowNotFound(str(workflow_id))
    done = yield Stmt(q["budget_set"], {"workflow_id": workflow_id, "scope": scope,
                                        "budget_usd": amount}, row_factory=dict_row)
    if not done:
        raise WorkflowError(f"workflow {workflow_id} has no fan-out group or sub-workflow "
                            f"named {scope!r} to budget")
    events: list[Payload] = []
    if done[0]["reached"]:
        stopped = yield charge(q, [], [workflow_id])
        events = yield from stop(q, stopped, [])
    budget = yield from _get(q, workflow_id, scope)
    return budget, events


def _get(q: Queries, workflow_id: uuid.UUID, scope: str) -> Op[Budget]:
    found: list[Budget] = yield Stmt(q["budgets_of_workflow"], {"workflow_id": workflow_id},
                                     row_factory=_BUDGET_ROW)
    return next(b for b in found if b.scope == scope)


_BUDGET_ROW = class_row(Budget)


def budgets(q: Queries, workflow_id: uuid.UUID) -> Op[list[Budget]]:
    """Return the budgets of a workflow, its own first (none if it has no budget)."""
    found: list[Budget] = yield Stmt(q["budgets_of_workflow"], {"workflow_id": workflow_id},
                                     row_factory=_BUDGET_ROW)
    return found


def new_run(q: Queries, workflow_id: uuid.UUID) -> Op[None]:
    """Forget why steps of the last run were stopped: a finished workflow starts a new run."""
    yield Stmt(q["workflow_stop_reason_clear"], {"id": workflow_id}, rows=False)


def check_room(q: Queries, workflow_id: uuid.UUID, names: Sequence[str]) -> Op[None]:
    """Refuse to run the steps ``names`` (again, or appended) while a budget whose scope
    holds one of them is spent.

    :raises BudgetExceededError: naming the budget (the widest, if several).
    """
    found = yield Stmt(q["budgets_blocking"], {"workflow_id": workflow_id,
                                               "names": list(names)}, row_factory=dict_row)
    if found:
        row = found[0]
        raise BudgetExceededError(str(workflow_id), row["scope"], row["spent_usd"],
                                  row["budget_usd"])
