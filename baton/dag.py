"""Workflows as data: the builder users call and the validation run before insertion.

Pure: nothing here touches the database. A :class:`Workflow` is checked whole (unknown
dependencies, duplicate names, cycles by Kahn's algorithm) before one row is written.
A workflow added as one step of another is flattened into it here, with the built-in step
that reports its result (:data:`SUBWORKFLOW_STEP`).
"""

from __future__ import annotations

import math
import re
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from baton.context import Context
from baton.errors import CycleError, DuplicateStepError, UnknownDependencyError, WorkflowError
from baton.job import JobSpec
from baton.step import Step, StepOptions
from baton.unique import Unique, coerce_unique

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid step name (1-200 of letters, digits, ``_.:-``)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise WorkflowError(
            f"invalid step name {name!r}: use 1-200 letters, digits, '_', '.', ':' or '-'"
        )
    return name


BUDGET_MAX = Decimal("9999999999")
"""The largest budget, in US dollars (budgets are kept to the cent's millionth)."""


def check_budget(value: Any, what: str) -> Decimal:
    """Return ``value`` as a budget in US dollars: a positive number of at most
    :data:`BUDGET_MAX`, kept to 8 decimal places.

    :raises WorkflowError: naming ``what`` the budget is for, if it is not one.
    """
    problem = f"budget of {what} must be a positive number of US dollars, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise WorkflowError(problem)
    try:
        usd = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, ValueError):
        raise WorkflowError(problem) from None
    if not usd.is_finite() or (isinstance(value, float) and not math.isfinite(value)):
        raise WorkflowError(problem)
    if usd > BUDGET_MAX:
        raise WorkflowError(f"{problem} (the largest is {BUDGET_MAX})")
    usd = usd.quantize(Decimal("0.00000001"))
    if usd <= 0:
        raise WorkflowError(f"{problem} (the smallest is 0.00000001)")
    return usd


def model_slug(model: str) -> str:
    """Return the short form of a model name used in fan-out step names.

    ``"openai/gpt-4o-mini"`` → ``"gpt_4o_mini"``.
    """
    short = model.rsplit("/", 1)[-1]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", short).strip("_").lower()
    return slug or "model"


@dataclass
class Node:
    """One step of a workflow as the builder holds it."""

    name: str
    job: JobSpec
    deps: list[str]
    ignore_cancelled: bool | None = None
    ignore_discarded: bool | None = None
    group: str | None = None
    model: str | None = None
    min_success: int | None = None
    strict: bool = False
    """With ``min_success``: the dependencies that failed still fail the workflow."""


@dataclass
class Workflow:
    """A DAG of jobs with named dependencies.

    >>> wf = Workflow("ingest")
    >>> wf.add("fetch", fetch.new(url=url))          # doctest: +SKIP
    >>> wf.add("parse", parse.new(), deps=["fetch"])  # doctest: +SKIP

    :param label: a free human label (``workflow_name`` in Baton), e.g. ``"patent:US1"``.
    :param id: the workflow's id; a fresh UUID by default.
    :param unique: at most one workflow with the same key at a time (:class:`~baton.Unique`:
        its label, with ``by_label=True``, or its label and all its steps); a second
        insert returns the first workflow's id, flagged ``duplicate``. ``True`` for the
        defaults. Jobs inside a workflow are never unique: their own ``unique`` is ignored.
    :param ignore_cancelled: run steps whose dependency was cancelled (workflow default).
    :param ignore_discarded: run steps whose dependency was discarded (workflow default).
    :param debug: capture the context of every step.
    :param models: a per-step model map: ``ctx.model`` for the named steps.
    :param budget_usd: what the recorded usage of all its steps may cost, in US dollars;
        once reached, its steps that have not started are cancelled (``budget_exceeded``).
        Budgets of groups: :meth:`budget`, or ``add_fan_out(..., budget_usd=...)``.
    """

    label: str = "workflow"
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    ignore_cancelled: bool = False
    ignore_discarded: bool = False
    debug: bool = False
    unique: Unique | None = None
    models: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    budget_usd: Decimal | float | None = None
    budgets: dict[str, Decimal] = field(default_factory=dict)
    """Budgets of fan-out groups and sub-workflows, by name (see :meth:`budget`)."""
    added_as: str | None = field(default=None, init=False, repr=False, compare=False)
    """The step name this workflow was added under as a sub-workflow (it is closed then)."""

    def __post_init__(self) -> None:
        if self.unique is not None:
            self.unique = coerce_unique(self.unique)
            if self.unique is not None:
                self.unique.workflow_states()  # refuses a job's options
        if isinstance(self.id, str):
            self.id = uuid.UUID(self.id)
        if self.budget_usd is not None:
            self.budget_usd = check_budget(self.budget_usd, f"workflow {self.label!r}")

    def budget(self, name: str, usd: Decimal | float) -> Workflow:
        """Limit what the recorded usage of the steps of the fan-out group or sub-workflow
        ``name`` may cost, in US dollars; return the workflow.

        Once their usage reaches ``usd``, those of its steps that have not started are
        cancelled (``budget_exceeded``); the running ones finish. Steps outside it go on
        as their dependencies allow.

        :raises WorkflowError: if there is no such group or sub-workflow (add it first), or
            ``usd`` is not a positive number.
        """
        self._check_open()
        node = self.nodes.get(name)
        if name not in self.groups and (node is None or node.job.step != SUBWORKFLOW_STEP):
            raise WorkflowError(
                f"no fan-out group or sub-workflow named {name!r} to budget: add it first "
                "(a single step's budget is its workflow's, or put it in a group)")
        self.budgets[name] = check_budget(usd, f"{name!r}")
        return self

    def add(
        self,
        name: str,
        job: JobSpec | Workflow,
        *,
        deps: Iterable[str] = (),
        ignore_cancelled: bool | None = None,
        ignore_discarded: bool | None = None,
        model: str | None = None,
        min_success: int | None = None,
        strict: bool = False,
    ) -> Workflow:
        """Add a step called ``name`` that runs ``job`` after ``deps``; return the workflow.

        A dependency may name a step or a fan-out group (meaning all of its copies).
        Per-step ``ignore_*`` flags override the workflow's. ``min_success`` (with group
        dependencies) lets the step run once at least that many of them completed; once
        it completed, the dependencies that failed no longer fail the workflow (its quorum
        was met) unless ``strict`` is true.

        ``job`` may be a whole :class:`Workflow`, run as this one step (a sub-workflow).
        Its steps are copied in now, named ``<name>.<step>``; those with no dependency
        inside it take ``deps`` (and the ``ignore_*`` flags and ``min_success`` given
        here), and its steps without a flag of their own take its workflow-level flags.
        A step called ``name`` runs once all of them completed; its result is the result
        of the sub-workflow's last step, or ``{step: result}`` when several steps end it
        (a fan-out that ends it counts as one step whose result is ``{model: result}``).
        If a step of the sub-workflow fails, the step ``name`` is cancelled, and so are its
        dependents unless their flags say otherwise. The sub-workflow is closed from then
        on: it cannot grow or be added again. A sub-workflow with ``debug=True`` turns
        debug on for this whole workflow (debug is kept per workflow).

        :raises DuplicateStepError: if the name is taken (or, for a sub-workflow, one of
            the names its steps take).
        :raises WorkflowError: if the step is invalid; for a sub-workflow, also if it is
            this workflow, was added before, is empty or invalid, or ``model`` is given.
        """
        check_name(name)
        self._check_open()
        if name in self.nodes or name in self.groups:
            raise DuplicateStepError(name)
        dep_names = [str(d) for d in ([deps] if isinstance(deps, str) else deps)]
        if len(set(dep_names)) != len(dep_names):
            raise WorkflowError(f"step {name!r} lists a dependency twice")
        if min_success is not None and min_success < 0:
            raise WorkflowError(f"step {name!r}: min_success must be >= 0")
        if isinstance(job, Workflow):
            if model is not None:
                raise WorkflowError(
                    f"step {name!r}: model= is for a job; give the sub-workflow's steps "
                    "their models (Workflow(models=...) or add(..., model=...)) instead")
            self._add_workflow(name, job, dep_names, ignore_cancelled, ignore_discarded,
                               min_success)
            return self
        if not isinstance(job, JobSpec):
            raise WorkflowError(
                f"step {name!r}: expected a job from step.new() or a Workflow, got {job!r}")
        self.nodes[name] = Node(
            name, job, dep_names, ignore_cancelled, ignore_discarded,
            model=model or self.models.get(name), min_success=min_success, strict=strict,
        )
        return self

    def _check_open(self) -> None:
        if self.added_as is not None:
            raise WorkflowError(
                f"workflow {self.label!r} was added as step {self.added_as!r} of another "
                "workflow, which copied its steps then; build it whole before adding it")

    def _add_workflow(
        self,
        name: str,
        child: Workflow,
        deps: list[str],
        ignore_cancelled: bool | None,
        ignore_discarded: bool | None,
        min_success: int | None,
    ) -> None:
        """Flatten ``child`` into this workflow as the step ``name`` (see :meth:`add`)."""
        if child is self:
            raise WorkflowError(f"step {name!r}: a workflow cannot be added to itself")
        if child.added_as is not None:
            raise WorkflowError(
                f"step {name!r}: workflow {child.label!r} was already added as step "
                f"{child.added_as!r}; build a new Workflow for each place it runs")
        child.validate()
        prefix = f"{name}."
        taken = [prefix + n for n in (*child.nodes, *child.groups)]
        for new_name in taken:
            check_name(new_name)
            if new_name in self.nodes or new_name in self.groups:
                raise DuplicateStepError(new_name)
        used = {d for node in child.nodes.values() for d in child.expand(node.deps)}
        leaves = [n for n in child.nodes if n not in used]
        # A fan-out whose every copy ends the child is reported as its group: {model: result}.
        ends: list[str] = []
        for leaf in leaves:
            group = child.nodes[leaf].group
            whole = group is not None and not used.intersection(child.groups[group])
            end = group if group is not None and whole else leaf
            if end not in ends:
                ends.append(end)
        for node in child.nodes.values():
            copy = replace(
                node, name=prefix + node.name, deps=[prefix + d for d in node.deps],
                group=None if node.group is None else prefix + node.group,
                model=node.model or self.models.get(prefix + node.name),
                ignore_cancelled=(child.ignore_cancelled if node.ignore_cancelled is None
                                  else node.ignore_cancelled),
                ignore_discarded=(child.ignore_discarded if node.ignore_discarded is None
                                  else node.ignore_discarded),
            )
            if not node.deps:
                copy.deps = list(deps)
                if ignore_cancelled is not None:
                    copy.ignore_cancelled = ignore_cancelled
                if ignore_discarded is not None:
                    copy.ignore_discarded = ignore_discarded
                if min_success is not None:
                    copy.min_success = min_success
            self.nodes[copy.name] = copy
        for group, members in child.groups.items():
            self.groups[prefix + group] = [prefix + m for m in members]
        for scope, usd in child.budgets.items():
            self.budgets[prefix + scope] = usd
        last = child.nodes[leaves[0]].job
        collector = JobSpec(SUBWORKFLOW_STEP, {"leaves": ends}, queue=last.queue,
                            priority=last.priority)
        # Explicit flags: the workflow's own must not let it report a child that failed.
        self.nodes[name] = Node(name, collector, [prefix + end for end in ends],
                                ignore_cancelled=False, ignore_discarded=False)
        self.debug = self.debug or child.debug
        if child.budget_usd is not None:
            self.budgets[name] = Decimal(child.budget_usd)
        child.added_as = name

    def add_fan_out(
        self,
        name: str,
        job: JobSpec,
        *,
        models: Sequence[str],
        deps: Iterable[str] = (),
        synthesize_with: JobSpec | None = None,
        synthesize_model: str | None = None,
        min_success: int | None = None,
        ignore_cancelled: bool | None = None,
        ignore_discarded: bool | None = None,
        strict: bool = False,
        budget_usd: Decimal | float | None = None,
    ) -> list[str]:
        """Run ``job`` once per model as a group called ``name``; return the copies' names.

        Each copy is named ``<name>_<model short form>`` and sees its model in
        ``ctx.model``. With ``synthesize_with``, a ``<name>_synthesis`` step depends on the
        whole group and reads every copy's result keyed by model in ``ctx.results[name]``;
        it runs once ``min_success`` copies completed (default: all of them). When it
        completes, copies that failed do not fail the workflow, unless ``strict``.
        ``budget_usd`` limits what the copies' recorded usage may cost (see :meth:`budget`).
        """
        check_name(name)
        self._check_open()
        if not models:
            raise WorkflowError(f"fan-out {name!r} needs at least one model")
        if len(set(models)) != len(models):
            raise WorkflowError(f"fan-out {name!r} lists a model twice")
        if name in self.nodes or name in self.groups:
            raise DuplicateStepError(name)
        if min_success is not None and not 0 <= min_success <= len(models):
            raise WorkflowError(f"fan-out {name!r}: min_success must be within 0..{len(models)}")
        usd = None if budget_usd is None else check_budget(budget_usd, f"fan-out {name!r}")
        members: list[str] = []
        taken: set[str] = set()
        for model in models:
            base = f"{name}_{model_slug(model)}"
            member, n = base, 2
            while member in taken or member in self.nodes:
                member, n = f"{base}_{n}", n + 1
            taken.add(member)
            self.add(member, job, deps=deps, model=model, ignore_cancelled=ignore_cancelled,
                     ignore_discarded=ignore_discarded)
            self.nodes[member].group = name
            members.append(member)
        self.groups[name] = members
        if usd is not None:
            self.budgets[name] = usd
        if synthesize_with is not None:
            # Failed copies must not cancel the synthesis: it decides by min_success.
            self.add(f"{name}_synthesis", synthesize_with, deps=[name],
                     model=synthesize_model, min_success=len(models) if min_success is None
                     else min_success, ignore_cancelled=True, ignore_discarded=True,
                     strict=strict)
        return members

    def expand(self, deps: Iterable[str]) -> list[str]:
        """Return ``deps`` with group names replaced by their members."""
        out: list[str] = []
        for dep in deps:
            out.extend(self.groups.get(dep, [dep]))
        return out

    def validate(self, existing: Iterable[str] = ()) -> list[str]:
        """Check the whole DAG and return the step names in a topological order.

        ``existing`` names steps already stored (a dynamic append may depend on them).

        :raises WorkflowError: if the workflow is empty.
        :raises UnknownDependencyError: if a dependency names no step or group.
        :raises CycleError: if the dependencies form a cycle (the error names it).
        """
        if not self.nodes:
            raise WorkflowError("a workflow needs at least one step")
        known_outside = set(existing)
        for name in self.nodes:
            if name in known_outside:
                raise DuplicateStepError(name)
        for node in self.nodes.values():
            for dep in node.deps:
                if dep not in self.nodes and dep not in self.groups and dep not in known_outside:
                    raise UnknownDependencyError(node.name, dep)
                if dep == node.name or node.name in self.groups.get(dep, ()):
                    raise CycleError([node.name, node.name])
        return topological_order(
            {n.name: [d for d in self.expand(n.deps) if d in self.nodes]
             for n in self.nodes.values()}
        )


SUBWORKFLOW_STEP = "baton.subworkflow"
"""The name every :class:`~baton.Baton` app registers the step reporting a sub-workflow's
result under (reserved: no other step may take it)."""


async def subworkflow_result(ctx: Context, leaves: list[str]) -> Any:
    """Return the result of a sub-workflow's last step, or ``{step: result}`` when several
    steps end it (``leaves``: their names inside it, which this step's name prefixes)."""
    found = {leaf: ctx.results.get(f"{ctx.step}.{leaf}") for leaf in leaves}
    return found[leaves[0]] if len(leaves) == 1 else found


def subworkflow_step() -> Step:
    """Return the built-in step that reports a sub-workflow's result."""
    return Step(subworkflow_result, StepOptions(), name=SUBWORKFLOW_STEP)


def topological_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """Order ``graph`` (node → its dependencies) by Kahn's algorithm.

    :raises CycleError: naming the steps of one cycle, in order.
    """
    indegree = {name: len(deps) for name, deps in graph.items()}
    dependents: dict[str, list[str]] = {name: [] for name in graph}
    for name, deps in graph.items():
        for dep in deps:
            dependents[dep].append(name)
    ready = deque(sorted(n for n, d in indegree.items() if d == 0))
    order: list[str] = []
    while ready:
        name = ready.popleft()
        order.append(name)
        for child in dependents[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    if len(order) == len(graph):
        return order
    raise CycleError(_find_cycle({n: list(graph[n]) for n, d in indegree.items() if d > 0}))


def _find_cycle(graph: dict[str, list[str]]) -> list[str]:
    # Every node left has an unresolved dependency inside the remainder: walk until a
    # node repeats, then cut the walk at its first visit.
    start = sorted(graph)[0]
    path: list[str] = []
    seen: dict[str, int] = {}
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in graph[node] if d in graph)
    cycle = path[seen[node]:]
    cycle.reverse()  # dependency order: a -> b means b depends on a
    return [*cycle, cycle[0]]
