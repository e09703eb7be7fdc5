"""A column that a later, additive migration adds to any of baton's tables breaks no read of
this code: every client read, the CLI, the testing helpers and a worker running workflows
end to end (a process on the old code must keep working while the new one rolls out)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import anyio
import pytest

import baton
from baton.cli import main
from baton.job import JobState
from baton.testing import (
    assert_enqueued,
    drain_queue,
    perform_job,
    running_worker,
    wait_for_job,
    wait_for_workflow,
)
from tests.apps import flows
from tests.helpers import sql_rows


def add_a_column_everywhere(dsn: str) -> list[str]:
    """Add ``extra_col`` to every table of the baton schema; return the tables."""
    tables = [r[0] for r in sql_rows(
        dsn, "SELECT table_name FROM information_schema.tables "
             "WHERE table_schema = 'baton' AND table_type = 'BASE TABLE' ORDER BY 1")]
    for table in tables:
        sql_rows(dsn, f'ALTER TABLE baton."{table}" ADD COLUMN extra_col int DEFAULT 0')
    return tables


async def test_every_read_survives_an_added_column(
    flows_app: baton.Baton, capsys: pytest.CaptureFixture[str],
) -> None:
    app = flows_app
    tables = add_a_column_everywhere(app.dsn)
    assert {"jobs", "nodes", "edges", "completions", "workflows", "worker_registry",
            "step_stats"} <= set(tables)

    # Jobs: enqueue, read, find, cancel, retry (async and sync).
    job_id = await app.enqueue(flows.value.new(v="plain"))
    later = await app.enqueue(flows.noop.new().options(queue="later", schedule_in=600))
    assert (await app.get_job(job_id)).args == {"v": "plain"}
    assert app.get_job_sync(later).state is JobState.SCHEDULED
    assert assert_enqueued(app, flows.value.name, v="plain").id == job_id
    assert await app.cancel(later) and not app.cancel_sync(later)
    assert await app.retry(later) and app.retry_sync(later)

    # A workflow that grows before it runs, records usage and results.
    wf = baton.Workflow("compat")
    wf.add("ask", flows.ask_llm.new(prompt="q"))
    wf.add("after", flows.after_llm.new(), deps=["ask"])
    workflow_id = await app.insert(wf)
    more = baton.Workflow("more")
    more.add("tail", flows.value.new(v=3), deps=["after"])
    assert await app.append(workflow_id, more) == ["tail"]
    # One more, whose step is cancelled by hand in SQL: the worker's sweep settles it.
    swept = baton.Workflow("swept")
    swept.add("gone", flows.noop.new().options(queue="nobody"))
    swept.add("never", flows.noop.new(), deps=["gone"])
    swept_id = await app.insert(swept)
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'cancelled', finalized_at = now() "
                      "WHERE workflow_id = %s AND workflow_step = 'gone'", (swept_id,))

    async with running_worker(app, queues={"default": 10}):
        info = await wait_for_workflow(app, workflow_id)
        assert (await wait_for_workflow(app, swept_id)).state == "failed"
        assert (await wait_for_job(app, job_id, "completed")).state is JobState.COMPLETED
        status = await app.query.status()
        assert len(status.workers) == 1
        argv = ["status", "--dsn", app.dsn, "--json", "--log-level", "error"]
        capsys.readouterr()
        assert await anyio.to_thread.run_sync(main, argv) == 0
        assert len(json.loads(capsys.readouterr().out)["workers"]) == 1
    assert info.state == "completed" and info.total_steps == 3
    assert (await app.get_workflow(workflow_id)).settled_steps == 3
    assert await app.result(workflow_id, "tail") == 3
    assert (await app.results(workflow_id))["ask"]["answer"] == "re: q"

    # Read models and costs.
    view = await app.query.workflow(workflow_id)
    assert [s.step_name for s in view.steps] == ["ask", "after", "tail"]
    assert {w.id for w in await app.query.workflows(label="compat")} == {workflow_id}
    cost = await app.query.cost(workflow_id)
    assert {line.model for line in cost.lines} == {"model-a", "mystery-model"}
    now = datetime.now(UTC)
    by_model = await app.query.cost_by_model(now - timedelta(hours=1), now + timedelta(hours=1))
    assert {line.model for line in by_model} == {"model-a", "mystery-model"}

    # The command line.
    for argv in (["workflow", "show", str(workflow_id)], ["workflow", "cost", str(workflow_id)],
                 ["workflow", "list"], ["status"], ["job", "cancel", str(later)],
                 ["job", "retry", str(later)]):
        assert await anyio.to_thread.run_sync(main, [*argv, "--dsn", app.dsn, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)

    # The testing helpers.
    await app.enqueue(flows.value.new(v="drained").options(queue="drain"))
    await drain_queue(app, "drain")
    assert not sql_rows(app.dsn, "SELECT id FROM baton.jobs WHERE queue = 'drain' "
                                 "AND state <> 'completed'")
    outcome = await perform_job(app, flows.value.new(v=1))
    assert outcome.state is JobState.COMPLETED
    app.close_sync()
