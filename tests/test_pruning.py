"""Pruning: exactly the old finished rows go; nothing of a running workflow."""

from __future__ import annotations

import pytest

import baton
from baton.testing import running_worker, wait_for_job, wait_for_workflow
from baton.worker import Worker, WorkerSettings
from tests.apps import flows
from tests.helpers import sql_rows


@pytest.fixture
def app(flows_app: baton.Baton) -> baton.Baton:
    return flows_app


def counts(dsn: str) -> dict[str, int]:
    tables = ["jobs", "workflows", "nodes", "edges", "completions", "step_stats", "debug_logs"]
    query = "SELECT " + ", ".join(f"(SELECT count(*) FROM baton.{t})" for t in tables)
    return dict(zip(tables, sql_rows(dsn, query)[0], strict=True))


async def test_prune_removes_old_finished_rows_only(app: baton.Baton) -> None:
    old_wf = baton.Workflow("old", debug=True)
    old_wf.add("ask", flows.ask_llm.new(prompt="q"))
    old_wf.add("use", flows.after_llm.new(), deps=["ask"])
    old_id = await app.insert(old_wf)
    running = baton.Workflow("running")
    running.add("done", flows.noop.new())
    running.add("waits", flows.noop.new().options(schedule_in=3600), deps=["done"])
    running_id = await app.insert(running)
    old_job = await app.enqueue(flows.noop.new())
    async with running_worker(app):
        await wait_for_workflow(app, old_id)
        await wait_for_job(app, old_job, "completed")
        await wait_for_job(app, (await _job(app, running_id, "done")), "completed")
    recent_job = await app.enqueue(flows.noop.new())  # still available: never pruned
    # Age everything that finished by two days.
    sql_rows(app.dsn, "UPDATE baton.jobs SET finalized_at = finalized_at - interval '2 days' "
             "WHERE finalized_at IS NOT NULL")
    sql_rows(app.dsn, "UPDATE baton.workflows SET finished_at = finished_at - interval '2 days'"
             " WHERE finished_at IS NOT NULL")
    before = counts(app.dsn)
    worker = Worker(app, WorkerSettings(prune_after=86_400, debug_log_max_age=3600))
    pruned = await worker.maintenance.prune()
    after = counts(app.dsn)
    assert pruned == {"jobs": 1, "workflows": 1, "workflow_jobs": 2, "step_stats": 2,
                      "debug_logs": 1}
    assert after == {"jobs": before["jobs"] - 3, "workflows": 1, "nodes": 2, "edges": 1,
                     "completions": 1, "step_stats": 0, "debug_logs": 0}
    remaining = {r[0] for r in sql_rows(app.dsn, "SELECT id FROM baton.jobs")}
    assert recent_job in remaining and old_job not in remaining
    assert (await app.get_workflow(running_id)).state == "running"
    assert await worker.maintenance.prune() == {}  # nothing more to do


async def test_prune_is_off_by_default(app: baton.Baton) -> None:
    job_id = await app.enqueue(flows.noop.new())
    async with running_worker(app):
        await wait_for_job(app, job_id, "completed")
    sql_rows(app.dsn, "UPDATE baton.jobs SET finalized_at = now() - interval '300 days'")
    assert await Worker(app).maintenance.prune() == {}
    assert counts(app.dsn)["jobs"] == 1


async def _job(app: baton.Baton, workflow_id: object, step: str) -> int:
    view = await app.query.workflow(str(workflow_id))
    return next(s.job_id for s in view.steps if s.step_name == step)
