"""Kept results of plain jobs, the sync twins of the async API, and tags on jobs."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import baton
from baton.coroutines import is_coroutine_method
from baton.job import MAX_TAGS
from baton.query import Query
from baton.testing import drain_queue, running_worker, wait_for_job, wait_for_workflow
from tests.apps import kept
from tests.conftest import bound


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(kept.app, dsn) as bound_app:
        yield bound_app


def kept_rows(dsn: str) -> dict[int, Any]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT job_id, result FROM baton.job_results").fetchall())


# -- kept results ------------------------------------------------------------------------


async def test_a_step_that_keeps_results_keeps_what_each_job_returned(
        app: baton.Baton, dsn: str) -> None:
    first = await app.enqueue(kept.summarize.new(text="hello kept world"))
    second = await app.enqueue(kept.total.new(numbers=[1.5, 2]))
    empty = await app.enqueue(kept.nothing.new())
    await drain_queue(app)
    assert await app.result_of(first) == {"words": 3, "title": "hello"}  # the model's JSON
    assert await app.result_of(second) == 3.5  # a plain def step, run in a thread
    assert await app.result_of(empty) is None  # returned None: kept as JSON null
    assert app.result_of_sync(first) == {"words": 3, "title": "hello"}
    assert set(kept_rows(dsn)) == {first, second, empty}


async def test_reading_a_result_that_is_not_there_says_why(app: baton.Baton) -> None:
    waiting = await app.enqueue(kept.summarize.new(text="not yet"))
    with pytest.raises(baton.ResultNotReadyError) as not_ready:
        await app.result_of(waiting)
    assert not_ready.value.job_id == waiting and not_ready.value.state == "available"
    assert "available, not completed" in str(not_ready.value)

    forgotten = await app.enqueue(kept.forgetful.new(x=2))
    await drain_queue(app)
    with pytest.raises(baton.ResultNotKeptError) as not_kept:
        await app.result_of(forgotten)
    assert not_kept.value.step == kept.forgetful.name
    assert "keep_result=True" in str(not_kept.value)
    with pytest.raises(baton.ResultNotKeptError):
        app.result_of_sync(forgotten)

    with pytest.raises(baton.JobNotFound):
        await app.result_of(10**9)
    with pytest.raises(baton.JobNotFound):
        app.result_of_sync(10**9)


async def test_a_result_that_cannot_be_kept_fails_its_job_for_good(
        app: baton.Baton, dsn: str) -> None:
    ids = await app.enqueue_many([kept.unkeepable.new(kind=k) for k in ("nan", "nul", "obj")])
    await drain_queue(app)
    for job_id in ids:
        job = await app.get_job(job_id)
        assert job.state == "discarded", job
        assert job.errors[-1]["kind"] == "result"
        assert job.errors[-1]["error"].startswith("result cannot be kept as JSON")
    assert kept_rows(dsn) == {}


async def test_a_workflow_step_reads_its_stored_result(app: baton.Baton) -> None:
    wf = baton.Workflow("kept")
    wf.add("double", kept.forgetful.new(x=21))
    await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, wf.id)
    view = await app.query.workflow(wf.id)
    assert await app.result_of(view.steps[0].job_id) == 42  # its node's result


async def test_a_result_is_kept_only_by_the_write_that_completes_the_job(
        app: baton.Baton, dsn: str) -> None:
    # The statement runs after the finish in its transaction: a job that finish did not
    # complete (cancelled or rescued meanwhile, or completed by an earlier write) gets none.
    cancelled = await app.enqueue(kept.summarize.new(text="never ran"))
    await app.cancel(cancelled)
    with psycopg.connect(dsn) as conn:
        conn.execute(app.sql["job_results_keep"],
                     {"rows": f'[{{"job_id": {cancelled}, "result": 1}}]'})
    assert kept_rows(dsn) == {}


async def test_the_completer_keeps_a_result_only_where_its_finish_completes_the_job(
        app: baton.Baton, dsn: str) -> None:
    # Through the real write: two jobs claimed by worker "w"; one is cancelled while it
    # runs, then both outcomes arrive as completed with a result.
    import anyio

    from baton.worker.completer import Completer
    from baton.worker.executor import Executor, FetchedJob, Outcome
    from baton.worker.producer import head_params
    from baton.workflows.engine import WorkflowEngine

    ids = await app.enqueue_many([kept.total.new(numbers=[1]), kept.total.new(numbers=[2])])
    async with app.connection() as conn:
        cur = await conn.execute(app.sql["jobs_fetch"], {
            "queue": "default", "demand": 2, "worker_id": "w", "steps": [kept.total.name],
            **head_params()})
        claimed = [FetchedJob(*row) for row in await cur.fetchall()]
    assert sorted(j.id for j in claimed) == sorted(ids)
    await app.cancel(ids[1])
    engine = WorkflowEngine(app, Executor(app, anyio.CapacityLimiter(1)))
    completer = Completer(app, "w", flush_interval=0, flush_max=10, max_pending=100,
                          engine=engine)
    for job in claimed:
        completer.push(Outcome(job, baton.JobState.COMPLETED, result=job.args["numbers"][0]))
    await completer.flush_once()
    assert kept_rows(dsn) == {ids[0]: 1}
    assert await app.result_of(ids[0]) == 1
    with pytest.raises(baton.ResultNotReadyError):
        await app.result_of(ids[1])  # cancelled: its late outcome changed nothing


async def test_running_a_job_again_replaces_its_result_and_pruning_removes_it(
        app: baton.Baton, dsn: str) -> None:
    job_id = await app.enqueue(kept.total.new(numbers=[1]))
    await drain_queue(app)
    with psycopg.connect(dsn) as conn:  # as if it had run with other args the first time
        conn.execute("UPDATE baton.job_results SET result = '99' WHERE job_id = %s", (job_id,))
    assert await app.retry(job_id)
    await drain_queue(app)
    assert await app.result_of(job_id) == 1

    other = await app.enqueue(kept.total.new(numbers=[2]))
    await drain_queue(app)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE baton.jobs SET finalized_at = now() - interval '1 hour' "
                     "WHERE id = %s", (job_id,))
        [(pruned,)] = conn.execute(app.sql["jobs_prune"], {"max_age": 60, "limit": 100})
    assert pruned == 1
    assert set(kept_rows(dsn)) == {other}


# -- sync twins --------------------------------------------------------------------------


STREAMS = {"connection"}
"""Async context managers and streams: no coroutine, so no twin (``connection_sync`` is the
sync pool's)."""


def coroutine_methods(cls: type) -> list[str]:
    return sorted(name for name, member in inspect.getmembers(cls)
                  if not name.startswith("_") and is_coroutine_method(member))


def test_every_public_coroutine_has_a_sync_twin_with_its_parameters() -> None:
    found = {"Baton": coroutine_methods(baton.Baton), "Query": coroutine_methods(Query)}
    assert {"result", "results", "get_workflow", "append", "result_of", "open"} <= set(
        found["Baton"])
    assert {"workflow", "workflows", "cost", "cost_by_model", "status", "jobs"} <= set(
        found["Query"])
    for cls, names in ((baton.Baton, found["Baton"]), (Query, found["Query"])):
        for name in names:
            twin = getattr(cls, f"{name}_sync", None)
            assert twin is not None, f"{cls.__name__}.{name} has no {name}_sync"
            assert not is_coroutine_method(twin), f"{cls.__name__}.{name}_sync is async"
            assert getattr(getattr(cls, name), "__baton_coroutine__", False), (
                f"{cls.__name__}.{name} is not @loop_only: called outside an event loop, it "
                "would return a coroutine that never runs")
            ours = inspect.signature(getattr(cls, name)).parameters
            theirs = inspect.signature(twin).parameters
            assert list(ours) == list(theirs), f"{cls.__name__}.{name}_sync parameters"


async def test_each_sync_twin_answers_as_its_coroutine_does(app: baton.Baton) -> None:
    wf = baton.Workflow("twins")
    wf.add("first", kept.forgetful.new(x=1))
    await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, wf.id)
    job_id = await app.enqueue(kept.summarize.new(text="twin check"))
    await drain_queue(app)
    since, until = datetime.now(UTC) - timedelta(days=1), datetime.now(UTC)
    calls: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = {
        "result": (app, (wf.id, "first"), {}),
        "results": (app, (wf.id,), {}),
        "get_workflow": (app, (wf.id,), {}),
        "result_of": (app, (job_id,), {}),
        "get_job": (app, (job_id,), {}),
        "workflow": (app.query, (wf.id,), {}),
        "workflows": (app.query, (), {"label": "twins"}),
        "cost": (app.query, (wf.id,), {}),
        "cost_by_model": (app.query, (since, until), {}),
        "status": (app.query, (), {}),
        "jobs": (app.query, (), {"tags": ["reports"]}),
        "list_queues": (app, (), {}),
        "queue_limits": (app, (), {}),
        "budgets": (app, (wf.id,), {}),
        "schedules": (app.query, (), {}),
    }
    for name, (target, args, kwargs) in calls.items():
        if not hasattr(target, name):
            continue  # a feature not in this build
        awaited = await getattr(target, name)(*args, **kwargs)
        synced = await _in_thread(getattr(target, f"{name}_sync"), *args, **kwargs)
        assert _comparable(synced) == _comparable(awaited), name


async def test_writes_through_sync_twins(app: baton.Baton) -> None:
    wf = baton.Workflow("grow")
    wf.add("first", kept.forgetful.new(x=1))
    wf.add("held", kept.forgetful.new(x=5), deps=["first"])
    await app.insert(wf)
    grown = baton.Workflow("more")
    grown.add("second", kept.forgetful.new(x=2), deps=["first"])
    assert await _in_thread(app.append_sync, wf.id, grown) == ["second"]
    await _in_thread(app.open_sync)
    job_id = await app.enqueue(kept.forgetful.new(x=3))
    assert await _in_thread(app.cancel_sync, job_id)
    assert await _in_thread(app.retry_sync, job_id)
    async with running_worker(app):
        info = await wait_for_workflow(app, wf.id)
        await wait_for_job(app, job_id, "completed")
    assert info.total_steps == 3 and info.state == "completed"
    assert await _in_thread(app.results_sync, wf.id) == {"first": 2, "held": 10, "second": 4}

    # The other writes, each through its twin: what it wrote is read back asynchronously.
    assert await _in_thread(app.migrate_sync) == []
    one = await _in_thread(app.enqueue_sync, kept.forgetful.new(x=7))
    many = await _in_thread(app.enqueue_many_sync, [kept.forgetful.new(x=8)] * 40)
    failing = baton.Workflow("fails")
    failing.add("bad", kept.fails.new(message="no"))
    failing_id = await _in_thread(app.insert_sync, failing)
    assert (await app.get_job(one)).state == "available" and len(many) == 40
    async with running_worker(app):
        assert (await wait_for_workflow(app, failing_id)).state == "failed"
        assert await _in_thread(app.resume_sync, failing_id) == ["bad"]
        await wait_for_workflow(app, failing_id)
    assert (await app.get_workflow(failing_id)).state == "failed"
    exercised = {"append", "open", "cancel", "retry", "results", "migrate", "enqueue",
                 "enqueue_many", "insert", "resume", "close"}
    if hasattr(app, "pause_queue"):
        assert (await _in_thread(app.pause_queue_sync, "default")).paused
        assert not (await _in_thread(app.resume_queue_sync, "default")).paused
        assert (await _in_thread(app.scale_queue_sync, "default", 3)).concurrency == 3
        exercised |= {"pause_queue", "resume_queue", "scale_queue"}
    if hasattr(app, "limit_queue"):
        await _in_thread(app.limit_queue_sync, "default", concurrency=2)
        assert [limit.queue for limit in await app.queue_limits()] == ["default"]
        assert await _in_thread(app.unlimit_queue_sync, "default")
        exercised |= {"limit_queue", "unlimit_queue"}
    if hasattr(app, "set_budget"):
        await _in_thread(app.set_budget_sync, wf.id, 5)
        assert [b.budget_usd for b in await app.budgets(wf.id)] == [5]
        exercised |= {"set_budget"}
    if hasattr(app, "cancel_workflow"):
        stopped = baton.Workflow("stopped")
        stopped.add("only", kept.forgetful.new(x=9))
        stopped_id = await _in_thread(app.insert_sync, stopped)
        assert await _in_thread(app.cancel_workflow_sync, stopped_id) == ["only"]
        assert (await app.get_workflow(stopped_id)).state == "failed"
        exercised |= {"cancel_workflow"}
    await _in_thread(app.close_sync)
    reads = {"result", "results", "get_workflow", "result_of", "get_job", "list_queues",
             "queue_limits", "budgets"}  # test_each_sync_twin_answers_as_its_coroutine_does
    missing = set(coroutine_methods(baton.Baton)) - exercised - reads
    assert not missing, f"sync twins no test exercises: {sorted(missing)} (add them here)"


async def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    import functools

    import anyio.to_thread

    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _comparable(value: Any) -> Any:
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if hasattr(value, "model_dump"):
        data = value.model_dump(mode="json")
        for volatile in ("oldest_available_seconds", "heartbeat_at"):
            data.pop(volatile, None)
        return data
    return value


def test_a_coroutine_called_without_an_event_loop_names_its_twin(dsn: str) -> None:
    app = baton.Baton(dsn)
    with pytest.raises(baton.NoEventLoopError) as calling:
        app.result(uuid.uuid4(), "step")  # a script forgot this is a coroutine
    assert calling.value.method == "app.result"
    assert "app.result_sync()" in str(calling.value)
    with pytest.raises(baton.NoEventLoopError, match=r"app\.query\.status_sync\(\)"):
        app.query.status()
    assert isinstance(calling.value, RuntimeError)
    with pytest.raises(baton.NoEventLoopError, match=r"app\.enqueue_sync\(\)"):
        app.enqueue(kept.forgetful.new(x=1))  # a web view that meant enqueue_sync
    assert app.get_job_sync(app.enqueue_sync(kept.forgetful.new(x=1))).state == "available"
    app.close_sync()


# -- tags --------------------------------------------------------------------------------


async def test_tags_come_from_the_step_and_the_job_on_every_insert_path(
        app: baton.Baton) -> None:
    one = await app.enqueue(kept.summarize.new(text="a b"))
    keyed = await app.enqueue(kept.summarize.new(text="c d").options(tags=["vip", "eu"]),
                              idempotency_key="k1")
    few = await app.enqueue_many([kept.forgetful.new(x=1).options(tags=["few"]),
                                  kept.forgetful.new(x=2)])
    copied = await app.enqueue_many(kept.fails.new_many({"message": str(i)} for i in range(40)))
    listed = await app.enqueue_many(
        [kept.forgetful.new(x=i).options(tags=["copy", f"n:{i}"]) for i in range(40)])
    scheduled = await app.enqueue_many(
        [kept.forgetful.new(x=i).options(tags=["later"], schedule_in=600) for i in range(33)])
    wf = baton.Workflow("tagged")
    wf.add("first", kept.forgetful.new(x=1).options(tags=["in-flow"]))
    await app.insert(wf)

    async def tags(job_id: int) -> list[str]:
        return (await app.get_job(job_id)).tags

    assert await tags(one) == ["reports"]
    assert await tags(keyed) == ["vip", "eu"]  # the job's tags replace the step's
    assert [await tags(i) for i in few] == [["few"], []]
    assert await tags(copied[7]) == ["flaky", "team:data"]
    assert await tags(listed[3]) == ["copy", "n:3"]
    assert await tags(scheduled[0]) == ["later"]
    view = await app.query.workflow(wf.id)
    assert await tags(view.steps[0].job_id) == ["in-flow"]

    found = await app.query.jobs(tags=["copy"], limit=100)
    assert sorted(j.id for j in found) == sorted(listed)
    assert [j.id for j in await app.query.jobs(tags=["copy", "n:3"])] == [listed[3]]
    assert [j.id for j in await app.query.jobs(tags=["team:data"], limit=1)] == [copied[-1]]
    assert await app.query.jobs(tags=["nobody"]) == []
    by_step = await app.query.jobs(step=kept.summarize.name, state="available")
    assert sorted(j.id for j in by_step) == sorted([one, keyed])
    assert len(await app.query.jobs(queue="default", state="scheduled", limit=500)) == 33
    with pytest.raises(ValueError, match="no job state 'done'"):
        await app.query.jobs(state="done")


def test_tags_are_checked_where_they_are_given() -> None:
    job = kept.forgetful.new(x=1)
    assert job.tags == ()
    assert job.options(tags=["a", "b", "a"]).tags == ("a", "b")  # repeats dropped
    assert job.options(tags=["a"]).options(tags=[]).tags == ()
    for bad in ("one-string", ["has space"], [""], ["x" * 65], [1], ["NUL\x00"],
                [f"t{i}" for i in range(MAX_TAGS + 1)]):
        with pytest.raises(baton.OptionsError) as caught:
            job.options(tags=bad)  # type: ignore[arg-type]
        assert caught.value.option == "tags"
    app = baton.Baton()
    with pytest.raises(baton.OptionsError):
        app.step(tags=["no way"], name="tests.bad_tags")(lambda: None)
    assert baton.JobSpec("x.y", tags=["p", "q"]).tags == ("p", "q")  # type: ignore[arg-type]


async def test_the_tag_filter_can_use_the_partial_index(app: baton.Baton, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + app.sql["jobs_list"].as_string(conn),
            {"queue": None, "state": None, "step": None, "tags": ["vip"], "limit": 10}))
    assert "jobs_tags_idx" in plan, plan
