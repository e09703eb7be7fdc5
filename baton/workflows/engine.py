"""Running workflow steps: the stored-result guard, the dependency gate, result keeping."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import structlog

from baton import ops
from baton.db import describe
from baton.errors import DatabaseError
from baton.job import JobState
from baton.worker.executor import FetchedJob, Outcome
from baton.workflows import announce, store
from baton.workflows.gate import Dep, decide, gather_results

if TYPE_CHECKING:
    from baton.context import Context
    from baton.worker.worker import Worker

log = structlog.get_logger("baton.workflow")


class StepRunner:
    """Runs one workflow step: guard, gate, call, keep the result."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def load_gates(
        self, conn: psycopg.AsyncConnection[Any], jobs: list[FetchedJob]
    ) -> list[dict[str, Any]]:
        """Load the gate rows of workflow steps in one statement and announce them as
        executing; returns the event payloads to publish once the transaction commits."""
        steps = [j for j in jobs if j.workflow_id is not None and j.workflow_step is not None]
        if not steps:
            return []
        q = self.worker.app.queries
        cur = await conn.execute(q["node_gates"], {
            "workflow_ids": [j.workflow_id for j in steps],
            "names": [j.workflow_step for j in steps],
        }, prepare=True)
        found = {(row[0], row[1]): row[2:] for row in await cur.fetchall()}
        for job in steps:
            job.gate = found.get((job.workflow_id, job.workflow_step))
            job.gated = True
        started = [announce.StepEvent(j.workflow_id, j.workflow_step, j.step, "executing",
                                       j.id, j.attempt, label=j.workflow_label)
                   for j in steps if j.workflow_id is not None and j.workflow_step is not None]
        return await ops.run_async(conn, announce.emit_steps(q, started), "announce steps")

    async def run(self, job: FetchedJob) -> Outcome:
        """Run a workflow step to its outcome."""
        assert job.workflow_id is not None and job.workflow_step is not None
        app = self.worker.app
        if not job.gated:
            async with app.connection() as conn:
                events = await self.load_gates(conn, [job])
            app.events.publish(events)
        row = job.gate
        if row is None:
            return Outcome(job, JobState.CANCELLED, error=_reason(job, "its workflow node is gone"))
        (has_result, stored, declared, model, min_success, ignore_cancelled, ignore_discarded,
         label, debug, dep_rows) = row
        if has_result:
            # The retry-idempotency guard: the step already produced a result.
            log.info("workflow.step_result_reused", workflow_id=str(job.workflow_id),
                     step=job.workflow_step, job_id=job.id)
            return Outcome(job, JobState.COMPLETED, result=stored, has_result=True)
        deps = [Dep(**d) for d in dep_rows]
        decision = decide(deps, ignore_cancelled=ignore_cancelled,
                          ignore_discarded=ignore_discarded, min_success=min_success)
        step = app.steps.get(job.step)
        if decision.action == "wait":
            # Held again: its dependency's settlement releases it (the sweep backstops).
            return Outcome(job, JobState.PENDING, snooze=True)
        ctx = None
        if step is not None:
            ctx = self.worker.executor.context(job, step)
            ctx.workflow_label = label
            ctx.deps = list(declared)
            ctx.model = model
            ctx.app = app
            ctx.failed_deps = [d.name for d in decision.failed]
            ctx.capture_enabled = ctx.capture_enabled or debug
        if decision.action == "cancel":
            if ctx is not None and step is not None:
                await self._callbacks(step.options, ctx, decision.failed, decision.reason)
            log.info("workflow.step_cancelled", workflow_id=str(job.workflow_id),
                     step=job.workflow_step, reason=decision.reason)
            return Outcome(job, JobState.CANCELLED, error=_reason(job, decision.reason))
        if ctx is not None:
            ctx.results = gather_results(ctx.deps, deps)
        outcome = await self.worker.executor.run(job, ctx)
        if outcome.state is JobState.COMPLETED and outcome.result is not None:
            await self._keep(job, outcome)
        return outcome

    async def _keep(self, job: FetchedJob, outcome: Outcome) -> None:
        """Store the result now, so a kill before the completion cannot lose it."""
        assert job.workflow_id is not None and job.workflow_step is not None
        app = self.worker.app
        try:
            outcome.result = store.dump_result(outcome.result)
        except Exception as exc:  # an unserializable result is the step's bug
            outcome.state = JobState.DISCARDED
            outcome.has_result = False
            outcome.error = _reason(job, f"result is not JSON-serializable: {exc}")
            return
        failures = 0
        while True:
            try:
                async with app.connection() as conn:
                    await ops.run_async(conn, store.store_result(
                        app.queries, job.workflow_id, job.workflow_step, outcome.result
                    ), "store result")
                return
            except (DatabaseError, psycopg.Error) as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("workflow.result_store_failed", job_id=job.id,
                            error=describe(exc),
                            retry_in=delay)
                await anyio.sleep(delay)

    async def _callbacks(self, options: Any, ctx: Context, failed: list[Dep], reason: str
                         ) -> None:
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

