"""Human renderings for the command line: queue status, workflow lists and DAGs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from baton.dag import topological_order
from baton.job import Job
from baton.query import CostReport, JobSummary, WorkflowView

MARKS = {"completed": "✓", "discarded": "✗", "cancelled": "⊘", "executing": "▶",
         "available": "·", "pending": "…", "scheduled": "◷", "retryable": "↻"}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return rows as an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def money(value: Decimal | None) -> str:
    """Return a cost for people ('-' when unknown)."""
    return "-" if value is None else f"{value:.6f}".rstrip("0").rstrip(".")


def workflow_dag(view: WorkflowView, cost: CostReport | None = None) -> str:
    """Draw a workflow: steps in dependency order, indented by depth, with their state."""
    steps = {s.step_name: s for s in view.steps}
    costs: dict[str, Decimal] = {}
    for line in cost.lines if cost else []:
        if line.step_name is not None and line.cost is not None:
            costs[line.step_name] = costs.get(line.step_name, Decimal(0)) + line.cost
    graph = {name: [d for d in _expand(s.deps, view) if d in steps]
             for name, s in steps.items()}
    depth: dict[str, int] = {}
    for name in topological_order(graph):
        depth[name] = 1 + max((depth[d] for d in graph[name]), default=-1)
    head = (f"workflow {view.label} ({view.id})  {view.state}  "
            f"{view.settled_steps}/{view.total_steps} settled")
    if view.failed_steps:
        head += f"  failed: {', '.join(view.failed_steps)}"
    rows = []
    for name in sorted(steps, key=lambda n: (depth[n], steps[n].job_id)):
        s = steps[name]
        label = "  " * depth[name] + f"{MARKS.get(s.state or '', '?')} {name}"
        deps = ("← " + ", ".join(s.deps)) if s.deps else ""
        took = f"{s.duration:.3f}s" if s.duration is not None else ""
        rows.append([label, s.state, s.attempt, took, money(costs.get(name)), deps])
    total = f"\ntotal cost: {money(cost.total_cost)}" if cost and cost.lines else ""
    failed = [(name, s) for name, s in steps.items()
              if s.state in ("discarded", "cancelled", "retryable") and s.last_error]
    errors = "".join(f"\n  {name} ({s.state}, attempt {s.attempt}): {s.last_error}"
                     for name, s in sorted(failed, key=lambda item: item[1].job_id))
    return head + "\n\n" + table(["step", "state", "attempt", "duration", "cost", "deps"],
                                 rows) + total + ("\n\nlast errors:" + errors if errors else "")


def job(job: Job, result: Mapping[str, Any]) -> str:
    """Describe one job for ``baton job show``: its row, every error with its traceback,
    and its result (``result_kept``/``result``, or ``result_missing`` saying why not)."""
    lines = [f"job {job.id}  {job.state.value}  {MARKS.get(job.state.value, '?')}"]
    fields: list[tuple[str, Any]] = [
        ("step", job.step), ("queue", job.queue),
        ("attempt", f"{job.attempt} of {job.max_attempts}"
                    + (f" (snoozed {job.snoozes}x)" if job.snoozes else "")),
        ("priority", job.priority), ("tags", ", ".join(job.tags) or "-"),
    ]
    if job.workflow_id is not None:
        fields.append(("workflow", f"{job.workflow_id} step {job.workflow_step}"))
    fields += [("inserted", job.inserted_at), ("scheduled", job.scheduled_at),
               ("attempted", f"{job.attempted_at} by {job.attempted_by}"
                if job.attempted_at else "-"), ("finalized", job.finalized_at or "-"),
               ("args", json.dumps(job.args))]
    if job.meta:
        fields.append(("meta", json.dumps(job.meta)))
    if job.unique_key is not None:
        fields.append(("unique key", job.unique_key))
    fields.append(("result", json.dumps(result["result"], default=str)
                   if result.get("result_kept") else f"- ({result.get('result_missing')})"))
    width = max(len(name) for name, _ in fields)
    lines += [f"{name.ljust(width)}  {value}" for name, value in fields]
    if job.errors:
        lines.append(f"\nerrors ({len(job.errors)}):")
    for entry in job.errors:
        lines.append(f"- attempt {entry.get('attempt')} at {entry.get('at')} "
                     f"({entry.get('kind')}): {entry.get('error')}")
        trace = entry.get("traceback")
        if trace:
            lines += ["    " + line for line in str(trace).rstrip().splitlines()]
    return "\n".join(lines)


def job_list(jobs: Sequence[JobSummary]) -> str:
    """Jobs as a table for ``baton job list``."""
    return table(["id", "state", "queue", "step", "attempt", "tags", "workflow", "inserted"],
                 [[j.id, j.state, j.queue, j.step, f"{j.attempt}/{j.max_attempts}",
                   ",".join(j.tags), j.workflow_step or "", j.inserted_at] for j in jobs])


def _expand(deps: Sequence[str], view: WorkflowView) -> list[str]:
    # A dependency on a fan-out group means each of its copies.
    groups: dict[str, list[str]] = {}
    for s in view.steps:
        if s.group_name:
            groups.setdefault(s.group_name, []).append(s.step_name)
    return [name for dep in deps for name in groups.get(dep, [dep])]
