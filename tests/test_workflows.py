"""Workflows with real workers: chains, diamonds, fan-out, failures, appends, idempotency."""

from __future__ import annotations

import uuid

import anyio
import psycopg
import pytest

import baton
from baton.testing import running_worker, wait_for_workflow
from tests.apps import flows
from tests.helpers import sql_rows


@pytest.fixture
def app(flows_app: baton.Baton) -> baton.Baton:
    return flows_app


async def test_chain_passes_results(app: baton.Baton) -> None:
    wf = baton.Workflow("ingest")
    wf.add("fetch", flows.fetch.new(url="https://example.com"))
    wf.add("parse", flows.parse.new(), deps=["fetch"])
    wf.add("store", flows.store.new(), deps=["parse"])
    workflow_id = await app.insert(wf)
    states = sql_rows(app.dsn, "SELECT step_name, state FROM baton.workflow_steps "
                      "WHERE workflow_id = %s ORDER BY step_name", (workflow_id,))
    assert states == [("fetch", "available"), ("parse", "pending"), ("store", "pending")]
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed" and info.failed_steps == []
    assert flows.CALLS["store"] == [{"length": len("<html>https://example.com</html>"),
                                     "url": "https://example.com"}]
    results = await app.results(workflow_id)
    assert results["store"] == "stored"
    assert results["fetch"] == {"url": "https://example.com",
                                "body": "<html>https://example.com</html>"}


async def test_siblings_get_their_own_copy_of_a_shared_result(app: baton.Baton) -> None:
    # The claim reads a dependency's result once for all the steps that need it; each
    # step still gets a copy of its own to change.
    wf = baton.Workflow("shared")
    wf.add("root", flows.value.new(v={"items": ["x" * 10_000] * 3}))
    for i in range(50):
        wf.add(f"s{i}", flows.spoil.new(), deps=["root"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed"
    assert flows.CALLS["spoil"] == [3] * 50


async def test_diamond_join_sees_both(app: baton.Baton) -> None:
    wf = baton.Workflow("diamond")
    wf.add("a", flows.value.new(v=1))
    wf.add("b", flows.value.new(v="two"), deps=["a"])
    wf.add("c", flows.value.new(v=[3]), deps=["a"])
    wf.add("d", flows.join.new(), deps=["b", "c"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, workflow_id)
    assert flows.CALLS["join"] == [{"b": "two", "c": [3]}]


async def test_wide_fan_out_fan_in(app: baton.Baton) -> None:
    wf = baton.Workflow("wide")
    wf.add("root", flows.value.new(v=0))
    for i in range(1000):
        wf.add(f"leaf_{i}", flows.value.new(v=i), deps=["root"])
    wf.add("sink", flows.join.new(), deps=[f"leaf_{i}" for i in range(1000)])
    workflow_id = await app.insert(wf)
    async with running_worker(app, queues={"default": 50}):
        info = await wait_for_workflow(app, workflow_id, timeout=120)
    assert info.state == "completed" and info.settled_steps == 1002
    [seen] = flows.CALLS["join"]
    assert seen == {f"leaf_{i}": i for i in range(1000)}


async def test_failure_cascades_and_calls_back(app: baton.Baton) -> None:
    wf = baton.Workflow("cascade")
    wf.add("a", flows.explode.new())
    wf.add("b", flows.watcher.new(), deps=["a"])
    wf.add("c", flows.watcher.new(), deps=["b"])
    wf.add("side", flows.value.new(v=1))
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "failed" and sorted(info.failed_steps) == ["a", "b", "c"]
    assert flows.CALLS["watcher_ran"] == []
    assert ("b", "dependency 'a' was discarded") in flows.CALLS["on_dep_discarded"]
    assert ("c", "dependency 'b' was cancelled") in flows.CALLS["on_dep_cancelled"]
    rows = sql_rows(app.dsn, "SELECT step_name, state FROM baton.workflow_steps "
                    "WHERE workflow_id = %s ORDER BY 1", (workflow_id,))
    assert rows == [("a", "discarded"), ("b", "cancelled"), ("c", "cancelled"),
                    ("side", "completed")]


async def test_ignore_discarded_runs_anyway(app: baton.Baton) -> None:
    wf = baton.Workflow("ignore")
    wf.add("a", flows.explode.new())
    wf.add("ok", flows.value.new(v=5))
    wf.add("b", flows.join.new(), deps=["a", "ok"], ignore_discarded=True)
    wf.add("c", flows.join.new(), deps=["a"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert await app.result(workflow_id, "b") == {"count": 1, "failed": ["a"]}
    assert info.state == "failed" and sorted(info.failed_steps) == ["a", "c"]


async def test_workflow_wide_ignore_flag(app: baton.Baton) -> None:
    wf = baton.Workflow("lenient", ignore_discarded=True)
    wf.add("a", flows.explode.new())
    wf.add("b", flows.join.new(), deps=["a"])
    wf.add("c", flows.join.new(), deps=["a"], ignore_discarded=False)
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert sorted(info.failed_steps) == ["a", "c"]


async def test_multi_model_fan_out_k_of_n(app: baton.Baton) -> None:
    wf = baton.Workflow("drafts")
    members = wf.add_fan_out("draft", flows.draft.new(topic="tides"),
                             models=["vendor/model-a", "model-b", "bad-model"],
                             synthesize_with=flows.synthesize.new(), min_success=2)
    assert members == ["draft_model_a", "draft_model_b", "draft_bad_model"]
    strict = baton.Workflow("strict")
    strict.add_fan_out("draft", flows.draft.new(topic="tides"),
                       models=["model-a", "bad-model"], synthesize_with=flows.synthesize.new())
    lenient_id = await app.insert(wf)
    strict_id = await app.insert(strict)
    async with running_worker(app):
        await wait_for_workflow(app, lenient_id)
        strict_info = await wait_for_workflow(app, strict_id)
    synthesis = await app.result(lenient_id, "draft_synthesis")
    assert synthesis == {"drafts": {"vendor/model-a": "vendor/model-a:tides",
                                    "model-b": "model-b:tides"},
                         "failed": ["draft_bad_model"]}
    assert sorted(strict_info.failed_steps) == ["draft_bad_model", "draft_synthesis"]


async def test_a_met_quorum_absorbs_failures_unless_strict(app: baton.Baton) -> None:
    """A synthesis that met its K-of-N quorum completes its workflow, though a copy
    failed; with strict=True the failed copy still fails it."""
    ids = {}
    for strict in (False, True):
        wf = baton.Workflow(f"quorum-{strict}")
        wf.add_fan_out("draft", flows.draft.new(topic="tides"), models=["model-a", "bad-b"],
                       synthesize_with=flows.synthesize.new(), min_success=1, strict=strict)
        ids[strict] = await app.insert(wf)
    async with running_worker(app):
        lenient = await wait_for_workflow(app, ids[False])
        strict_info = await wait_for_workflow(app, ids[True])
    assert (lenient.state, lenient.failed_steps) == ("completed", [])
    assert (strict_info.state, strict_info.failed_steps) == ("failed", ["draft_bad_b"])
    for info in (lenient, strict_info):
        assert await app.result(info.id, "draft_synthesis") == {
            "drafts": {"model-a": "model-a:tides"}, "failed": ["draft_bad_b"]}


async def test_dynamic_append(app: baton.Baton) -> None:
    wf = baton.Workflow("dynamic")
    wf.add("expand", flows.expand.new(count=5))
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed" and info.total_steps == 7
    assert flows.CALLS["join"] == [{f"item_{i}": i * 10 for i in range(5)}]


async def test_append_is_validated(app: baton.Baton) -> None:
    wf = baton.Workflow("grow")
    wf.add("a", flows.noop.new().options(schedule_in=3600))
    workflow_id = await app.insert(wf)
    bad = baton.Workflow()
    bad.add("b", flows.noop.new(), deps=["missing"])
    with pytest.raises(baton.UnknownDependencyError):
        await app.append(workflow_id, bad)
    dup = baton.Workflow()
    dup.add("a", flows.noop.new())
    with pytest.raises(baton.DuplicateStepError):
        await app.append(workflow_id, dup)
    with pytest.raises(baton.WorkflowNotFound):
        await app.append(uuid.uuid4(), baton.Workflow().add("x", flows.noop.new()))
    assert (await app.get_workflow(workflow_id)).total_steps == 1


async def test_retried_step_reuses_stored_result(app: baton.Baton) -> None:
    wf = baton.Workflow("paid")
    wf.add("call", flows.paid_call.new(key="k1"))
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, workflow_id)
        [(job_id,)] = sql_rows(app.dsn, "SELECT job_id FROM baton.nodes WHERE workflow_id = %s",
                               (workflow_id,))
        # Re-run by hand, and as if the worker had been killed before completing it.
        assert await app.retry(job_id)
        await _wait_attempt(app, job_id, 2)
        sql_rows(app.dsn, "UPDATE baton.jobs SET state = 'available', finalized_at = NULL, "
                 "max_attempts = 5 WHERE id = %s", (job_id,))
        await _wait_attempt(app, job_id, 3)
    assert flows.CALLS["paid:k1"] == [1]  # the side effect happened once
    assert await app.result(workflow_id, "call") == {"answer": 42, "key": "k1"}


async def _wait_attempt(app: baton.Baton, job_id: int, attempt: int) -> None:
    with anyio.fail_after(10):
        while True:
            job = await app.get_job(job_id)
            if job.attempt >= attempt and job.state == "completed":
                return
            await anyio.sleep(0.01)


async def test_validation_errors_write_nothing(app: baton.Baton) -> None:
    cyclic = baton.Workflow("cycle")
    cyclic.add("a", flows.noop.new(), deps=["c"])
    cyclic.add("b", flows.noop.new(), deps=["a"])
    cyclic.add("c", flows.noop.new(), deps=["b"])
    cyclic.add("free", flows.noop.new())
    with pytest.raises(baton.CycleError) as info:
        await app.insert(cyclic)
    assert set(info.value.steps) == {"a", "b", "c"} and len(info.value.steps) == 4
    assert "a" in str(info.value) and "->" in str(info.value)
    unknown = baton.Workflow().add("a", flows.noop.new(), deps=["ghost"])
    with pytest.raises(baton.UnknownDependencyError, match="ghost"):
        await app.insert(unknown)
    with pytest.raises(baton.DuplicateStepError):
        baton.Workflow().add("a", flows.noop.new()).add("a", flows.noop.new())
    with pytest.raises(baton.WorkflowError, match="at least one step"):
        await app.insert(baton.Workflow())
    with pytest.raises(baton.WorkflowError, match="invalid step name"):
        baton.Workflow().add("has space", flows.noop.new())
    assert sql_rows(app.dsn, "SELECT (SELECT count(*) FROM baton.jobs), "
                    "(SELECT count(*) FROM baton.workflows)") == [(0, 0)]


async def test_insert_in_callers_transaction(app: baton.Baton) -> None:
    wf = baton.Workflow("tx").add("a", flows.noop.new()).add("b", flows.noop.new(), deps=["a"])
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        await app.insert(wf, conn=conn)
        await conn.rollback()
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.nodes") == [(0,)]
    with psycopg.connect(app.dsn) as sync_conn:
        workflow_id = app.insert_sync(wf, conn=sync_conn)
    app.close_sync()
    assert (await app.get_workflow(workflow_id)).total_steps == 2


async def test_ten_thousand_steps_insert(app: baton.Baton) -> None:
    wf = baton.Workflow("big")
    wf.add("root", flows.noop.new())
    for i in range(9_999):
        wf.add(f"s{i}", flows.noop.new(), deps=["root"])
    workflow_id = await app.insert(wf)
    assert sql_rows(app.dsn, "SELECT count(*), sum(pending_deps) FROM baton.nodes "
                    "WHERE workflow_id = %s", (workflow_id,)) == [(10_000, 9_999)]


async def test_concurrent_parents_never_strand_the_join(app: baton.Baton) -> None:
    ids = []
    for n in range(40):
        wf = baton.Workflow(f"race-{n}")
        wf.add("left", flows.value.new(v="l"))
        wf.add("right", flows.value.new(v="r"))
        wf.add("join", flows.join.new(), deps=["left", "right"])
        ids.append(await app.insert(wf))
    async with running_worker(app, queues={"default": 4}), \
            running_worker(app, queues={"default": 4}):
        for workflow_id in ids:
            info = await wait_for_workflow(app, workflow_id, timeout=60)
            assert info.state == "completed"
    assert len(flows.CALLS["join"]) == 40
    assert all(seen == {"left": "l", "right": "r"} for seen in flows.CALLS["join"])


async def test_result_readers_and_their_errors(app: baton.Baton) -> None:
    wf = baton.Workflow("readers")
    wf.add("fetch", flows.fetch.new(url="u"))
    wf.add("quiet", flows.noop.new())
    wf.add("read", flows.reader.new(), deps=["fetch", "quiet"])
    workflow_id = await app.insert(wf)
    plain = await app.enqueue(flows.plain_reader.new())
    async with running_worker(app):
        await wait_for_workflow(app, workflow_id)
        from baton.testing import wait_for_job

        await wait_for_job(app, plain, "completed")
    assert await app.result(workflow_id, "read") == {
        "nonexistent_dep": "NotADependencyError", "no_such_step": "NoSuchStepError",
        "quiet": "NoResultError", "fetch_url": "u",
    }
    with pytest.raises(baton.NoResultError):
        await app.result(workflow_id, "quiet")
    with pytest.raises(baton.NoSuchStepError):
        await app.result(workflow_id, "nope")


async def test_llm_step_snoozes_on_429(app: baton.Baton) -> None:
    job_id = await app.enqueue(flows.rate_limited.new())
    async with running_worker(app, queues={"llm": 1}):
        from baton.testing import wait_for_job

        job = await wait_for_job(app, job_id, "scheduled")
    assert job.snoozes == 1 and job.attempt == 0 and job.errors == []


async def test_template_and_model_map(app: baton.Baton) -> None:
    template = {
        "label": "from-data",
        "models": {"solo": "model-z"},
        "steps": [
            {"name": "fetch", "step": flows.fetch.name, "args": {"url": "t"}},
            {"name": "draft", "step": flows.draft.name, "args": {"topic": "x"},
             "models": ["m1", "m2"], "deps": ["fetch"],
             "synthesize_with": {"step": flows.synthesize.name}},
            {"name": "solo", "step": flows.modelled.name, "deps": ["draft_synthesis"]},
        ],
    }
    wf = app.workflow_from_template(template)
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed"
    assert await app.result(workflow_id, "solo") == "model-z"
    with pytest.raises(baton.UnknownStepError):
        app.workflow_from_template({"steps": [{"name": "x", "step": "no.such.step"}]})
    with pytest.raises(baton.WorkflowError, match="invalid workflow template"):
        app.workflow_from_template({"steps": [{"name": "x"}]})
