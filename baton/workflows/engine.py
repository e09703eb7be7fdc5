"""The workflow engine the worker runs: gates claimed steps, runs them, writes what follows.

It implements :class:`baton.worker.engine.Engine`. When steps are claimed it loads their
gate rows in one statement and announces them executing; when one starts it decides from
that row (reuse a stored result, wait, cancel, or run with its dependencies' results);
when outcomes are written it adds their results (committed first), usage records, step
events, the settlement that releases dependents, and the ``workflow_finished`` events of
the workflows that settlement finished.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import class_row
from pydantic_core import from_json

from baton import ops, results
from baton.job import JobState, json_text
from baton.logs import get_logger
from baton.ops import Op, Rows, Stmt
from baton.worker.engine import PLAIN, Payload, Write
from baton.worker.executor import FetchedJob, Outcome
from baton.workflows import announce, budgets, settle
from baton.workflows.gate import Dep, Found, decide, gather_results
from baton.workflows.store import dump_result

if TYPE_CHECKING:
    from baton.app import Baton
    from baton.context import Context
    from baton.worker.executor import Executor

log = get_logger("baton.workflow")

DEFER_SECONDS = 1.0
"""How long a step whose gate could not be read waits before it is tried again."""


@dataclass(slots=True)
class Results:
    """The dependencies' results loaded by one claim, shared by its steps: by workflow and
    name, the step's fan-out group and model and the result's JSON text; and the names of
    each group's members among them."""

    rows: dict[tuple[uuid.UUID, str], tuple[str | None, str | None, str]]
    members: dict[tuple[uuid.UUID, str], list[str]]

    def gather(self, gate: Gate, unfinished: list[Dep]) -> dict[str, Any]:
        """What ``ctx.results`` holds for ``gate``'s step, parsed for it alone (a step may
        change what it gets); the results of ``unfinished`` dependencies are left out."""
        wid = gate.workflow_id
        # The usual step, every dependency completed and none a group: 1.4 µs against 3.8
        # through gather_results (timeit, one dependency), for each of 10,000 steps.
        if not (unfinished or gate.groups):
            return {name: from_json(row[2]) for name in gate.deps
                    if (row := self.rows.get((wid, name))) is not None}
        skip = {d.name for d in unfinished}

        def found(name: str) -> Found | None:
            row = self.rows.get((wid, name))
            if row is None or name in skip:
                return None
            return Found(name, row[0], row[1], from_json(row[2]))

        groups = set(gate.groups)
        members = {g: [f for n in self.members.get((wid, g), ()) if (f := found(n))]
                   for g in gate.deps if g in groups}
        return gather_results(gate.deps, groups, found, members)


@dataclass(slots=True)
class Gate:
    """What a claimed step needs before it runs: a ``node_gates`` row, read by name."""

    workflow_id: uuid.UUID
    name: str
    has_result: bool
    result: Any
    deps: list[str]
    model: str | None
    min_success: int | None
    ignore_cancelled: bool
    ignore_discarded: bool
    label: str
    debug: bool
    dep_count: int
    dependencies: list[dict[str, Any]]
    """Its dependencies that did not complete, with whether their rows still exist."""
    groups: list[str]
    """Its declared dependencies that are fan-out groups."""
    results: Results = field(default_factory=lambda: Results({}, {}))
    workflow_key: str = ""
    """``workflow_id`` as text, made once per claim for the events and rows that carry it
    (``str`` of a UUID for each was 2 % of a worker's time in a 1 -> 10,000 -> 1 run)."""


_GATE_ROW = class_row(Gate)


class WorkflowEngine:
    """Runs workflow steps through their gate; plain jobs pass straight to the executor."""

    def __init__(self, app: Baton, executor: Executor) -> None:
        self.app = app
        self.executor = executor

    # -- claimed ---------------------------------------------------------------------------

    async def claimed(self, conn: psycopg.AsyncConnection[Any], jobs: list[FetchedJob]
                      ) -> list[Payload]:
        """Load the gates of the workflow steps among ``jobs`` in one statement and announce
        them executing."""
        steps = [j for j in jobs if j.workflow_id is not None]
        if not steps:
            return []
        q = self.app.sql
        # The steps' names by workflow, in one JSON text: psycopg dumps a list parameter
        # element by element, and two arrays of workflow ids and names for a 200-step claim
        # took 4 % of a worker's time in a 1 -> 10,000 -> 1 workflow.
        names: dict[uuid.UUID | None, list[str | None]] = {}
        for j in steps:
            names.setdefault(j.workflow_id, []).append(j.workflow_step)
        keys = {w: str(w) for w in names}
        params = {"steps": json_text({keys[w]: n for w, n in names.items()})}
        # Dependency results come once per claim, not once per step that needs them: a
        # 1 -> 10,000 -> 1 workflow whose first step returns 100 kB ran at 2,300 steps/s
        # when each step's gate row carried that result.
        async with conn.pipeline(), conn.cursor(row_factory=_GATE_ROW) as cur, \
                conn.cursor() as results:
            await cur.execute(q["node_gates"], params, prepare=True)
            await results.execute(q["node_dep_results"], params, prepare=True)
            found: dict[tuple[uuid.UUID | None, str], Gate] = {
                (g.workflow_id, g.name): g for g in await cur.fetchall()}
            texts = Results({}, {})
            for w, name, group, model, text in await results.fetchall():
                texts.rows[w, name] = (group, model, text)
                if group is not None:
                    texts.members.setdefault((w, group), []).append(name)
        events = []
        for job in steps:
            gate = job.gate = found.get((job.workflow_id, job.workflow_step or ""))
            job.gated = True
            if gate is not None:
                gate.results = texts
                gate.workflow_key = keys[job.workflow_id]
                events.append(announce.StepEvent(
                    gate.workflow_key, gate.label, gate.name, job.step, "executing", job.id,
                    job.attempt))
        return await ops.run_async(conn, announce.send_steps(q, events), "announce steps")

    # -- run -------------------------------------------------------------------------------

    async def run(self, job: FetchedJob) -> Outcome:
        """Run one claimed job: a workflow step through its gate, a plain job as it is."""
        if job.workflow_id is None:
            return await self.executor.run(job)
        if not job.gated:
            # Its claim could not read the gate: not the step's fault, so no attempt is used.
            log.warning("workflow.step_deferred", job_id=job.id, step_name=job.workflow_step,
                        retry_in=DEFER_SECONDS)
            return Outcome(job, JobState.SCHEDULED, delay=DEFER_SECONDS, snooze=True)
        gate: Gate | None = job.gate
        if gate is None:
            return Outcome(job, JobState.CANCELLED, error=_reason(job, "its workflow node is gone"))
        if gate.has_result:
            # The retry-idempotency guard: the step already produced a result.
            log.info("workflow.step_result_reused", workflow_id=str(job.workflow_id),
                     step_name=gate.name, job_id=job.id)
            return Outcome(job, JobState.COMPLETED, result=gate.result, has_result=True)
        unfinished = sorted(Dep(**d) for d in gate.dependencies)  # by name
        decision = decide(unfinished, total=gate.dep_count,
                          ignore_cancelled=gate.ignore_cancelled,
                          ignore_discarded=gate.ignore_discarded, min_success=gate.min_success)
        if decision.action == "wait":
            # Held again: its dependency's settlement releases it (the sweep backstops).
            return Outcome(job, JobState.PENDING, snooze=True)
        step = self.app.steps.get(job.step)
        ctx = None
        if step is not None:
            ctx = self.executor.context(job, step)
            ctx.workflow_label = gate.label
            ctx.deps = list(gate.deps)
            ctx.model = gate.model
            ctx.app = self.app
            ctx.failed_deps = [d.name for d in decision.failed]
            ctx.capture_enabled = ctx.capture_enabled or gate.debug
        if decision.action == "cancel":
            if ctx is not None and step is not None:
                await _callbacks(step.options, ctx, decision.failed, decision.reason)
            log.info("workflow.step_cancelled", workflow_id=str(job.workflow_id),
                     step_name=gate.name, reason=decision.reason)
            return Outcome(job, JobState.CANCELLED, error=_reason(job, decision.reason))
        if ctx is not None:
            ctx.results = gate.results.gather(gate, unfinished)
        outcome = await self.executor.run(job, ctx)
        if outcome.state is JobState.COMPLETED and outcome.result is not None:
            try:
                outcome.result = dump_result(outcome.result)
                outcome.has_result = True  # kept by the write, ahead of the completion
            except Exception as exc:  # an unserializable result is the step's bug
                outcome.state = JobState.DISCARDED
                outcome.error = _reason(job, f"result is not JSON-serializable: {exc}")
        return outcome

    # -- written ---------------------------------------------------------------------------

    def written(self, outcomes: Sequence[Outcome]) -> Write:
        """Results, usage records, step events and settlement of a batch of outcomes."""
        charges: list[dict[str, Any]] = []
        records = self._records(outcomes, charges)
        flow = [o for o in outcomes if o.job.gate is not None]
        if not flow:
            return Write(after=records) if records else PLAIN
        q = self.app.sql
        kept = [{"workflow_id": o.job.gate.workflow_key,
                 "name": o.job.gate.name, "result": o.result}
                for o in flow if o.has_result and o.state is JobState.COMPLETED]
        steps = announce.Announcement.steps(_step_event(o) for o in flow)
        settled = [(o.job.gate.workflow_id, o.job.gate.name, o.state.value, o.job.id)
                   for o in flow if o.state in settle.SETTLED_STATES]
        after = [*records, *ops.statements(steps.send_large(q))]
        done: list[Payload] = []

        # Budgets are checked only by a write that charges priced usage to a workflow step
        # or sends one back to wait (a reached budget stops it), whether or not the workflow
        # has a budget: such a write takes one more round trip (its settlement waits for the
        # charge's rows). Writes without usage or waiting steps run none of it.
        watched = {o.job.gate.workflow_id for o in flow if o.state not in settle.SETTLED_STATES}
        watched.update(uuid.UUID(c["workflow_id"]) for c in charges)

        def conclude(rows: Rows) -> Op[None]:
            if watched:  # the rows of the charge: the steps it stopped, settled with the rest
                done.extend((yield from budgets.stop(q, rows, settled)))
                return
            done.extend(settle.finished(rows))
            yield from announce.send(q, done)

        def events(applied: set[int]) -> list[Payload]:
            return [p for p, o in zip(steps.payloads, flow, strict=True)
                    if o.job.id in applied] + done

        if watched:
            after.append(budgets.charge(q, charges, watched))
        elif settled:
            after.append(settle.statement(q, settled))
        return Write(
            ahead=[Stmt(q["nodes_keep_results"], {"rows": json_text(kept)}, rows=False)]
            if kept else [],
            before=[settle.lock(q, [o.job.gate.workflow_id for o in flow])],
            finish_params={"event_jobs": [flow[i].job.id for i in steps.small],
                           "event_chunks": steps.chunks, "event_bodies": steps.bodies},
            after=after,
            conclude=conclude if settled or watched else None,
            events=events,
        )

    def _records(self, outcomes: Sequence[Outcome],
                 charges: list[dict[str, Any]] | None = None) -> list[Stmt]:
        """The statements keeping the outcomes' token usage and captured calls; the priced
        usage of workflow steps is added to ``charges`` (for their budgets)."""
        stats: list[dict[str, Any]] = []
        captures: list[dict[str, Any]] = []
        for o in outcomes:
            if not (o.usage or o.captures):
                continue
            where = {"workflow_id": str(o.job.workflow_id) if o.job.workflow_id else None,
                     "step_name": o.step_name or o.job.step, "job_id": o.job.id,
                     "attempt": o.job.attempt}
            for usage in o.usage:
                cost = self.app.pricing.cost(usage)
                stats.append({**where, **usage.model_dump(),
                              "cost": str(cost) if cost is not None else None})
                if cost is not None and charges is not None and o.job.gate is not None:
                    charges.append({"workflow_id": str(o.job.gate.workflow_id),
                                    "step_name": o.job.gate.name, "cost": str(cost)})
            captures.extend({**where, **c} for c in o.captures)
        q = self.app.sql
        stmts = []
        if stats:
            stmts.append(Stmt(q["step_stats_insert"], {"rows": json_text(stats)}, rows=False))
        if captures:
            stmts.append(Stmt(q["debug_logs_insert"], {"rows": json_text(captures)},
                              rows=False))
        if (kept := results.keep_statement(q, self.app.steps, outcomes)) is not None:
            stmts.append(kept)  # plain jobs' kept results, after the finish that completed them
        return stmts


def _step_event(outcome: Outcome) -> announce.StepEvent:
    """The event announcing how a workflow step's attempt ended."""
    job, gate = outcome.job, outcome.job.gate
    state = "snoozed" if outcome.snooze else outcome.state.value
    error = outcome.error.get("error") if outcome.error else None
    return announce.StepEvent(gate.workflow_key, gate.label, gate.name, job.step, state, job.id,
                              job.attempt, outcome.has_result, error)


async def _callbacks(options: Any, ctx: Context, failed: list[Dep], reason: str) -> None:
    kinds = {d.outcome for d in failed}
    for kind, callback in (("cancelled", options.on_dep_cancelled),
                           ("discarded", options.on_dep_discarded)):
        if callback is None or kind not in kinds:
            continue
        try:
            value = callback(ctx, reason)
            if inspect.isawaitable(value):
                await value
        except Exception as exc:
            log.warning("workflow.callback_failed", step=ctx.step, callback=kind,
                        error=f"{type(exc).__name__}: {exc}")


def _reason(job: FetchedJob, reason: str) -> dict[str, Any]:
    return {"attempt": job.attempt, "at": datetime.now(UTC).isoformat(), "kind": "workflow",
            "error": reason}
