"""The workflow builder, Kahn's algorithm and the runtime gate: pure logic."""

from __future__ import annotations

import pytest

import baton
from baton.dag import model_slug, topological_order
from baton.workflows.gate import Dep, Found, decide, gather_results

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
    done = Dep("a", "completed")
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
    # Given only the dependencies that did not complete, and how many there are in all.
    assert decide([cancelled], min_success=2, total=3, **flags).action == "run"
    assert "only 1 of 2" in decide([cancelled], min_success=2, total=2, **flags).reason


def test_gathered_results_leave_out_missing() -> None:
    found = {"a": Found("a", None, None, {"x": 1}), "g_m1": Found("g_m1", "g", "m1", "one")}
    members = {"g": [found["g_m1"]], "empty": []}
    gathered = gather_results(["a", "quiet", "g", "empty"], {"g", "empty"}, found.get, members)
    assert gathered == {"a": {"x": 1}, "g": {"m1": "one"}, "empty": {}}


def test_llm_step_preset() -> None:
    local = baton.Baton()

    async def ask() -> None: ...

    step = local.llm_step(name="unit.ask")(ask)
    assert isinstance(step, baton.Step)
    assert (step.options.queue, step.options.max_attempts, step.options.llm) == ("llm", 5, True)
    assert step.options.timeout == 300.0


@app.step(name="unit.ask", queue="llm", priority=3)
async def ask() -> None: ...


def _child() -> baton.Workflow:
    child = baton.Workflow("child", ignore_discarded=True)
    child.add("a", noop.new())
    child.add("b", noop.new(), deps=["a"], ignore_discarded=False)
    child.add_fan_out("d", noop.new(), models=["m1", "m2"], deps=["a"])
    child.add("c", ask.new(), deps=["a"])
    return child


def test_subworkflow_flattens_under_its_name() -> None:
    wf = baton.Workflow("parent", models={"research.c": "big"})
    wf.add("plan", noop.new())
    wf.add("research", _child(), deps=["plan"], ignore_cancelled=True, min_success=0)
    wf.add("after", noop.new(), deps=["research"])
    nodes = wf.nodes
    assert list(nodes) == ["plan", "research.a", "research.b", "research.d_m1",
                           "research.d_m2", "research.c", "research", "after"]
    root = nodes["research.a"]
    assert root.deps == ["plan"] and (root.ignore_cancelled, root.ignore_discarded) == (True, True)
    assert root.min_success == 0
    assert nodes["research.b"].deps == ["research.a"]
    # The child's workflow-level flags fill in, its steps' own flags stay.
    assert (nodes["research.b"].ignore_cancelled, nodes["research.b"].ignore_discarded) == (
        False, False)
    assert nodes["research.d_m1"].ignore_discarded is True
    assert wf.groups == {"research.d": ["research.d_m1", "research.d_m2"]}
    assert (nodes["research.d_m2"].group, nodes["research.d_m2"].model) == ("research.d", "m2")
    assert nodes["research.c"].model == "big"
    collector = nodes["research"]
    assert collector.job.step == "baton.subworkflow"
    assert collector.job.args == {"leaves": ["b", "d", "c"]}
    assert collector.deps == ["research.b", "research.d", "research.c"]
    assert (collector.ignore_cancelled, collector.ignore_discarded) == (False, False)
    order = wf.validate()
    assert order.index("plan") < order.index("research.a") < order.index("research.b")
    assert order.index("research.d_m2") < order.index("research") < order.index("after")


def test_subworkflow_collector_runs_where_its_child_ends() -> None:
    child = baton.Workflow("child", debug=True)
    child.add("only", ask.new())
    wf = baton.Workflow()
    wf.add("s", child)
    assert list(wf.nodes) == ["s.only", "s"] and wf.nodes["s.only"].deps == []
    job = wf.nodes["s"].job
    assert (job.queue, job.priority, job.args) == ("llm", 3, {"leaves": ["only"]})
    assert wf.debug is True


def test_nested_subworkflows_nest_prefixes() -> None:
    inner = baton.Workflow("inner")
    inner.add("x", noop.new()).add("y", noop.new(), deps=["x"])
    middle = baton.Workflow("middle")
    middle.add("m", noop.new()).add("b", inner, deps=["m"])
    wf = baton.Workflow("outer")
    wf.add("a", middle)
    assert list(wf.nodes) == ["a.m", "a.b.x", "a.b.y", "a.b", "a"]
    assert wf.nodes["a.b.x"].deps == ["a.m"] and wf.nodes["a.b"].deps == ["a.b.y"]
    assert wf.nodes["a"].deps == ["a.b"] and wf.nodes["a"].job.args == {"leaves": ["b"]}
    assert wf.nodes["a.b"].job.args == {"leaves": ["y"]}
    wf.validate()


def test_subworkflow_errors() -> None:
    wf = baton.Workflow("parent")
    with pytest.raises(baton.WorkflowError, match="itself"):
        wf.add("me", wf)
    with pytest.raises(baton.WorkflowError, match="at least one step"):
        wf.add("empty", baton.Workflow())
    broken = baton.Workflow()
    broken.add("a", noop.new(), deps=["missing"])
    with pytest.raises(baton.UnknownDependencyError):
        wf.add("broken", broken)
    with pytest.raises(baton.WorkflowError, match="model="):
        wf.add("modelled", _child(), model="m")
    wf.add("research.a", noop.new())
    with pytest.raises(baton.DuplicateStepError, match=r"research\.a"):
        wf.add("research", _child())
    assert "research" not in wf.nodes and "research.b" not in wf.nodes
    with pytest.raises(baton.WorkflowError, match="1-200"):
        wf.add("x" * 199, _child())
    child = _child()
    wf.add("r", child)
    with pytest.raises(baton.WorkflowError, match="already added as step 'r'"):
        wf.add("again", child)
    with pytest.raises(baton.WorkflowError, match="copied its steps"):
        child.add("late", noop.new())
    with pytest.raises(baton.WorkflowError, match="copied its steps"):
        child.add_fan_out("late", noop.new(), models=["m"])
    looped = baton.Workflow()
    looped.add("loop", _child(), deps=["loop"])
    with pytest.raises(baton.CycleError):
        looped.validate()
    unknown = baton.Workflow()
    unknown.add("s", _child(), deps=["nowhere"])
    with pytest.raises(baton.UnknownDependencyError, match="nowhere"):
        unknown.validate()


async def test_subworkflow_step_is_built_in() -> None:
    from baton.dag import SUBWORKFLOW_STEP, subworkflow_result

    local = baton.Baton()
    assert local.get_step(SUBWORKFLOW_STEP).name == "baton.subworkflow"
    with pytest.raises(baton.StepError, match="already registered"):
        local.step(name=SUBWORKFLOW_STEP)(noop.fn)
    ctx = baton.Context(job_id=1, attempt=1, max_attempts=1, queue="default", step="r",
                        args={}, results={"r.b": 2, "r.d": {"m1": "x"}})
    assert await subworkflow_result(ctx, ["b"]) == 2
    assert await subworkflow_result(ctx, ["b", "d", "quiet"]) == {
        "b": 2, "d": {"m1": "x"}, "quiet": None}
