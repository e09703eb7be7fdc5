"""The runtime dependency gate: may a workflow step run now? Pure, no I/O.

A step is released by the completion of its last dependency, and still checks its
dependency rows when it starts, so correctness never rests on timing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple


class Dep(NamedTuple):
    """One dependency as the gate sees it: a step's gate lists those that did not complete."""

    name: str
    outcome: str | None  # completed, discarded, cancelled, or None while unsettled
    exists: bool = True


class Found(NamedTuple):
    """A completed dependency's result, with the fan-out group and model of its step."""

    name: str
    group: str | None
    model: str | None
    result: Any


@dataclass(frozen=True)
class Decision:
    """What to do with a step: run it, wait (snooze), or cancel it."""

    action: Literal["run", "wait", "cancel"]
    reason: str = ""
    failed: list[Dep] = field(default_factory=list)


def decide(
    deps: list[Dep],
    *,
    ignore_cancelled: bool,
    ignore_discarded: bool,
    min_success: int | None = None,
    total: int | None = None,
) -> Decision:
    """Decide whether a step runs, waits or is cancelled, given its dependencies that did
    not complete (or all of them) in ``deps`` and how many it has in all (``total``, by
    default ``len(deps)``).

    - a dependency whose rows were pruned: cancel, whatever the flags say;
    - any dependency not settled yet: wait (no attempt used);
    - with ``min_success``: run when at least that many completed, else cancel;
    - a cancelled (discarded) dependency: cancel unless ``ignore_cancelled``
      (``ignore_discarded``), in which case it counts as done;
    - otherwise run.
    """
    missing = [d for d in deps if not d.exists]
    if missing:
        return Decision("cancel", f"dependency {missing[0].name!r} no longer exists (pruned)",
                        missing)
    waiting = [d for d in deps if d.outcome is None]
    if waiting:
        return Decision("wait", f"waiting on {', '.join(d.name for d in waiting[:5])}")
    failed = [d for d in deps if d.outcome != "completed"]
    if min_success is not None:
        total = len(deps) if total is None else total
        done = total - len(failed)
        if done >= min_success:
            return Decision("run", failed=failed)
        return Decision(
            "cancel",
            f"only {done} of {total} dependencies completed; {min_success} needed",
            failed,
        )
    blocking = [
        d for d in failed
        if (d.outcome == "cancelled" and not ignore_cancelled)
        or (d.outcome == "discarded" and not ignore_discarded)
    ]
    if blocking:
        first = blocking[0]
        return Decision("cancel", f"dependency {first.name!r} was {first.outcome}", blocking)
    return Decision("run", failed=failed)


def gather_results(
    declared: list[str],
    groups: Collection[str],
    found: Callable[[str], Found | None],
    members: Mapping[str, list[Found]],
) -> dict[str, Any]:
    """Map each declared dependency to its result; a group maps model → result.

    ``found`` gives a step dependency's result (``None`` if it has none or did not
    complete), ``members`` the results of each group's completed members. Dependencies
    without a result are left out (as are group members without one).
    """
    results: dict[str, Any] = {}
    for name in declared:
        if name in groups:
            results[name] = {(f.model or f.name): f.result for f in members.get(name, ())}
        elif (hit := found(name)) is not None:
            results[name] = hit.result
    return results
