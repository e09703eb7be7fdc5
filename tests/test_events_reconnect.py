"""Subscribers across dropped connections and a server restart: they reconnect by
themselves, read back what finished while they were away, and deliver it once."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from psycopg.conninfo import make_conninfo

import baton
from baton.events import SUBSCRIBER_APPLICATION_NAME, StepUpdated, WorkflowFinished
from baton.logs import capture_logs
from baton.testing import running_worker, wait_for_workflow
from tests.apps import flows
from tests.conftest import Server
from tests.helpers import LOCK_WAITERS, sql_rows

Event = StepUpdated | WorkflowFinished


@pytest.fixture
def app(flows_app: baton.Baton) -> baton.Baton:
    return flows_app


def kill_subscribers(dsn: str) -> int:
    """Terminate the subscribers' backends of this test's database (waiting until they are
    gone); return how many there were."""
    [(killed,)] = sql_rows(dsn, """
        SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000))
        FROM pg_stat_activity
        WHERE application_name = %s AND datname = current_database()
    """, (SUBSCRIBER_APPLICATION_NAME,))
    return int(killed)


async def kill_subscriber_when_connected(dsn: str) -> None:
    """Kill the one subscriber's backend as soon as it has one (it may be reconnecting)."""
    with anyio.fail_after(30):
        while kill_subscribers(dsn) != 1:
            await anyio.sleep(0.01)


async def until_finished(stream: AsyncIterator[Event], count: int) -> list[Event]:
    """Read events until ``count`` ``workflow_finished`` have arrived; return them all."""
    events: list[Event] = []
    with anyio.fail_after(60):
        async for event in stream:
            events.append(event)
            if sum(isinstance(e, WorkflowFinished) for e in events) == count:
                break
    return events


def one_step(label: str) -> baton.Workflow:
    return baton.Workflow(label).add("only", flows.noop.new())


async def test_what_finished_while_the_connection_was_down_arrives_once(
    app: baton.Baton,
) -> None:
    # The subscriber reads nothing while its backend is killed and twenty workflows
    # finish: those notifications are lost, and only the catch-up can bring them.
    async with app.events.subscribe() as stream, running_worker(app):
        before = await app.insert(one_step("before"))
        [first] = [e for e in await until_finished(stream, 1)
                   if isinstance(e, WorkflowFinished)]
        assert kill_subscribers(app.dsn) == 1
        gap = [await app.insert(one_step(f"gap-{n}")) for n in range(20)]
        for workflow_id in gap:
            await wait_for_workflow(app, workflow_id)
        with capture_logs() as logs:
            caught_up = await until_finished(stream, 20)
            after = await app.insert(one_step("after"))  # and live again
            rest = [*caught_up, *await until_finished(stream, 1)]
    assert first.workflow_id == before
    finished = [e.workflow_id for e in rest if isinstance(e, WorkflowFinished)]
    assert Counter(finished) == Counter([*gap, after]) and finished[-1] == after
    assert all(e.outcome == "completed" and e.failed_steps == [] for e in rest
               if isinstance(e, WorkflowFinished))
    names = [e["event"] for e in logs if e["event"].startswith("events.")]
    assert names == ["events.disconnected", "events.reconnected"]
    reconnected = next(e for e in logs if e["event"] == "events.reconnected")
    assert reconnected["caught_up"] == 20 and reconnected["log_level"] == "info"


async def test_a_subscriber_of_one_workflow_gets_its_latest_steps_and_its_finish_once(
    app: baton.Baton,
) -> None:
    wf = baton.Workflow("watched")
    wf.add("a", flows.noop.new())
    wf.add("b", flows.value.new(v=2).options(schedule_in=3600), deps=["a"])
    wf.add("c", flows.noop.new(), deps=["b"])
    async with app.events.subscribe(wf.id) as stream, running_worker(app):
        await app.insert(wf)
        seen: list[tuple[str, str]] = []
        with anyio.fail_after(30):
            async for event in stream:
                assert isinstance(event, StepUpdated)
                seen.append((event.step_name, event.state))
                if seen[-1] == ("a", "completed"):
                    break
        # b waits an hour: while the subscriber is away, it is let go and the rest runs.
        assert kill_subscribers(app.dsn) == 1
        [b_job] = [s.job_id for s in (await app.query.workflow(wf.id)).steps
                   if s.step_name == "b"]
        assert await app.retry(b_job)
        await wait_for_workflow(app, wf.id)
        rest = await until_finished(stream, 1)
    assert seen == [("a", "executing"), ("a", "completed")]
    steps = [(e.step_name, e.state, e.has_result, e.attempt) for e in rest
             if isinstance(e, StepUpdated)]
    assert steps == [("b", "completed", True, 1), ("c", "completed", False, 1)]
    finished = rest[-1]
    assert isinstance(finished, WorkflowFinished) and finished.outcome == "completed"
    assert all(e.workflow_id == wf.id and e.workflow_label == "watched" for e in rest)


async def test_a_finish_read_back_equals_the_one_announced(app: baton.Baton) -> None:
    # A subscriber of a workflow that already finished gets its workflow_finished from the
    # table, field for field what the settlement announced.
    wf = baton.Workflow("read-back-" + "x" * 300)
    wf.add("a", flows.explode.new(message="kaput"))
    wf.add("b", flows.noop.new(), deps=["a"])
    async with app.events.subscribe() as everything:
        await app.insert(wf)
        async with running_worker(app):
            [announced] = [e for e in await until_finished(everything, 1)
                           if isinstance(e, WorkflowFinished)]
    async with app.events.subscribe(wf.id) as stream:
        with anyio.fail_after(10):
            read_back = await anext(aiter(stream))
    assert announced.outcome == "failed" and announced.failed_steps == ["a", "b"]
    assert read_back == announced
    assert read_back.model_dump_json() == announced.model_dump_json()


async def test_a_finish_that_began_before_the_last_one_seen_is_still_read_back(
    app: baton.Baton,
) -> None:
    """A workflow's finished_at is when its settling transaction began: one that waited on a
    lock commits with a finished_at older than finishes already delivered. If it commits
    while the subscriber is away, the catch-up's margin must still reach back to it."""
    slow = baton.Workflow("slow-settle").add("later", flows.noop.new().options(schedule_in=3600))
    async with app.events.subscribe() as stream, running_worker(app), \
            await psycopg.AsyncConnection.connect(app.dsn) as holder, \
            anyio.create_task_group() as tg:
        await app.insert(slow)
        [job_id] = [s.job_id for s in (await app.query.workflow(slow.id)).steps]
        await holder.execute("SELECT id FROM baton.workflows WHERE id = %s FOR UPDATE",
                             (slow.id,))
        tg.start_soon(app.cancel, job_id)  # begins, then waits for the workflow's lock
        with anyio.fail_after(10):
            while sql_rows(app.dsn, LOCK_WAITERS) != [(1,)]:
                await anyio.sleep(0.01)
        quick = await app.insert(one_step("quick"))
        [seen] = [e for e in await until_finished(stream, 1) if isinstance(e, WorkflowFinished)]
        assert kill_subscribers(app.dsn) == 1
        await holder.rollback()  # the cancel settles the slow workflow, unheard
        await wait_for_workflow(app, slow.id)
        [late] = [e for e in await until_finished(stream, 1) if isinstance(e, WorkflowFinished)]
    assert seen.workflow_id == quick
    assert late.workflow_id == slow.id and late.outcome == "failed"
    assert late.timestamp < seen.timestamp


async def test_a_subscriber_whose_tables_are_gone_raises_database_error(
    app: baton.Baton,
) -> None:
    async with app.events.subscribe() as stream:
        sql_rows(app.dsn, "DROP SCHEMA baton CASCADE")
        assert kill_subscribers(app.dsn) == 1
        with pytest.raises(baton.DatabaseError, match="event subscription failed") as caught:
            await anext(aiter(stream))
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedTable)


async def test_subscribing_to_a_database_that_does_not_exist_raises_database_error(
    dsn: str,
) -> None:
    missing = baton.Baton(dsn=make_conninfo(dsn, dbname="baton_no_such_database"))
    with pytest.raises(baton.DatabaseError, match="does not exist") as caught:
        async with missing.events.subscribe():
            pass
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


async def insert_retrying(app: baton.Baton, wf: baton.Workflow) -> uuid.UUID:
    """Insert ``wf``, trying again on a lost connection (after a restart the pool may lend
    one that died with the server); a retry of an insert that had committed after all
    fails on the workflow's id."""
    for _ in range(app.pool_size + 1):
        try:
            return await app.insert(wf)
        except baton.DatabaseError as exc:
            if exc.sqlstate == "23505":
                return wf.id
            if exc.sqlstate is not None:
                raise
    raise AssertionError(f"could not insert {wf.label}")


async def _forward(stream: AsyncIterator[Event], send: MemoryObjectSendStream[uuid.UUID]
                   ) -> None:
    async with send:
        async for event in stream:
            if isinstance(event, WorkflowFinished):
                await send.send(event.workflow_id)


async def _receive(receive: MemoryObjectReceiveStream[uuid.UUID], got: list[uuid.UUID],
                   count: int) -> None:
    with anyio.fail_after(60):
        for _ in range(count):
            got.append(await receive.receive())


async def test_every_finish_arrives_once_across_killed_connections_and_a_restart(
    app: baton.Baton, pg_server: Server,
) -> None:
    """Three hundred and fifty small workflows run while the subscriber's backend is killed
    five times and the server restarts once (the worker loses its connections too)."""
    if not pg_server.embedded:
        pytest.skip("restarts the suite's own server")
    rounds, per_round = 7, 50
    inserted: list[uuid.UUID] = []
    got: list[uuid.UUID] = []
    send, receive = anyio.create_memory_object_stream[uuid.UUID](1000)
    with capture_logs() as logs:
        async with app.events.subscribe() as stream, \
                running_worker(app, queues={"default": 20}), \
                anyio.create_task_group() as tg:
            tg.start_soon(_forward, stream, send)
            for round_ in range(rounds):
                inserted += [await insert_retrying(app, one_step(f"r{round_}-{n}"))
                             for n in range(per_round)]
                await _receive(receive, got, 5)  # some arrive live, the rest is in flight
                if round_ < 5:
                    await kill_subscriber_when_connected(app.dsn)
                elif round_ == 5:
                    # Restart once the worker is idle: whether a step claimed as the server
                    # goes down still finishes is the worker's concern, not this test's.
                    await _receive(receive, got, len(inserted) - len(got))
                    await anyio.to_thread.run_sync(pg_server.restart)
            await _receive(receive, got, len(inserted) - len(got))
            # A late duplicate would arrive before the finish of a workflow inserted now.
            sentinel = await insert_retrying(app, one_step("sentinel"))
            while not got or got[-1] != sentinel:
                await _receive(receive, got, 1)
            tg.cancel_scope.cancel()
    assert Counter(got) == Counter([*inserted, sentinel])
    # A kill may land while the subscriber is still catching up from the one before.
    names = Counter(e["event"] for e in logs)
    assert names["events.disconnected"] == names["events.reconnected"] >= 2
