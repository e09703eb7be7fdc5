"""Kept results of plain jobs: what the completer writes and what ``app.result_of`` reads.

A step declared with ``keep_result=True`` has the return value of each of its plain jobs
kept in ``job_results`` (a table of its own, so the hot ``jobs`` table stays narrow). The
row is written by the completer in the transaction that writes the completion, and only
for a job that completion applied to; pruning a job deletes its result. Workflow steps keep
their results in their node, as before; :func:`result_of` reads either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row

from baton.db import Queries
from baton.errors import JobNotFound, ResultNotKeptError, ResultNotReadyError
from baton.job import JobState, find_unstorable, json_text
from baton.logs import get_logger
from baton.ops import Op, Stmt
from baton.workflows.store import dump_result

if TYPE_CHECKING:
    from baton.step import Step
    from baton.worker.executor import Outcome

log = get_logger("baton.results")


def keep_statement(q: Queries, steps: Mapping[str, Step], outcomes: Sequence[Outcome]
                   ) -> Stmt | None:
    """The statement keeping the results of the completed plain jobs among ``outcomes``
    whose step keeps results, or None when there are none.

    A result that cannot be stored as JSON (not serializable, NaN, a NUL character) fails
    its job for good instead: the outcome becomes ``discarded`` with an error saying why,
    as a workflow step's does.
    """
    rows: list[dict[str, Any]] = []
    for o in outcomes:
        if o.state is not JobState.COMPLETED or o.job.workflow_id is not None:
            continue
        step = steps.get(o.job.step)
        if step is None or not step.options.keep_result:
            continue
        try:
            value = dump_result(o.result)
            text = json_text(value)
            if "\\u0000" in text and (found := find_unstorable(value, "result")) is not None:
                raise ValueError(f"{found[0]} {found[1]}")
        except Exception as exc:  # an unstorable result is the step's bug: say so
            o.state = JobState.DISCARDED
            o.error = {"attempt": o.job.attempt, "at": datetime.now(UTC).isoformat(),
                       "kind": "result",
                       "error": f"result cannot be kept as JSON: {type(exc).__name__}: {exc}"}
            continue
        rows.append({"job_id": o.job.id, "result": value})
    if not rows:
        return None
    return Stmt(q["job_results_keep"], {"rows": json_text(rows)}, rows=False)


def result_of(q: Queries, job_id: int) -> Op[Any]:
    """Return the kept result of a job (a workflow step's stored result for a step).

    :raises JobNotFound: if there is no such job.
    :raises ResultNotReadyError: if it has not completed.
    :raises ResultNotKeptError: if it completed but its result was not kept.
    """
    rows = yield Stmt(q["job_result_get"], {"id": job_id}, row_factory=dict_row)
    if not rows:
        raise JobNotFound(job_id)
    row = rows[0]
    if row["state"] != JobState.COMPLETED:
        raise ResultNotReadyError(job_id, row["state"])
    if row["workflow_id"] is not None:
        return row["step_result"] if row["step_has_result"] else None
    if not row["kept"]:
        raise ResultNotKeptError(job_id, row["step"])
    return row["result"]
