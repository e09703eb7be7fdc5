"""Live events: exact sequences from a second connection, hooks, large payloads, queries."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import anyio
import pytest

import baton
from baton.events import StepUpdated, WorkflowFinished, channel
from baton.logs import capture_logs
from baton.testing import running_worker, wait_for_workflow
from baton.worker import Worker
from tests.apps import flows
from tests.helpers import both_waiting_on_the_lock, reap, sql_rows, worker_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def app(flows_app: baton.Baton) -> baton.Baton:
    return flows_app


async def collect(stream: AsyncIterator[Any], until_finished: int = 1) -> list[Any]:
    events: list[Any] = []
    with anyio.fail_after(30):
        async for event in stream:
            events.append(event)
            if sum(isinstance(e, WorkflowFinished) for e in events) >= until_finished:
                return events
    return events


async def test_exact_event_sequence_of_a_chain(app: baton.Baton) -> None:
    wf = baton.Workflow("patent:US1")
    wf.add("fetch", flows.fetch.new(url="u"))
    wf.add("parse", flows.parse.new(), deps=["fetch"])
    wf.add("quiet", flows.noop.new(), deps=["parse"])
    async with app.events.subscribe(wf.id) as stream:
        workflow_id = await app.insert(wf)
        async with running_worker(app):
            events = await collect(stream)
    steps = [(e.step_name, e.state, e.has_result) for e in events if isinstance(e, StepUpdated)]
    assert steps == [
        ("fetch", "executing", False), ("fetch", "completed", True),
        ("parse", "executing", False), ("parse", "completed", True),
        ("quiet", "executing", False), ("quiet", "completed", False),
    ]
    first = events[0]
    assert first.workflow_id == workflow_id and first.workflow_label == "patent:US1"
    assert first.function == flows.fetch.name and first.attempt == 1 and first.error is None
    assert first.timestamp.utcoffset() is not None and first.timestamp.utcoffset().seconds == 0
    finished = events[-1]
    assert isinstance(finished, WorkflowFinished)
    assert finished.outcome == "completed" and finished.failed_steps == []
    assert [type(e) for e in events].count(WorkflowFinished) == 1
    assert app.events.counts["executing"] >= 3 and app.events.counts["workflow_completed"] >= 1


async def test_failure_events_and_filtering(app: baton.Baton) -> None:
    other = baton.Workflow("other").add("x", flows.noop.new())
    wf = baton.Workflow("failing")
    wf.add("a", flows.explode.new(message="kaput"))
    wf.add("b", flows.noop.new(), deps=["a"])
    async with app.events.subscribe(wf.id) as mine, app.events.subscribe() as everything:
        await app.insert(other)
        await app.insert(wf)
        async with running_worker(app):
            events = await collect(mine)
            all_events = await collect(everything, until_finished=2)
    assert {e.workflow_id for e in events} == {wf.id}
    assert {e.workflow_id for e in all_events} == {wf.id, other.id}
    states = [(e.step_name, e.state) for e in events if isinstance(e, StepUpdated)]
    assert states == [("a", "executing"), ("a", "discarded"), ("b", "executing"),
                      ("b", "cancelled")]
    discarded = next(e for e in events if getattr(e, "state", None) == "discarded")
    assert discarded.error == "RuntimeError: kaput"
    assert events[-1].outcome == "failed" and events[-1].failed_steps == ["a", "b"]


async def test_wide_fan_out_events_arrive_whole_and_in_order(app: baton.Baton) -> None:
    # Batches of step events with a long label: each batch travels in several
    # notifications, and none is lost or reordered.
    label = "wide-" + "x" * 1000
    wf = baton.Workflow(label)
    wf.add("root", flows.noop.new())
    children = [f"c{k}" for k in range(80)]
    for name in children:
        wf.add(name, flows.noop.new(), deps=["root"])
    async with app.events.subscribe(wf.id) as stream:
        await app.insert(wf)
        async with running_worker(app, queues={"default": 40}):
            events = await collect(stream)
    seen: dict[str, list[str]] = {}
    for event in events:
        if isinstance(event, StepUpdated):
            assert event.workflow_label == label
            seen.setdefault(event.step_name, []).append(event.state)
    assert seen == {name: ["executing", "completed"] for name in ["root", *children]}


async def test_a_failed_outcome_write_is_retried_whole(app: baton.Baton) -> None:
    # The first settlement fails inside the (pipelined) outcome transaction: its events
    # and state roll back with it, the retry writes them once.
    sql_rows(app.dsn, """
        CREATE SEQUENCE baton.test_fail_once;
        CREATE FUNCTION baton.test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('baton.test_fail_once') = 1 THEN
                RAISE EXCEPTION 'injected settlement failure';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER test_fail_once BEFORE INSERT ON baton.completions
            FOR EACH STATEMENT EXECUTE FUNCTION baton.test_fail_once();
    """)
    wf = baton.Workflow("retried").add("a", flows.noop.new())
    wf.add("b", flows.noop.new(), deps=["a"])
    async with app.events.subscribe(wf.id) as stream:
        await app.insert(wf)
        async with running_worker(app):
            events = await collect(stream)
    steps = [(e.step_name, e.state) for e in events if isinstance(e, StepUpdated)]
    assert steps == [("a", "executing"), ("a", "completed"), ("b", "executing"),
                     ("b", "completed")]
    assert sql_rows(app.dsn, "SELECT last_value FROM baton.test_fail_once") == [(3,)]
    assert sql_rows(app.dsn, "SELECT name, outcome FROM baton.completions ORDER BY name") == [
        ("a", "completed"), ("b", "completed")]


async def test_large_payload_arrives_whole(app: baton.Baton) -> None:
    message = "x" * 50_000
    wf = baton.Workflow("big-error").add("a", flows.explode.new(message=message))
    async with app.events.subscribe(wf.id) as stream:
        await app.insert(wf)
        async with running_worker(app):
            events = await collect(stream)
    discarded = next(e for e in events if getattr(e, "state", None) == "discarded")
    assert discarded.error == f"RuntimeError: {message}"


async def test_hooks_see_events_and_bad_hooks_break_nothing(app: baton.Baton) -> None:
    seen: list[Any] = []

    def broken(event: Any) -> None:
        raise RuntimeError("hook bug")

    async def slow(event: Any) -> None:
        await anyio.sleep(60)

    app.on("workflow_step_updated", broken)
    app.on("workflow_finished", seen.append)
    app.on("*", slow)
    app.events.hook_timeout = 0.05
    wf = baton.Workflow("hooked").add("a", flows.value.new(v=1)).add(
        "b", flows.value.new(v=2), deps=["a"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
        with anyio.fail_after(10):
            while not seen:
                await anyio.sleep(0.01)
    assert info.state == "completed"
    assert [e.workflow_id for e in seen] == [wf.id]
    with pytest.raises(ValueError, match="unknown event"):
        app.on("nope", print)


async def test_cancel_from_outside_announces_and_finishes(app: baton.Baton) -> None:
    wf = baton.Workflow("cancel-me")
    wf.add("later", flows.noop.new().options(schedule_in=3600))
    wf.add("after", flows.noop.new(), deps=["later"])
    workflow_id = await app.insert(wf)
    async with app.events.subscribe(workflow_id) as stream:
        [(job_id,)] = [(s.job_id,) for s in (await app.query.workflow(workflow_id)).steps
                       if s.step_name == "later"]
        assert await app.cancel(job_id)
        async with running_worker(app):
            events = await collect(stream)
    assert [(e.step_name, e.state) for e in events if isinstance(e, StepUpdated)] == [
        ("later", "cancelled"), ("after", "executing"), ("after", "cancelled")]
    assert events[-1].outcome == "failed"


async def _step_cancelled_in_sql(app: baton.Baton, worker: Worker, wf: baton.Workflow,
                                 logs: list[MutableMapping[str, Any]]) -> uuid.UUID:
    """Insert ``wf`` (its step "a" cancels itself in SQL while it runs, "b" depends on it)
    and return once the worker has dropped a's outcome: a is cancelled, and unsettled."""
    with anyio.fail_after(10):
        while worker.maintenance.ticks < 1:  # the first sweep (at start) is over
            await anyio.sleep(0.01)
        workflow_id = await app.insert(wf)
        while not any(e["event"] == "job.outcome_dropped" for e in logs):
            await worker.completer.wait_written()
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.completions") == [(0,)]
    assert sql_rows(app.dsn, "SELECT workflow_step, state FROM baton.jobs "
                    "ORDER BY id") == [("a", "cancelled"), ("b", "pending")]
    return workflow_id


def _hand_cancelled(label: str) -> baton.Workflow:
    wf = baton.Workflow(label)
    wf.add("a", flows.cancelled_by_hand.new())
    wf.add("b", flows.noop.new(), deps=["a"])
    return wf


async def test_an_outcome_the_finish_drops_is_neither_announced_nor_settled(
    app: baton.Baton,
) -> None:
    """The write of a batch goes out whole before the finish says what it applied: the
    events and settlement of an outcome it dropped must still never take effect."""
    wf = _hand_cancelled("cancelled-in-sql")
    with capture_logs() as logs:
        # The sweep would settle the cancel and hide a wrong settlement: after its first
        # pass (at start), it runs only when the test says.
        async with running_worker(app, maintenance_interval=3600) as worker, \
                app.events.subscribe(wf.id) as stream:
            workflow_id = await _step_cancelled_in_sql(app, worker, wf, logs)
            assert await worker.maintenance.sweep() == 1
            events = await collect(stream)
    assert [(e.step_name, e.state) for e in events if isinstance(e, StepUpdated)] == [
        ("a", "executing"), ("a", "cancelled"), ("b", "executing"), ("b", "cancelled")]
    assert events[-1].outcome == "failed" and events[-1].failed_steps == ["a", "b"]
    assert sql_rows(app.dsn, "SELECT name, outcome FROM baton.completions "
                    "WHERE workflow_id = %s ORDER BY name", (workflow_id,)) == [
        ("a", "cancelled"), ("b", "cancelled")]


async def test_two_sweeps_at_once_settle_and_announce_a_step_once(app: baton.Baton) -> None:
    wf = _hand_cancelled("swept-twice")
    with capture_logs() as logs:
        async with running_worker(app, maintenance_interval=3600) as worker, \
                app.events.subscribe(wf.id) as stream:
            workflow_id = await _step_cancelled_in_sql(app, worker, wf, logs)
            swept: list[int] = []

            async def sweep() -> None:
                swept.append(await worker.maintenance.sweep())

            # Both sweeps find the unsettled step, then wait for the workflow's lock.
            await both_waiting_on_the_lock(app.dsn, workflow_id, sweep, sweep)
            assert sorted(swept) == [0, 1]
            events = await collect(stream)
    assert [(e.step_name, e.state) for e in events if isinstance(e, StepUpdated)] == [
        ("a", "executing"), ("a", "cancelled"), ("b", "executing"), ("b", "cancelled")]
    assert sql_rows(app.dsn, "SELECT name, outcome FROM baton.completions "
                    "WHERE workflow_id = %s ORDER BY name", (workflow_id,)) == [
        ("a", "cancelled"), ("b", "cancelled")]


async def test_query_seeds_a_view(app: baton.Baton) -> None:
    wf = baton.Workflow("seed")
    wf.add("a", flows.value.new(v=1))
    wf.add("b", flows.explode.new(), deps=["a"])
    workflow_id = await app.insert(wf)
    before = await app.query.workflow(workflow_id)
    assert [(s.step_name, s.state) for s in before.steps] == [("a", "available"),
                                                              ("b", "pending")]
    async with running_worker(app):
        await wait_for_workflow(app, workflow_id)
    view = await app.query.workflow(workflow_id)
    assert view.state == "failed" and view.failed_steps == ["b"]
    assert [(s.step_name, s.state, s.has_result) for s in view.steps] == [
        ("a", "completed", True), ("b", "discarded", False)]
    assert view.steps[1].last_error == "RuntimeError: boom"
    listed = await app.query.workflows(state="failed")
    assert [w.id for w in listed] == [workflow_id]
    assert await app.query.workflows(label="nope") == []
    with pytest.raises(baton.WorkflowNotFound):
        await app.query.workflow("00000000-0000-0000-0000-000000000000")


async def test_killed_step_still_finishes_its_workflow(app: baton.Baton) -> None:
    """A step killed with SIGKILL on its last attempt: the sweep announces the end."""
    from tests.apps import procs

    procs.app.dsn = app.dsn
    wf = baton.Workflow("killed")
    wf.add("doomed", procs.hold_first_attempt.new().options(max_attempts=1))
    wf.add("next", procs.quick.new(n=1), deps=["doomed"])
    async with app.events.subscribe(wf.id) as stream:
        await app.insert(wf)
        proc = worker_process(app.dsn, "tests.apps.procs:app", "--heartbeat-interval", "0.2",
                              "--heartbeat-ttl", "1")
        try:
            with anyio.fail_after(30):
                async for event in stream:
                    if isinstance(event, StepUpdated) and event.state == "executing":
                        break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            reap(proc)
        async with running_worker(procs.app):
            events = await collect(stream)
        await procs.app.close()
    finished = events[-1]
    assert isinstance(finished, WorkflowFinished)
    assert finished.outcome == "failed" and finished.failed_steps == ["doomed", "next"]
    assert ("doomed", "discarded") in [(e.step_name, e.state) for e in events
                                       if isinstance(e, StepUpdated)]


def test_channel_names_come_from_the_helper() -> None:
    assert channel("baton") == "baton.events"
    with pytest.raises(baton.ConfigurationError):
        channel("Not Valid")
