"""The workflow sweep: held steps whose dependency's rows were deleted, and its logs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anyio
import pytest

import baton
from baton.events import StepUpdated, WorkflowFinished
from baton.logs import capture_logs
from baton.testing import running_worker, wait_for_workflow
from baton.worker import Worker, WorkerSettings
from tests.apps import flows
from tests.helpers import both_waiting_on_the_lock, sql_rows

Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def app(flows_app: baton.Baton) -> baton.Baton:
    return flows_app


def chain(label: str, *names: str) -> baton.Workflow:
    """A workflow whose steps ``names`` each depend on the one before."""
    wf = baton.Workflow(label)
    for before, name in zip((None, *names), names, strict=False):
        wf.add(name, flows.noop.new(), deps=[before] if before else [])
    return wf


def delete_step(dsn: str, workflow_id: uuid.UUID, name: str) -> None:
    """Delete a step's nodes and job rows by hand (its edges stay)."""
    sql_rows(dsn, "DELETE FROM baton.jobs WHERE workflow_id = %s AND workflow_step = %s",
             (workflow_id, name))
    sql_rows(dsn, "DELETE FROM baton.nodes WHERE workflow_id = %s AND name = %s",
             (workflow_id, name))


def job(dsn: str, workflow_id: uuid.UUID, name: str) -> dict[str, Any]:
    [(state, finalized, errors)] = sql_rows(
        dsn, "SELECT state, finalized_at IS NOT NULL, errors FROM baton.jobs "
        "WHERE workflow_id = %s AND workflow_step = %s", (workflow_id, name))
    return {"state": state, "finalized": finalized, "errors": errors}


def events_of(logs: Logs, name: str) -> Logs:
    return [e for e in logs if e["event"] == name]


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    """Read events until a ``workflow_finished``."""
    events: list[Any] = []
    with anyio.fail_after(30):
        async for event in stream:
            events.append(event)
            if isinstance(event, WorkflowFinished):
                break
    return events


async def test_a_step_held_by_a_deleted_dependency_is_cancelled(app: baton.Baton) -> None:
    wf = chain("pruned-dep", "a", "b")
    workflow_id = await app.insert(wf)
    delete_step(app.dsn, workflow_id, "a")
    hooked: list[Any] = []
    app.on("workflow_finished", hooked.append)
    worker = Worker(app)
    async with app.events.subscribe(workflow_id) as stream:
        with capture_logs() as logs:
            assert await worker.maintenance.sweep() == 1
        events = await collect(stream)

    b = job(app.dsn, workflow_id, "b")
    assert b["state"] == "cancelled" and b["finalized"]
    [entry] = b["errors"]
    assert entry.pop("at")
    assert entry == {"attempt": 0, "kind": "workflow",
                     "error": "dependency 'a' no longer exists (pruned)"}
    info = await app.get_workflow(workflow_id)
    assert info.state == "failed" and info.finished_at is not None
    assert info.failed_steps == ["a", "b"] and info.settled_steps == info.total_steps == 2
    assert sql_rows(app.dsn, "SELECT name, outcome FROM baton.completions "
                    "WHERE workflow_id = %s ORDER BY name", (workflow_id,)) == [
        ("a", "cancelled"), ("b", "cancelled")]

    assert [(e.step_name, e.state, e.error) for e in events if isinstance(e, StepUpdated)] == [
        ("b", "cancelled", "dependency 'a' no longer exists (pruned)")]
    finished = events[-1]
    assert isinstance(finished, WorkflowFinished)
    assert finished.outcome == "failed" and finished.failed_steps == ["a", "b"]
    assert [(e.workflow_id, e.outcome) for e in hooked] == [(workflow_id, "failed")]

    [cancelled] = events_of(logs, "workflow.step_cancelled")
    assert cancelled["log_level"] == "warning" and cancelled["step"] == "b"
    assert cancelled["reason"] == "dependency 'a' no longer exists (pruned)"
    [line] = [e for e in events_of(logs, "workflow.finished") if e.get("found_by") == "sweep"]
    assert line == {"event": "workflow.finished", "log_level": "warning",
                    "workflow_id": str(workflow_id), "label": "pruned-dep", "outcome": "failed",
                    "steps": 2, "settled": 2, "failed_steps": ["a", "b"], "found_by": "sweep"}
    [swept] = events_of(logs, "maintenance.swept")
    assert swept == {"event": "maintenance.swept", "log_level": "info", "settled": 0,
                     "released": 0, "cancelled": 1, "finished": 1}

    with capture_logs() as logs:
        assert await worker.maintenance.sweep() == 0  # nothing left to do
    assert events_of(logs, "maintenance.swept") == []


async def test_two_sweeps_at_once_cancel_and_announce_a_step_once(app: baton.Baton) -> None:
    workflow_id = await app.insert(chain("pruned-twice", "a", "b"))
    delete_step(app.dsn, workflow_id, "a")
    seen: list[Any] = []
    app.on("*", seen.append)
    worker = Worker(app)
    swept: list[int] = []

    async def sweep() -> None:
        swept.append(await worker.maintenance.sweep())

    # Both sweeps find b, then wait for the workflow's lock.
    await both_waiting_on_the_lock(app.dsn, workflow_id, sweep, sweep)
    assert sorted(swept) == [0, 1]
    assert [(type(e).__name__, getattr(e, "step_name", None)) for e in seen] == [
        ("StepUpdated", "b"), ("WorkflowFinished", None)]
    info = await app.get_workflow(workflow_id)
    assert info.failed_steps == ["a", "b"] and info.settled_steps == 2


async def test_the_cancel_cascades_to_the_dependents(app: baton.Baton) -> None:
    wf = chain("pruned-head", "a", "b", "c")
    workflow_id = await app.insert(wf)
    delete_step(app.dsn, workflow_id, "a")
    with capture_logs() as logs:
        assert await Worker(app).maintenance.sweep() == 1
    # b settled as cancelled: c is released, and its gate cancels it when it starts.
    assert job(app.dsn, workflow_id, "c")["state"] == "available"
    assert (await app.get_workflow(workflow_id)).state == "running"
    [swept] = events_of(logs, "maintenance.swept")
    assert (swept["cancelled"], swept["finished"]) == (1, 0)
    assert [e for e in events_of(logs, "workflow.finished") if e.get("found_by")] == []
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "failed" and info.failed_steps == ["a", "b", "c"]
    assert job(app.dsn, workflow_id, "c")["errors"][-1]["error"] == "dependency 'b' was cancelled"


async def test_a_step_whose_dependency_edge_was_deleted_is_cancelled(app: baton.Baton) -> None:
    wf = baton.Workflow("lost-edge")
    wf.add("a", flows.noop.new())
    wf.add("other", flows.noop.new())
    wf.add("b", flows.noop.new(), deps=["other", "a"])
    workflow_id = await app.insert(wf)
    sql_rows(app.dsn, "DELETE FROM baton.edges WHERE workflow_id = %s AND dep = 'a'",
             (workflow_id,))
    # a and other still run: the sweep waits for the workflow to have nothing else to do.
    assert await Worker(app).maintenance.sweep() == 0
    assert job(app.dsn, workflow_id, "b")["state"] == "pending"
    with capture_logs() as logs:
        async with running_worker(app):
            info = await wait_for_workflow(app, workflow_id)
    # a settled, but with its edge gone it never counted b down.
    assert info.state == "failed" and info.failed_steps == ["b"]
    b = job(app.dsn, workflow_id, "b")
    assert b["state"] == "cancelled"
    assert b["errors"][-1]["error"] == "dependency 'a' no longer exists (pruned)"
    assert sql_rows(app.dsn, "SELECT name, outcome FROM baton.completions "
                    "WHERE workflow_id = %s ORDER BY name", (workflow_id,)) == [
        ("a", "completed"), ("b", "cancelled"), ("other", "completed")]
    [line] = [e for e in events_of(logs, "workflow.finished") if e.get("found_by") == "sweep"]
    assert line["outcome"] == "failed" and line["failed_steps"] == ["b"]


async def test_a_workflow_with_other_work_left_is_searched_once_it_is_done(
    app: baton.Baton,
) -> None:
    wf = baton.Workflow("busy")
    wf.add("a", flows.noop.new())
    wf.add("b", flows.noop.new(), deps=["a"])
    wf.add("side", flows.noop.new().options(schedule_in=3600))
    workflow_id = await app.insert(wf)
    delete_step(app.dsn, workflow_id, "a")
    worker = Worker(app)
    assert await worker.maintenance.sweep() == 0  # side is still to run
    assert job(app.dsn, workflow_id, "b")["state"] == "pending"
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'completed', attempt = 1, "
             "finalized_at = now() WHERE workflow_id = %s AND workflow_step = 'side'",
             (workflow_id,))
    # One pass settles side (its settlement was never recorded), then cancels b.
    assert await worker.maintenance.sweep() == 2
    info = await app.get_workflow(workflow_id)
    assert info.state == "failed" and info.failed_steps == ["a", "b"]


async def test_held_steps_whose_dependencies_exist_are_untouched(app: baton.Baton) -> None:
    wf = baton.Workflow("intact")
    wf.add("a", flows.noop.new().options(schedule_in=3600))
    wf.add("c", flows.noop.new().options(schedule_in=3600))
    wf.add("b", flows.noop.new(), deps=["a", "c"])
    wf.add("d", flows.noop.new(), deps=["b"])
    workflow_id = await app.insert(wf)
    # One dependency settled, the other still to come: b waits on one, d on b.
    c_id = next(s.job_id for s in (await app.query.workflow(workflow_id)).steps
                if s.step_name == "c")
    assert await app.cancel(c_id)
    before = sql_rows(app.dsn, "SELECT workflow_step, state, errors FROM baton.jobs "
                      "WHERE workflow_id = %s ORDER BY id", (workflow_id,))
    assert [(s, st) for s, st, _ in before] == [
        ("a", "scheduled"), ("c", "cancelled"), ("b", "pending"), ("d", "pending")]
    with capture_logs() as logs:
        assert await Worker(app).maintenance.sweep() == 0
    assert sql_rows(app.dsn, "SELECT workflow_step, state, errors FROM baton.jobs "
                    "WHERE workflow_id = %s ORDER BY id", (workflow_id,)) == before
    assert (await app.get_workflow(workflow_id)).state == "running"
    assert logs == []


async def test_a_workflow_failed_by_a_crash_is_logged_as_failed(app: baton.Baton) -> None:
    wf = baton.Workflow("crashed").add("a", flows.noop.new().options(max_attempts=1))
    workflow_id = await app.insert(wf)
    # Its worker died while it ran its last attempt.
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'executing', attempt = 1, "
             "attempted_at = now(), attempted_by = 'gone:1:x' WHERE workflow_id = %s",
             (workflow_id,))
    worker = Worker(app, WorkerSettings(heartbeat_ttl=0.001))
    with capture_logs() as logs:
        assert await worker.maintenance.rescue() == 1
        assert await worker.maintenance.sweep() == 1
    assert job(app.dsn, workflow_id, "a")["state"] == "discarded"
    [line] = [e for e in events_of(logs, "workflow.finished") if e.get("found_by") == "sweep"]
    assert line == {"event": "workflow.finished", "log_level": "warning",
                    "workflow_id": str(workflow_id), "label": "crashed", "outcome": "failed",
                    "steps": 1, "settled": 1, "failed_steps": ["a"], "found_by": "sweep"}
    [swept] = events_of(logs, "maintenance.swept")
    assert swept == {"event": "maintenance.swept", "log_level": "info", "settled": 1,
                     "released": 0, "cancelled": 0, "finished": 1}


async def test_a_workflow_the_sweep_completes_is_logged_at_info(app: baton.Baton) -> None:
    wf = chain("completed-late", "a")
    workflow_id = await app.insert(wf)
    # Finished in SQL with no settlement recorded (as a lost write would leave it).
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'completed', attempt = 1, "
             "finalized_at = now() WHERE workflow_id = %s", (workflow_id,))
    with capture_logs() as logs:
        assert await Worker(app).maintenance.sweep() == 1
    [line] = [e for e in events_of(logs, "workflow.finished") if e.get("found_by") == "sweep"]
    assert line == {"event": "workflow.finished", "log_level": "info",
                    "workflow_id": str(workflow_id), "label": "completed-late",
                    "outcome": "completed", "steps": 1, "settled": 1, "failed_steps": [],
                    "found_by": "sweep"}
