"""Cost budgets: a workflow (or a group of its steps) stops starting steps once the usage
its steps recorded reaches its budget; the running ones finish."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import pytest

import baton
from baton.events import StepUpdated, WorkflowFinished
from baton.pricing import ModelPrice, Pricing
from baton.testing import running_worker, wait_for_workflow
from baton.workflows.announce import finished_payload
from baton.workflows.budgets import rows as budget_rows
from tests.conftest import bound
from tests.helpers import sql_rows

STEP_USD = Decimal("0.1")
PRICES = Pricing(models={"m": ModelPrice(input=Decimal(1), output=Decimal(0))})
"""At $1 per million input tokens, 100,000 tokens cost STEP_USD."""

app = baton.Baton()
release = anyio.Event()


@app.step(max_attempts=1)
async def paid(ctx: baton.Context) -> str:
    ctx.record_usage(model="m", input_tokens=100_000)
    return ctx.step


@app.step(queue="slow", max_attempts=1)
async def slow_paid(ctx: baton.Context) -> str:
    await release.wait()
    ctx.record_usage(model="m", input_tokens=100_000)
    return "finished"


@app.step(queue="slow", max_attempts=3)
async def slow_paid_fails(ctx: baton.Context) -> None:
    await release.wait()
    ctx.record_usage(model="m", input_tokens=100_000)
    raise RuntimeError("provider error")


@app.step(max_attempts=1)
async def free() -> str:
    return "free"


@app.step(max_attempts=1)
async def unpriced(ctx: baton.Context) -> None:
    ctx.record_usage(model="mystery", input_tokens=10**9)


@app.step
async def gather(ctx: baton.Context) -> dict[str, Any]:
    return {"got": sorted(ctx.results.get("draft", {})), "failed": ctx.failed_deps}


@pytest.fixture
async def budget_app(dsn: str) -> AsyncIterator[baton.Baton]:
    global release
    release = anyio.Event()
    async with bound(app, dsn) as bound_app:
        bound_app.pricing = PRICES
        try:
            yield bound_app
        finally:
            release.set()


ONE_AT_A_TIME: dict[str, Any] = {"queues": {"default": 1}, "max_pending_outcomes": 1}
"""One slot, and no claim while an outcome is unwritten: when the write that reaches a
budget commits, at most one more step of the queue is claimed (the one claimed ahead)."""


async def run_collecting(a: baton.Baton, wf: baton.Workflow, **settings: Any
                         ) -> tuple[list[StepUpdated], WorkflowFinished]:
    async with a.events.subscribe(wf.id) as events:
        await a.insert(wf)
        async with running_worker(a, **settings):
            steps: list[StepUpdated] = []
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, WorkflowFinished):
                        return steps, event
                    assert isinstance(event, StepUpdated)
                    steps.append(event)
    raise AssertionError("no workflow_finished")


def states(dsn: str, workflow_id: uuid.UUID) -> dict[str, tuple[str, str | None]]:
    rows = sql_rows(dsn, "SELECT workflow_step, state, errors -> -1 ->> 'error' FROM baton.jobs "
                         "WHERE workflow_id = %s", (workflow_id,))
    return {name: (state, error) for name, state, error in rows}


async def test_a_budget_worth_three_steps_stops_the_fan_out(budget_app: baton.Baton) -> None:
    wf = baton.Workflow("fan", budget_usd=0.3)
    names = [f"s{i}" for i in range(10)]
    for name in names:
        wf.add(name, paid.new())
    wf.add("total", free.new(), deps=names)
    steps, finished = await run_collecting(budget_app, wf, **ONE_AT_A_TIME)

    found = states(budget_app.dsn, wf.id)
    ran = sorted(n for n, (state, _) in found.items() if state == "completed")
    stopped = sorted(n for n, (state, _) in found.items() if state == "cancelled")
    # Reached at the third step's write; only the step claimed ahead of it may still run.
    assert 3 <= len(ran) <= 4, found
    assert sorted(ran + stopped) == sorted([*names, "total"])
    for name in stopped:
        error = found[name][1] or ""
        assert error.startswith("budget_exceeded: the workflow spent $"), error
    spent = STEP_USD * len(ran)
    assert finished.outcome == "failed" and finished.reason == "budget_exceeded"
    assert finished.spent_usd == float(spent)
    assert sorted(finished.failed_steps) == stopped
    cancelled = {e.step_name for e in steps if e.state == "cancelled"}
    assert cancelled == set(stopped)  # every stopped step was announced
    assert all(e.error and e.error.startswith("budget_exceeded") for e in steps
               if e.state == "cancelled")
    [budget] = await budget_app.budgets(wf.id)
    assert (budget.scope, budget.budget_usd, budget.spent_usd) == ("", Decimal("0.3"), spent)
    assert budget.exceeded_at is not None
    report = await budget_app.query.cost(wf.id)
    assert report.total_cost == spent


async def test_running_steps_finish_after_the_budget_is_reached(
        budget_app: baton.Baton) -> None:
    wf = baton.Workflow("slow", budget_usd=0.2)
    wf.add("slow", slow_paid.new())
    for i in range(5):
        wf.add(f"s{i}", paid.new())
    async with budget_app.events.subscribe(wf.id) as events:
        await budget_app.insert(wf)
        # The slow step starts first, on its own queue, and waits.
        async with running_worker(budget_app, queues={"slow": 1}):
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, StepUpdated) and event.step_name == "slow":
                        assert event.state == "executing"
                        break
            async with running_worker(budget_app, **ONE_AT_A_TIME):
                with anyio.fail_after(30):
                    async for event in events:
                        if isinstance(event, StepUpdated) and event.state == "cancelled":
                            break  # the budget is reached: the rest were stopped
                assert not isinstance(event, WorkflowFinished)
                with pytest.raises(baton.BudgetExceededError):  # a spent budget does not grow
                    await budget_app.append(wf.id, baton.Workflow().add("late", free.new()))
                release.set()
                with anyio.fail_after(30):
                    async for event in events:
                        if isinstance(event, WorkflowFinished):
                            break
    found = states(budget_app.dsn, wf.id)
    assert found["slow"] == ("completed", None)  # it was running: it finished
    ran = [n for n, (state, _) in found.items() if state == "completed" and n != "slow"]
    assert 2 <= len(ran) <= 3
    assert isinstance(event, WorkflowFinished) and event.reason == "budget_exceeded"
    assert event.spent_usd == float(STEP_USD * (len(ran) + 1))  # the slow step's cost too


async def test_a_group_budget_stops_only_its_group(budget_app: baton.Baton) -> None:
    wf = baton.Workflow("essay")
    wf.add("intro", paid.new())
    wf.add_fan_out("draft", paid.new(), models=[f"vendor/m{i}" for i in range(6)],
                   deps=["intro"], budget_usd=0.2, synthesize_with=gather.new(),
                   min_success=2)
    wf.add("outro", paid.new(), deps=["draft_synthesis"])
    _, finished = await run_collecting(budget_app, wf, **ONE_AT_A_TIME)

    found = states(budget_app.dsn, wf.id)
    copies = [n for n in found if n.startswith("draft_m")]
    ran = sorted(n for n in copies if found[n][0] == "completed")
    assert 2 <= len(ran) <= 3
    for name in set(copies) - set(ran):
        assert found[name][0] == "cancelled"
        assert (found[name][1] or "").startswith("budget_exceeded: 'draft' spent $"), found[name]
    # Outside the group, steps run on; the synthesis had its quorum.
    assert found["intro"][0] == found["outro"][0] == "completed"
    result = await budget_app.result(wf.id, "draft_synthesis")
    assert len(result["got"]) == len(ran)
    assert finished.outcome == "completed" and finished.reason == "budget_exceeded"
    assert finished.spent_usd == float(STEP_USD * (len(ran) + 2))
    budgets = {b.scope: b for b in await budget_app.budgets(wf.id)}
    assert set(budgets) == {"draft"} and budgets["draft"].spent_usd == STEP_USD * len(ran)


async def test_a_workflow_without_a_budget_is_unaffected(budget_app: baton.Baton) -> None:
    seen: list[WorkflowFinished] = []
    budget_app.on("workflow_finished", seen.append)
    wf = baton.Workflow("plain")
    for i in range(6):
        wf.add(f"s{i}", paid.new())
    wf.add("odd", unpriced.new())
    _, finished = await run_collecting(budget_app, wf)
    assert finished.outcome == "completed"
    assert finished.reason is None and finished.spent_usd is None
    assert [(e.reason, e.spent_usd) for e in seen] == [(None, None)]
    # Its payload is today's: neither key is there.
    row = {"id": wf.id, "label": "plain", "state": "completed", "failed_steps": [], "run": 1,
           "total_steps": 7, "settled_steps": 7, "finished_at": "2026-01-01T00:00:00+00:00",
           "stop_reason": None, "spent_usd": None}
    assert not {"reason", "spent_usd"} & set(finished_payload(row))
    assert finished_payload({**row, "stop_reason": "budget_exceeded",
                             "spent_usd": Decimal("0.25")})["spent_usd"] == 0.25
    assert sql_rows(budget_app.dsn, "SELECT spent_usd, stop_reason FROM baton.workflows") == [
        (None, None)]
    assert sql_rows(budget_app.dsn, "SELECT count(*) FROM baton.budgets") == [(0,)]
    assert await budget_app.budgets(wf.id) == []


async def test_unpriced_usage_counts_nothing(budget_app: baton.Baton) -> None:
    wf = baton.Workflow("mystery", budget_usd=0.05)
    wf.add("a", unpriced.new())
    wf.add("b", free.new(), deps=["a"])
    _, finished = await run_collecting(budget_app, wf)
    assert finished.outcome == "completed" and finished.reason is None
    assert finished.spent_usd == 0.0


async def test_a_spent_budget_must_be_raised_before_a_resume(budget_app: baton.Baton) -> None:
    wf = baton.Workflow("again", budget_usd=0.1)
    for i in range(4):
        wf.add(f"s{i}", paid.new())
    _, first = await run_collecting(budget_app, wf, **ONE_AT_A_TIME)
    assert first.reason == "budget_exceeded"
    with pytest.raises(baton.BudgetExceededError) as caught:
        await budget_app.resume(wf.id)
    assert caught.value.scope == "" and caught.value.budget == Decimal("0.1")
    assert "app.set_budget" in str(caught.value)
    assert (await budget_app.get_workflow(wf.id)).state == "failed"  # nothing changed

    budget = await budget_app.set_budget(wf.id, 1)
    assert budget.exceeded_at is None and float(budget.spent_usd) == first.spent_usd
    async with budget_app.events.subscribe(wf.id) as events:
        assert await budget_app.resume(wf.id)
        async with running_worker(budget_app, **ONE_AT_A_TIME):
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, WorkflowFinished) and event.run == 2:
                        break
    assert event.outcome == "completed" and event.reason is None
    assert event.spent_usd == float(STEP_USD * 4)


async def test_set_budget_checks_what_it_is_given(budget_app: baton.Baton) -> None:
    other = baton.Workflow("held", budget_usd=5)
    other.add("a", free.new())
    other.add("b", free.new(), deps=["a"])
    await budget_app.insert(other)
    budget = await budget_app.set_budget(other.id, 0.01)  # nothing spent: it has room
    assert budget.exceeded_at is None and budget.spent_usd == 0
    with pytest.raises(baton.WorkflowError, match="no fan-out group or sub-workflow"):
        await budget_app.set_budget(other.id, 1, group="nope")
    with pytest.raises(baton.WorkflowNotFound):
        await budget_app.set_budget(uuid.uuid4(), 1)
    with pytest.raises(baton.WorkflowError, match="positive number"):
        await budget_app.set_budget(other.id, -1)


async def test_set_budget_at_the_spending_cancels_waiting_steps(
        budget_app: baton.Baton) -> None:
    wf = baton.Workflow("capped")
    wf.add("a", paid.new())
    wf.add("b", slow_paid.new(), deps=["a"])
    wf.add("c", free.new(), deps=["b"])
    async with budget_app.events.subscribe(wf.id) as events:
        await budget_app.insert(wf)
        async with running_worker(budget_app, queues={"default": 1}):
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, StepUpdated) and event.step_name == "a" and \
                            event.state == "completed":
                        break
            budget = await budget_app.set_budget(wf.id, 0.1)
            assert budget.exceeded_at is not None and budget.spent_usd == STEP_USD
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, WorkflowFinished):
                        break
    assert isinstance(event, WorkflowFinished) and event.reason == "budget_exceeded"
    found = states(budget_app.dsn, wf.id)
    assert found["b"][0] == found["c"][0] == "cancelled"
    assert (found["b"][1] or "").startswith("budget_exceeded")


def test_bad_budgets_raise_clear_errors() -> None:
    for bad in (0, -1, "2", float("nan"), float("inf"), True, 10**12, 1e-12):
        with pytest.raises(baton.WorkflowError, match="budget of workflow 'x' must be a "
                                                     "positive number of US dollars"):
            baton.Workflow("x", budget_usd=bad)  # type: ignore[arg-type]
    wf = baton.Workflow("x")
    with pytest.raises(baton.WorkflowError, match="no fan-out group or sub-workflow named"):
        wf.budget("draft", 1)
    wf.add("solo", free.new())
    with pytest.raises(baton.WorkflowError, match="no fan-out group or sub-workflow named"):
        wf.budget("solo", 1)
    with pytest.raises(baton.WorkflowError, match="budget of fan-out 'draft'"):
        wf.add_fan_out("draft", paid.new(), models=["a", "b"], budget_usd=-2)
    assert "draft" not in wf.groups  # nothing was added
    wf.add_fan_out("draft", paid.new(), models=["a", "b"])
    with pytest.raises(baton.WorkflowError, match="budget of 'draft'"):
        wf.budget("draft", 0)
    assert wf.budget("draft", 0.5).budgets == {"draft": Decimal("0.5")}
    wf.budget_usd = -1  # set after construction: checked when it is inserted
    with pytest.raises(baton.WorkflowError, match="budget of workflow 'x'"):
        budget_rows(wf)


def test_budgets_of_a_sub_workflow_move_into_its_parent() -> None:
    child = baton.Workflow("research", budget_usd=1.5)
    child.add_fan_out("ask", paid.new(), models=["a", "b"], budget_usd=0.25)
    parent = baton.Workflow("report", budget_usd=3)
    parent.add("plan", free.new())
    parent.add("research", child, deps=["plan"])
    assert parent.budget_usd == Decimal(3)
    assert parent.budgets == {"research.ask": Decimal("0.25"), "research": Decimal("1.5")}
    parent.budget("research", 2)  # a sub-workflow can be budgeted by its name too
    assert parent.budgets["research"] == Decimal(2)


async def test_a_sub_workflow_budget_limits_its_steps(budget_app: baton.Baton) -> None:
    child = baton.Workflow("research", budget_usd=0.1)
    for i in range(4):
        child.add(f"q{i}", paid.new())
    wf = baton.Workflow("report")
    wf.add("plan", paid.new())
    wf.add("research", child, deps=["plan"])
    wf.add("write", free.new(), deps=["research"], ignore_cancelled=True)
    _, finished = await run_collecting(budget_app, wf, **ONE_AT_A_TIME)
    found = states(budget_app.dsn, wf.id)
    inside = [n for n in found if n.startswith("research.")]
    ran = [n for n in inside if found[n][0] == "completed"]
    assert 1 <= len(ran) <= 2
    assert found["plan"][0] == found["write"][0] == "completed"
    assert found["research"][0] == "cancelled"  # its dependencies were stopped
    assert finished.reason == "budget_exceeded" and finished.outcome == "failed"


async def test_appended_steps_take_group_budgets(budget_app: baton.Baton) -> None:
    wf = baton.Workflow("grow")
    wf.add("a", free.new())
    await budget_app.insert(wf)
    more = baton.Workflow()
    more.add_fan_out("extra", paid.new(), models=["x", "y"], deps=["a"], budget_usd=0.3)
    await budget_app.append(wf.id, more)
    assert [(b.scope, b.budget_usd) for b in await budget_app.budgets(wf.id)] == [
        ("extra", Decimal("0.3"))]
    with pytest.raises(baton.WorkflowError, match="take its budget"):
        await budget_app.append(wf.id, baton.Workflow(budget_usd=1).add("z", free.new(),
                                                                         deps=["a"]))


async def test_a_step_failing_after_the_budget_is_reached_is_not_retried(
        budget_app: baton.Baton) -> None:
    wf = baton.Workflow("flaky", budget_usd=0.1)
    wf.add("flaky", slow_paid_fails.new())
    wf.add("a", paid.new())
    wf.add("b", paid.new(), deps=["a"])
    async with budget_app.events.subscribe(wf.id) as events:
        await budget_app.insert(wf)
        async with running_worker(budget_app, queues={"slow": 1}):
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, StepUpdated) and event.step_name == "flaky":
                        break  # running, and waiting
            async with running_worker(budget_app, **ONE_AT_A_TIME):
                with anyio.fail_after(30):
                    async for event in events:
                        if isinstance(event, StepUpdated) and event.step_name == "b":
                            assert event.state == "cancelled"
                            break
                release.set()
                with anyio.fail_after(30):
                    flaky = [e async for e in _until_finished(events)]
    # Its attempt failed after the budget was reached: the retry is stopped, not run.
    assert [(e.state, e.attempt) for e in flaky if isinstance(e, StepUpdated)] == [
        ("retryable", 1), ("cancelled", 1)]
    finished = flaky[-1]
    assert isinstance(finished, WorkflowFinished) and finished.outcome == "failed"
    assert finished.spent_usd == float(STEP_USD * 2)  # the failed attempt was paid
    found = states(budget_app.dsn, wf.id)
    assert found["flaky"][0] == "cancelled" and (found["flaky"][1] or "").startswith(
        "budget_exceeded")
    assert sql_rows(budget_app.dsn, "SELECT attempt FROM baton.jobs WHERE workflow_step = "
                                    "'flaky'") == [(1,)]


async def _until_finished(events: Any) -> AsyncIterator[Any]:
    async for event in events:
        yield event
        if isinstance(event, WorkflowFinished):
            return


def test_templates_carry_budgets() -> None:
    wf = app.workflow_from_template({
        "label": "from-data", "budget_usd": 2,
        "steps": [{"name": "ask", "step": paid.name, "models": ["a", "b"], "budget_usd": 0.5},
                  {"name": "end", "step": free.name, "deps": ["ask"]}],
    })
    assert wf.budget_usd == Decimal(2) and wf.budgets == {"ask": Decimal("0.5")}
    with pytest.raises(baton.WorkflowError, match="budget_usd is for a fan-out group"):
        app.workflow_from_template({"steps": [{"name": "x", "step": free.name,
                                               "budget_usd": 1}]})
    with pytest.raises(baton.WorkflowError, match="positive number"):
        app.workflow_from_template({"budget_usd": -1, "steps": [{"name": "x",
                                                                 "step": free.name}]})


async def test_two_busy_workers_stop_a_wide_fan_out_once(budget_app: baton.Baton) -> None:
    finishes: list[WorkflowFinished] = []
    budget_app.on("workflow_finished", finishes.append)
    wf = baton.Workflow("wide", budget_usd=0.5)
    names = [f"s{i}" for i in range(80)]
    for name in names:
        wf.add(name, paid.new())
    wf.add("total", free.new(), deps=names)
    await budget_app.insert(wf)
    async with running_worker(budget_app, queues={"default": 8}), \
            running_worker(budget_app, queues={"default": 8}):
        info = await wait_for_workflow(budget_app, wf.id)
    assert info.state == "failed"
    found = states(budget_app.dsn, wf.id)
    ran = [n for n, (state, _) in found.items() if state == "completed"]
    stopped = [n for n, (state, _) in found.items() if state == "cancelled"]
    assert len(ran) + len(stopped) == len(names) + 1 and len(ran) >= 5
    assert all((found[n][1] or "").startswith("budget_exceeded") for n in stopped)
    spent = STEP_USD * len(ran)
    [budget] = await budget_app.budgets(wf.id)
    assert budget.spent_usd == spent and budget.exceeded_at is not None
    # Exactly one workflow_finished, whichever worker's write finished it.
    assert [(f.workflow_id, f.reason, f.spent_usd) for f in finishes] == [
        (wf.id, "budget_exceeded", float(spent))]
    assert sql_rows(budget_app.dsn, "SELECT count(*) FROM baton.completions") == [
        (len(names) + 1,)]
