"""Human renderings for the command line: queue status, workflow lists and DAGs."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from baton.dag import topological_order
from baton.query import CostReport, WorkflowView

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
    return head + "\n\n" + table(["step", "state", "attempt", "duration", "cost", "deps"],
                                 rows) + total


def _expand(deps: Sequence[str], view: WorkflowView) -> list[str]:
    # A dependency on a fan-out group means each of its copies.
    groups: dict[str, list[str]] = {}
    for s in view.steps:
        if s.group_name:
            groups.setdefault(s.group_name, []).append(s.step_name)
    return [name for dep in deps for name in groups.get(dep, [dep])]
