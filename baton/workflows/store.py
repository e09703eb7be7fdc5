"""Workflow rows written and read by clients: insert, append, results, the workflow row."""


from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Self

from psycopg.rows import class_row, dict_row
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from baton.dag import Workflow
from baton.db import Queries
from baton.errors import NoResultError, NoSuchStepError, WorkflowError, WorkflowNotFound
from baton.job import JobState, json_text
from baton.ops import Op, Stmt, insert_jobs
from baton.unique import WorkflowId, workflow_key
from baton.workflows import budgets


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


def insert(q: Queries, wf: Workflow) -> Op[WorkflowId]:
    """Validate ``wf`` and insert it in one transaction, one statement per table. A unique
    workflow whose key another workflow holds is not inserted: that one's id is returned,
    flagged ``duplicate``."""
    order = wf.validate()
    row = {
        "id": wf.id, "label": wf.label, "ignore_cancelled": wf.ignore_cancelled,
        "ignore_discarded": wf.ignore_discarded, "debug": wf.debug, "total": len(order),
    }
    if wf.unique is None:
        yield Stmt(q["workflow_insert"], row)
    elif (holder := (yield from insert_unique(q, wf, row))) is not None:
        return holder
    yield from _insert_steps(q, wf, order, settled=set())
    yield from budgets.insert(q, wf.id, wf)
    return WorkflowId(wf.id)


def insert_unique(q: Queries, wf: Workflow, row: dict[str, Any], now: datetime | None = None
                  ) -> Op[WorkflowId | None]:
    """Insert the row of a unique workflow (``row``: the parameters of ``workflow_insert``)
    unless another workflow holds its key; return that one's id, or None when inserted.

    ``now`` stands for the server's clock in a key's period (tests).
    """
    assert wf.unique is not None
    steps = [(name, node.job.step, node.job.args, node.deps) for name, node in wf.nodes.items()]
    params = {**row, "unique_key": workflow_key(wf.unique, wf.label, steps),
              "unique_period": wf.unique.period,
              "unique_states": wf.unique.workflow_states(), "now": now}
    while True:
        found = yield Stmt(q["workflow_insert_unique"], params)
        if not found:
            # The holder committed while the insert waited for it: a new statement sees it
            # (unless it left its states meanwhile: then try again).
            found = yield Stmt(q["workflow_get_by_unique_key"], params)
            found = [(found[0][0], True)] if found else []
        if found:
            holder, duplicate = found[0]
            return WorkflowId(holder, duplicate=True) if duplicate else None


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
            "strict": node.strict,
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
    :raises BudgetExceededError: if a spent budget of the workflow would hold a new step.
    """
    rows = yield Stmt(q["workflow_lock_for_append"], {"id": workflow_id}, row_factory=dict_row)
    if not rows:
        raise WorkflowNotFound(str(workflow_id))
    row = rows[0]
    if row["finished"]:
        raise WorkflowError(f"workflow {workflow_id} has finished; it cannot grow")
    if wf.budget_usd is not None:
        raise WorkflowError(
            f"steps appended to workflow {workflow_id} take its budget; budget the groups "
            "they add with budget(), or the workflow with app.set_budget()")
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
    yield from budgets.insert(q, workflow_id, wf)
    yield from budgets.check_room(q, workflow_id, order)  # a spent budget does not grow
    return order


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
