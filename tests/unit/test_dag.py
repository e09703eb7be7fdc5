"""The workflow builder, Kahn's algorithm and the runtime gate: pure logic."""

from __future__ import annotations

import pytest

import baton
from baton.dag import model_slug, topological_order
from baton.workflows.gate import Dep, decide, gather_results

app = baton.Baton()


@app.step(name="unit.noop")
async def noop() -> None: ...


def test_topological_order_and_cycles() -> None:
    assert topological_order({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}) == [
        "a", "b", "c", "d"]
    with pytest.raises(baton.CycleError) as info:
        topological_order({"a": ["c"], "b": ["a"], "c": ["b"], "x": []})
    cycle = info.value.steps
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"} and len(cycle) == 4
    # each step depends on the one before it in the reported path
    graph = {"a": ["c"], "b": ["a"], "c": ["b"]}
    assert all(cycle[i] in graph[cycle[i + 1]] for i in range(3))


def test_group_dependencies_expand() -> None:
    wf = baton.Workflow("g")
    wf.add("root", noop.new())
    members = wf.add_fan_out("draft", noop.new(), models=["a/x-1", "b/x_1", "c"],
                             deps=["root"], synthesize_with=noop.new(), min_success=2)
    assert members == ["draft_x_1", "draft_x_1_2", "draft_c"]
    wf.add("after", noop.new(), deps=["draft"])
    assert wf.expand(["draft", "root"]) == [*members, "root"]
    assert wf.nodes["draft_synthesis"].min_success == 2
    assert wf.nodes["draft_x_1"].model == "a/x-1"
    order = wf.validate()
    assert order.index("root") < order.index("draft_c") < order.index("after")


def test_builder_errors() -> None:
    wf = baton.Workflow()
    with pytest.raises(baton.WorkflowError, match="twice"):
        wf.add("a", noop.new(), deps=["x", "x"])
    with pytest.raises(baton.WorkflowError, match=r"step\.new"):
        wf.add("a", "not a job")  # type: ignore[arg-type]
    with pytest.raises(baton.WorkflowError, match="at least one model"):
        wf.add_fan_out("f", noop.new(), models=[])
    with pytest.raises(baton.WorkflowError, match="min_success"):
        wf.add_fan_out("f", noop.new(), models=["a"], min_success=3)
    wf.add("self", noop.new(), deps=["self"])
    with pytest.raises(baton.CycleError):
        wf.validate()
    assert model_slug("openai/gpt-4o-mini") == "gpt_4o_mini" and model_slug("///") == "model"
    assert baton.Workflow(id="6f2bb767-df18-4abe-9000-000000000001").id.version == 4


def test_gate_decisions() -> None:
    done = Dep("a", "completed", has_result=True, result=1)
    cancelled = Dep("b", "cancelled")
    discarded = Dep("c", "discarded")
    waiting = Dep("d", None)
    pruned = Dep("e", None, exists=False)
    flags = {"ignore_cancelled": False, "ignore_discarded": False}
    assert decide([done], **flags).action == "run"
    assert decide([done, waiting], **flags).action == "wait"
    assert decide([done, cancelled], **flags).reason == "dependency 'b' was cancelled"
    assert decide([discarded], **flags).reason == "dependency 'c' was discarded"
    assert decide([cancelled], ignore_cancelled=True, ignore_discarded=False).action == "run"
    assert decide([discarded], ignore_cancelled=True, ignore_discarded=False).action == "cancel"
    lenient = decide([discarded], ignore_cancelled=False, ignore_discarded=True)
    assert lenient.action == "run" and [d.name for d in lenient.failed] == ["c"]
    assert decide([pruned], ignore_cancelled=True, ignore_discarded=True).action == "cancel"
    assert decide([done, cancelled], min_success=1, **flags).action == "run"
    assert "only 1 of 2" in decide([done, cancelled], min_success=2, **flags).reason


def test_gathered_results_leave_out_missing() -> None:
    deps = [Dep("a", "completed", has_result=True, result={"x": 1}),
            Dep("quiet", "completed"),
            Dep("g_m1", "completed", has_result=True, result="one", group="g", model="m1"),
            Dep("g_m2", "discarded", group="g", model="m2")]
    assert gather_results(["a", "quiet", "g"], deps) == {"a": {"x": 1}, "g": {"m1": "one"}}


def test_llm_step_preset() -> None:
    local = baton.Baton()

    async def ask() -> None: ...

    step = local.llm_step(name="unit.ask")(ask)
    assert isinstance(step, baton.Step)
    assert (step.options.queue, step.options.max_attempts, step.options.llm) == ("llm", 5, True)
    assert step.options.timeout == 300.0
