"""Sub-workflows with a real worker: results through one and several leaves, nesting,
and a failing child step that fails its parent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import baton
from baton.dag import SUBWORKFLOW_STEP
from baton.testing import running_worker, wait_for_workflow
from tests.apps import nested
from tests.conftest import bound
from tests.helpers import sql_rows


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    nested.reset()
    async with bound(nested.app, dsn) as bound_app:
        yield bound_app


async def test_one_leaf_passes_its_result(app: baton.Baton) -> None:
    child = baton.Workflow("child")
    child.add("a", nested.add.new(n=10))
    child.add("b", nested.add.new(n=100), deps=["a"])
    wf = baton.Workflow("parent")
    wf.add("plan", nested.value.new(v=1))
    wf.add("research", child, deps=["plan"])
    wf.add("report", nested.seen.new(), deps=["research"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed" and info.total_steps == 5
    assert nested.CALLS["report"] == [{"research": 111}]
    assert await app.results(workflow_id) == {
        "plan": 1, "research.a": 11, "research.b": 111, "research": 111,
        "report": {"research": 111}}
    rows = sql_rows(app.dsn, "SELECT step_name, worker FROM baton.workflow_steps "
                    "WHERE workflow_id = %s AND step_name = 'research'", (workflow_id,))
    assert rows == [("research", SUBWORKFLOW_STEP)]


async def test_several_leaves_report_by_name(app: baton.Baton) -> None:
    child = baton.Workflow("child")
    child.add("a", nested.value.new(v="start"))
    child.add("b", nested.value.new(v=[1, 2]), deps=["a"])
    child.add("c", nested.value.new(v={"k": "v"}), deps=["a"])
    drafts = baton.Workflow("drafts")
    drafts.add_fan_out("d", nested.draft.new(topic="tides"), models=["m-1", "m-2"])
    wf = baton.Workflow("parent")
    wf.add("research", child)
    wf.add("write", drafts, deps=["research"])
    wf.add("report", nested.seen.new(), deps=["research", "write"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed"
    assert nested.CALLS["report"] == [{
        "research": {"b": [1, 2], "c": {"k": "v"}},
        "write": {"m-1": "m-1:tides", "m-2": "m-2:tides"},  # a fan-out ends it: one step
    }]


async def test_nested_two_levels(app: baton.Baton) -> None:
    inner = baton.Workflow("inner")
    inner.add("x", nested.add.new(n=1))
    inner.add("y", nested.add.new(n=2), deps=["x"])
    middle = baton.Workflow("middle")
    middle.add("m", nested.value.new(v=1000))
    middle.add("inner", inner, deps=["m"])
    wf = baton.Workflow("outer")
    wf.add("outer", middle)
    wf.add("report", nested.seen.new(), deps=["outer"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "completed"
    results = await app.results(workflow_id)
    assert results == {"outer.m": 1000, "outer.inner.x": 1001, "outer.inner.y": 1003,
                       "outer.inner": 1003, "outer": 1003, "report": {"outer": 1003}}


async def test_failing_child_step_fails_the_parent(app: baton.Baton) -> None:
    child = baton.Workflow("child")
    child.add("a", nested.value.new(v=1))
    child.add("b", nested.explode.new(), deps=["a"])
    wf = baton.Workflow("parent")
    wf.add("research", child)
    wf.add("report", nested.seen.new(), deps=["research"])
    wf.add("lenient", nested.seen.new(), deps=["research"], ignore_cancelled=True)
    wf.add("side", nested.value.new(v="ok"))
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, workflow_id)
    assert info.state == "failed"
    assert sorted(info.failed_steps) == ["report", "research", "research.b"]
    assert "report" not in nested.CALLS and nested.CALLS["lenient"] == [{}]
    rows = sql_rows(app.dsn, "SELECT step_name, state, last_error FROM baton.workflow_steps "
                    "WHERE workflow_id = %s ORDER BY 1", (workflow_id,))
    assert rows == [
        ("lenient", "completed", None),
        ("report", "cancelled", "dependency 'research' was cancelled"),
        ("research", "cancelled", "dependency 'research.b' was discarded"),
        ("research.a", "completed", None),
        ("research.b", "discarded", "RuntimeError: the child step failed"),
        ("side", "completed", None),
    ]
