"""Resuming a workflow: its discarded and cancelled steps run again, and it runs to a new end.

A resume forgets the settlements of the steps it runs again, so their dependents wait for
them as at the start; completed steps keep their results and do not run again. It takes
its workflow's lock before any job row, as settlement, the sweep and a cancel do.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from psycopg.rows import dict_row

from baton import ops
from baton.db import Queries
from baton.errors import NoSuchStepError, WorkflowNotFound
from baton.job import JobState
from baton.ops import Op, Stmt
from baton.workflows import announce, budgets
from baton.workflows.announce import Payload

RESUMABLE_STATES = frozenset({JobState.DISCARDED, JobState.CANCELLED})
"""The states of the jobs of the steps a resume runs again."""


def workflow_uuid(value: uuid.UUID | str) -> uuid.UUID:
    """Return ``value`` as a workflow id.

    :raises WorkflowNotFound: if it is not a UUID (no workflow has that id).
    """
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise WorkflowNotFound(str(value)) from None


def resume_workflow(
    q: Queries, workflow_id: uuid.UUID | str, steps: Iterable[str] | None = None
) -> Op[tuple[list[str], list[Payload]]]:
    """Run the discarded and cancelled steps of a workflow again, in one transaction.

    ``steps``: ``None`` for every such step; else those named and every step downstream of
    them that is discarded or cancelled. Returns the names resumed (none when there is
    nothing to do) and the ``workflow_resumed`` event sent for them.

    :raises WorkflowNotFound: if there is no such workflow.
    :raises NoSuchStepError: if it has no step of one of the names.
    :raises BudgetExceededError: if a budget whose scope holds a step to resume is spent
        (raise it with ``app.set_budget`` first); nothing is changed.
    """
    workflow_id = workflow_uuid(workflow_id)
    names = None if steps is None else list(dict.fromkeys(
        [steps] if isinstance(steps, str) else steps))
    rows = yield Stmt(q["workflow_lock_for_resume"], {"id": workflow_id, "names": names},
                      row_factory=dict_row)
    if not rows:
        raise WorkflowNotFound(str(workflow_id))
    workflow = rows[0]
    if workflow["unknown"]:
        raise NoSuchStepError(str(workflow_id), workflow["unknown"][0])
    found = yield Stmt(q["workflow_resume_targets"], {"id": workflow_id, "names": names},
                       row_factory=dict_row)
    if not found:
        return [], []
    # A spent budget keeps its steps from running again until it is raised.
    yield from budgets.check_room(q, workflow_id, [row["name"] for row in found])
    if workflow["finished"]:
        yield from budgets.new_run(q, workflow_id)
    done = yield Stmt(q["workflow_resume"], {
        "id": workflow_id, "names": [row["name"] for row in found],
        "channel": q.channel("insert"),
    }, row_factory=dict_row)
    resumed: list[str] = list(done[0]["steps"])
    events = yield from announce.send(q, [announce.resumed_payload(
        workflow_id, workflow["label"], done[0]["run"], resumed)])
    return resumed, events


def retry_step(q: Queries, job_id: int) -> Op[tuple[bool, list[Payload]]]:
    """Retry a job: a discarded or cancelled workflow step is resumed with the steps
    downstream of it; any other job is made available again unless it is running.

    Returns whether it changed, and the events sent.

    :raises JobNotFound: if there is no such job.
    """
    rows = yield Stmt(q["job_workflow"], {"id": job_id}, row_factory=dict_row)
    if rows:
        row = rows[0]
        if (row["workflow_id"] is not None and row["workflow_step"] is not None
                and row["state"] in RESUMABLE_STATES):
            resumed, events = yield from resume_workflow(q, row["workflow_id"],
                                                         [row["workflow_step"]])
            if resumed:
                return True, events
    return (yield from ops.retry(q, job_id)), []
