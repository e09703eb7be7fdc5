"""Resuming a failed workflow: its discarded and cancelled steps run again, to a new end."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

import baton
from baton import ops, workflows
from baton.cli import main
from baton.events import StepUpdated, WorkflowFinished, WorkflowResumed
from baton.testing import running_worker, wait_for_job, wait_for_workflow
from tests.apps import resumable
from tests.conftest import bound
from tests.helpers import both_waiting_on_the_lock, sql_rows


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    resumable.reset()
    async with bound(resumable.app, dsn) as bound_app:
        yield bound_app
    for hold in resumable.HOLDS.values():  # never leave a step waiting
        hold.set()


def chain(label: str = "resume") -> baton.Workflow:
    """first -> gate -> after -> last, and side: gate fails until the test fixes it."""
    wf = baton.Workflow(label)
    wf.add("first", resumable.counted.new(key="first"))
    wf.add("gate", resumable.flaky.new(key="gate"), deps=["first"])
    wf.add("after", resumable.counted.new(key="after"), deps=["gate"])
    wf.add("last", resumable.counted.new(key="last"), deps=["after"])
    wf.add("side", resumable.counted.new(key="side"))
    return wf


async def run_to_end(app: baton.Baton, workflow_id: uuid.UUID) -> workflows.WorkflowInfo:
    async with running_worker(app):
        return await wait_for_workflow(app, workflow_id)


def states(app: baton.Baton, workflow_id: uuid.UUID) -> dict[str, str]:
    return dict(sql_rows(app.dsn, "SELECT step_name, state FROM baton.workflow_steps "
                         "WHERE workflow_id = %s", (workflow_id,)))


def run_of(app: baton.Baton, workflow_id: uuid.UUID) -> int:
    [(run,)] = sql_rows(app.dsn, "SELECT run FROM baton.workflows WHERE id = %s",
                        (workflow_id,))
    return int(run)


def job_of(app: baton.Baton, workflow_id: uuid.UUID, step: str) -> int:
    [(job_id,)] = sql_rows(app.dsn, "SELECT job_id FROM baton.nodes "
                           "WHERE workflow_id = %s AND name = %s", (workflow_id, step))
    return int(job_id)


async def failed_chain(app: baton.Baton) -> uuid.UUID:
    """Run :func:`chain` to its failure, as the bug report found it."""
    workflow_id = await app.insert(chain())
    info = await run_to_end(app, workflow_id)
    assert info.state == "failed"
    assert sorted(info.failed_steps) == ["after", "gate", "last"]
    assert states(app, workflow_id) == {"first": "completed", "gate": "discarded",
                                        "after": "cancelled", "last": "cancelled",
                                        "side": "completed"}
    return workflow_id


async def collect(stream: AsyncIterator[Any], finishes: int) -> list[Any]:
    events: list[Any] = []
    with anyio.fail_after(30):
        async for event in stream:
            events.append(event)
            if sum(isinstance(e, WorkflowFinished) for e in events) >= finishes:
                break
    return events


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for ``predicate`` (hooks run in the worker's dispatcher, after the commit)."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.sleep(0.01)


async def resume_then_finish(
    app: baton.Baton, workflow_id: uuid.UUID, resume: Callable[[], Awaitable[Any]]
) -> tuple[Any, list[Any], list[Any], workflows.WorkflowInfo]:
    """Subscribe, fix the gate, ``resume``, run to the end: return what ``resume`` returned,
    the subscriber's events and the hooks' events."""
    hooked: list[Any] = []
    app.on("workflow_resumed", hooked.append)
    app.on("workflow_finished", hooked.append)
    async with app.events.subscribe(workflow_id) as stream:
        resumable.FIXED.add("gate")
        returned = await resume()
        async with running_worker(app):
            info = await wait_for_workflow(app, workflow_id)
            events = await collect(stream, finishes=2)
            await until(lambda: len(hooked) >= 2)
    return returned, events, hooked, info


def assert_resumed_to_completion(
    app: baton.Baton, workflow_id: uuid.UUID, events: list[Any], hooked: list[Any],
    info: workflows.WorkflowInfo,
) -> None:
    assert info.state == "completed" and info.failed_steps == []
    assert info.settled_steps == info.total_steps == 5
    assert run_of(app, workflow_id) == 2
    # The gate ran twice; completed steps kept their results and never ran again.
    assert resumable.CALLS == {"first": 1, "side": 1, "gate": 2, "after": 1, "last": 1}
    assert sql_rows(app.dsn, "SELECT name, outcome FROM baton.completions "
                    "WHERE workflow_id = %s ORDER BY name", (workflow_id,)) == [
        (name, "completed") for name in ("after", "first", "gate", "last", "side")]
    assert sql_rows(app.dsn, "SELECT result -> 'value' -> 'seen' FROM baton.nodes "
                    "WHERE workflow_id = %s AND name = 'after'", (workflow_id,)) == [
        ({"gate": "gate ok"},)]

    # The subscriber caught up with the failed first run, then saw the second.
    finishes = [(e.run, e.outcome, e.failed_steps) for e in events
                if isinstance(e, WorkflowFinished)]
    assert [(r, o, sorted(f)) for r, o, f in finishes] == [
        (1, "failed", ["after", "gate", "last"]), (2, "completed", [])]
    [resumed] = [e for e in events if isinstance(e, WorkflowResumed)]
    assert (resumed.run, resumed.steps) == (2, ["after", "gate", "last"])
    assert resumed.workflow_id == workflow_id and resumed.workflow_label == "resume"
    ran = [(e.step_name, e.state, e.attempt) for e in events
           if isinstance(e, StepUpdated) and e.state in ("executing", "completed")]
    assert ran == [("gate", "executing", 2), ("gate", "completed", 2),
                   ("after", "executing", 2), ("after", "completed", 2),
                   ("last", "executing", 2), ("last", "completed", 2)]

    # The in-process hooks saw the resume and the second finish.
    assert [type(e) for e in hooked] == [WorkflowResumed, WorkflowFinished]
    assert hooked[0].steps == ["after", "gate", "last"] and hooked[0].run == 2
    assert (hooked[1].outcome, hooked[1].run) == ("completed", 2)


async def test_resume_runs_a_failed_workflow_to_completion(app: baton.Baton) -> None:
    workflow_id = await failed_chain(app)
    returned, events, hooked, info = await resume_then_finish(
        app, workflow_id, lambda: app.resume(workflow_id))
    assert returned == ["after", "gate", "last"]
    assert_resumed_to_completion(app, workflow_id, events, hooked, info)
    # Done: a completed workflow has nothing to resume.
    assert await app.resume(workflow_id) == []
    assert run_of(app, workflow_id) == 2 and app.events.counts["workflow_resumed"] == 1


async def test_retrying_a_discarded_step_resumes_it_and_its_dependents(
    app: baton.Baton,
) -> None:
    workflow_id = await failed_chain(app)
    gate = job_of(app, workflow_id, "gate")
    returned, events, hooked, info = await resume_then_finish(
        app, workflow_id, lambda: app.retry(gate))
    assert returned is True
    assert_resumed_to_completion(app, workflow_id, events, hooked, info)
    job = await app.get_job(gate)
    assert (job.attempt, job.max_attempts) == (2, 2)
    assert job.errors[0]["error"] == "RuntimeError: gate is broken"  # kept
    # A completed step is retried as before (its stored result is reused).
    assert app.retry_sync(job_of(app, workflow_id, "first"))
    app.close_sync()


async def test_named_steps_resume_with_their_downstream_only(app: baton.Baton) -> None:
    wf = baton.Workflow("two-branches")
    wf.add("a1", resumable.flaky.new(key="a1"))
    wf.add("b1", resumable.counted.new(key="b1"), deps=["a1"])
    wf.add("c1", resumable.counted.new(key="c1"), deps=["b1"])
    wf.add("a2", resumable.flaky.new(key="a2"))
    wf.add("b2", resumable.counted.new(key="b2"), deps=["a2"])
    workflow_id = await app.insert(wf)
    first = await run_to_end(app, workflow_id)
    assert sorted(first.failed_steps) == ["a1", "a2", "b1", "b2", "c1"]

    with pytest.raises(baton.NoSuchStepError, match="'nope'"):
        await app.resume(workflow_id, ["a1", "nope"])
    with pytest.raises(baton.WorkflowNotFound):
        await app.resume(uuid.uuid4())
    with pytest.raises(baton.WorkflowNotFound):
        await app.resume("not-a-uuid")
    assert states(app, workflow_id)["a1"] == "discarded"  # the failed calls changed nothing

    resumable.FIXED.update({"a1", "a2"})
    assert await app.resume(workflow_id, ["a1"]) == ["a1", "b1", "c1"]
    assert states(app, workflow_id) == {"a1": "available", "b1": "pending", "c1": "pending",
                                        "a2": "discarded", "b2": "cancelled"}
    assert sql_rows(app.dsn, "SELECT state, settled_steps, failed_steps, finished_at, run "
                    "FROM baton.workflows WHERE id = %s", (workflow_id,)) == [
        ("running", 2, ["a2", "b2"], None, 2)]
    assert sql_rows(app.dsn, "SELECT name, pending_deps FROM baton.nodes "
                    "WHERE workflow_id = %s AND name IN ('b1', 'c1') ORDER BY name",
                    (workflow_id,)) == [("b1", 1), ("c1", 1)]
    second = await run_to_end(app, workflow_id)
    assert second.state == "failed" and second.failed_steps == ["a2", "b2"]
    assert second.settled_steps == 5
    assert resumable.CALLS == {"a1": 2, "b1": 1, "c1": 1, "a2": 1}

    # A named step downstream of the failure alone runs again, and its own failed
    # dependency cancels it again.
    assert app.resume_sync(workflow_id, ["b2"]) == ["b2"]
    app.close_sync()
    third = await run_to_end(app, workflow_id)
    assert third.failed_steps == ["a2", "b2"] and run_of(app, workflow_id) == 3
    assert resumable.CALLS["b2"] == 0

    assert await app.resume(workflow_id) == ["a2", "b2"]
    last = await run_to_end(app, workflow_id)
    assert last.state == "completed" and last.failed_steps == []
    assert run_of(app, workflow_id) == 4
    assert resumable.CALLS == {"a1": 2, "b1": 1, "c1": 1, "a2": 2, "b2": 1}


async def test_a_failure_a_quorum_absorbed_is_resumed_only_by_name(app: baton.Baton) -> None:
    wf = baton.Workflow("quorum")
    wf.add("a", resumable.flaky.new(key="a"))
    wf.add("b", resumable.counted.new(key="b"))
    wf.add("j", resumable.counted.new(key="j"), deps=["a", "b"], min_success=1)
    workflow_id = await app.insert(wf)
    first = await run_to_end(app, workflow_id)
    assert first.state == "completed" and states(app, workflow_id)["a"] == "discarded"
    assert await app.resume(workflow_id) == []  # the workflow completed: nothing failed it
    resumable.FIXED.add("a")
    assert await app.resume(workflow_id, ["a"]) == ["a"]
    second = await run_to_end(app, workflow_id)
    assert second.state == "completed" and run_of(app, workflow_id) == 2
    assert resumable.CALLS == {"a": 2, "b": 1, "j": 1}


async def test_two_resumes_at_once_resume_once(app: baton.Baton) -> None:
    workflow_id = await failed_chain(app)
    resumable.FIXED.add("gate")
    results: list[list[str]] = []
    hooked: list[Any] = []
    app.on("workflow_resumed", hooked.append)

    async def resume() -> None:
        results.append(await app.resume(workflow_id))

    await both_waiting_on_the_lock(app.dsn, workflow_id, resume, resume)
    assert results == [["after", "gate", "last"], []]
    assert len(hooked) == 1 and run_of(app, workflow_id) == 2
    info = await run_to_end(app, workflow_id)
    assert info.state == "completed" and info.settled_steps == 5
    assert resumable.CALLS == {"first": 1, "side": 1, "gate": 2, "after": 1, "last": 1}


async def test_a_step_still_running_is_left_alone(app: baton.Baton) -> None:
    resumable.HOLDS["slow"] = anyio.Event()
    resumable.STARTED["slow"] = anyio.Event()
    wf = baton.Workflow("still-running")
    wf.add("slow", resumable.held.new(key="slow"))
    wf.add("gate", resumable.flaky.new(key="gate"))
    wf.add("after", resumable.counted.new(key="after"), deps=["gate"])
    wf.add("tail", resumable.counted.new(key="tail"), deps=["slow", "after"])
    workflow_id = await app.insert(wf)
    finished: list[WorkflowFinished] = []
    app.on("workflow_finished", finished.append)
    async with running_worker(app):
        with anyio.fail_after(10):
            await resumable.STARTED["slow"].wait()
        await wait_for_job(app, job_of(app, workflow_id, "after"), "cancelled")
        resumable.FIXED.add("gate")
        assert await app.resume(workflow_id) == ["after", "gate"]
        slow = await app.get_job(job_of(app, workflow_id, "slow"))
        assert (slow.state, slow.attempt) == ("executing", 1)
        # tail waits on both again: after runs again, slow still runs.
        assert sql_rows(app.dsn, "SELECT pending_deps FROM baton.nodes "
                        "WHERE workflow_id = %s AND name = 'tail'", (workflow_id,)) == [(2,)]
        await wait_for_job(app, job_of(app, workflow_id, "after"), "completed")
        assert (await app.get_workflow(workflow_id)).state == "running"
        resumable.HOLDS["slow"].set()
        info = await wait_for_workflow(app, workflow_id)
        await until(lambda: len(finished) >= 1)
    assert info.state == "completed" and info.settled_steps == 4
    assert resumable.CALLS == {"slow": 1, "gate": 2, "after": 1, "tail": 1}
    # It had not finished: no new run, and one finish.
    assert run_of(app, workflow_id) == 1
    assert [(e.run, e.outcome) for e in finished] == [(1, "completed")]
    assert await app.result(workflow_id, "tail") == {
        "key": "tail", "seen": {"slow": "slow", "after": {"key": "after", "seen": {
            "gate": "gate ok"}}}}


@pytest.mark.anyio
@pytest.mark.parametrize("first", ["sweep", "resume"])
async def test_a_resume_during_a_sweep(app: baton.Baton, first: str) -> None:
    """Steps ended by hand in SQL, so only the sweep settles them: whichever of the sweep
    and a resume takes the workflow's lock first, the counts end right."""
    wf = baton.Workflow("swept")
    wf.add("x", resumable.counted.new(key="x"))
    wf.add("y", resumable.counted.new(key="y"), deps=["x"])
    workflow_id = await app.insert(wf)
    sql_rows(app.dsn, "UPDATE baton.jobs SET state = CASE workflow_step WHEN 'x' "
             "THEN 'discarded' ELSE 'cancelled' END, finalized_at = now() "
             "WHERE workflow_id = %s", (workflow_id,))
    swept: list[int] = []
    resumed: list[list[str]] = []

    async def sweep() -> None:
        async with app.connection() as conn:
            _, _, settled = await ops.run_async(
                conn, workflows.sweep(app.sql, 100), "sweep")
        swept.append(settled)

    async def resume() -> None:
        resumed.append(await app.resume(workflow_id))

    order = (sweep, resume) if first == "sweep" else (resume, sweep)
    await both_waiting_on_the_lock(app.dsn, workflow_id, *order)
    assert resumed == [["x", "y"]]
    if first == "sweep":  # it settled both and finished the workflow: the resume reopens it
        assert swept == [2] and run_of(app, workflow_id) == 2
    else:  # the resume ran both again before the sweep looked: nothing left to settle
        assert swept == [0] and run_of(app, workflow_id) == 1
    assert sql_rows(app.dsn, "SELECT state, settled_steps, failed_steps FROM baton.workflows "
                    "WHERE id = %s", (workflow_id,)) == [("running", 0, [])]
    info = await run_to_end(app, workflow_id)
    assert info.state == "completed" and info.failed_steps == []
    assert info.settled_steps == info.total_steps == 2
    assert resumable.CALLS == {"x": 1, "y": 1}


async def test_cli_resumes_a_failed_workflow(
    app: baton.Baton, capsys: pytest.CaptureFixture[str],
) -> None:
    workflow_id = await failed_chain(app)
    resumable.FIXED.add("gate")
    capsys.readouterr()
    argv = ["workflow", "resume", str(workflow_id), "--dsn", app.dsn, "--step", "after"]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    assert capsys.readouterr().out == f"workflow {workflow_id} resumed: after, last\n"
    argv = ["workflow", "resume", str(workflow_id), "--dsn", app.dsn, "--json"]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    assert capsys.readouterr().out == (
        f'{{\n  "workflow_id": "{workflow_id}",\n  "resumed": [\n    "gate"\n  ]\n}}\n')
    info = await run_to_end(app, workflow_id)
    assert info.state == "completed" and run_of(app, workflow_id) == 2

    argv = ["workflow", "resume", str(workflow_id), "--dsn", app.dsn]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    assert "unchanged" in capsys.readouterr().out
    missing = str(uuid.uuid4())
    argv = ["workflow", "resume", missing, "--dsn", app.dsn]
    assert await anyio.to_thread.run_sync(main, argv) == 2
    assert f"no workflow with id {missing}" in capsys.readouterr().err
    argv = ["workflow", "resume", str(workflow_id), "--dsn", app.dsn, "--step", "nope"]
    assert await anyio.to_thread.run_sync(main, argv) == 2
    assert "has no step named 'nope'" in capsys.readouterr().err
