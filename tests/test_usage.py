"""LLM usage: step stats and cost from the price table, the reserved key, capture."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

import baton
from baton.pricing import ModelPrice, Pricing, Usage, split_usage
from baton.testing import running_worker, wait_for_workflow
from tests.apps import flows
from tests.helpers import sql_rows

PRICES = Pricing(models={
    "model-a": ModelPrice(input=Decimal(3), output=Decimal(15), cached_input=Decimal("0.3")),
    "model-b": ModelPrice(input=Decimal("0.5"), output=Decimal(2)),
})


@pytest.fixture
def app(flows_app: baton.Baton) -> baton.Baton:
    flows_app.pricing = PRICES  # put back by the fixture
    return flows_app


def test_cost_follows_the_price_table() -> None:
    usage = Usage(model="model-a", input_tokens=1000, output_tokens=200, cached_tokens=400)
    # 600 uncached * 3 + 400 cached * 0.3 + 200 out * 15, per million tokens
    assert PRICES.cost(usage) == Decimal("0.00492")
    assert PRICES.cost(Usage(model="unknown", input_tokens=5)) is None


def test_reserved_key_is_stripped() -> None:
    result, usage = split_usage({"a": 1, "__usage__": [{"model": "m", "input_tokens": 3}]})
    assert result == {"a": 1} and usage == [Usage(model="m", input_tokens=3)]
    assert split_usage("plain") == ("plain", [])
    result, usage = split_usage({"__usage__": {"input_tokens": -1}})
    assert result == {} and usage == []  # malformed usage is dropped, not fatal


async def test_usage_is_recorded_and_priced(app: baton.Baton) -> None:
    wf = baton.Workflow("llm", debug=True)
    wf.add("ask", flows.ask_llm.new(prompt="why?"))
    wf.add("use", flows.after_llm.new(), deps=["ask"])
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, workflow_id)
    # downstream never sees the reserved key
    assert await app.result(workflow_id, "use") == {"answer": "re: why?"}
    report = await app.query.cost(workflow_id)
    lines = {(line.step_name, line.model): line for line in report.lines}
    assert set(lines) == {("ask", "model-a"), ("ask", "mystery-model")}
    assert lines[("ask", "model-a")].cost == Decimal("0.00492")
    assert lines[("ask", "mystery-model")].cost is None
    assert lines[("ask", "mystery-model")].unpriced == 1
    assert report.total_cost == Decimal("0.00492") and report.total_tokens == 1215
    since = datetime.now(UTC) - timedelta(hours=1)
    by_model = await app.query.cost_by_model(since, datetime.now(UTC) + timedelta(hours=1))
    assert [(m.model, m.calls) for m in by_model] == [("model-a", 1), ("mystery-model", 1)]
    [(request, response, context, extra)] = sql_rows(
        app.dsn, "SELECT request, response, context, extra FROM baton.debug_logs")
    assert (request, response, extra) == ("why?", "an answer", {"temperature": 0.2})
    assert context is None  # the first step had no upstream context


async def test_failed_attempt_still_records_usage(app: baton.Baton) -> None:
    job_id = await app.enqueue(flows.paid_then_fails.new())
    async with running_worker(app):
        from baton.testing import wait_for_job

        await wait_for_job(app, job_id, "discarded")
    rows = sql_rows(app.dsn, "SELECT step_name, model, cost, workflow_id FROM baton.step_stats")
    assert rows == [(flows.paid_then_fails.name, "model-b", Decimal("1.00000000"), None)]
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.debug_logs") == [(1,)]


async def test_capture_is_off_by_default(app: baton.Baton) -> None:
    wf = baton.Workflow("quiet").add("ask", flows.ask_llm.new(prompt="x"))
    workflow_id = await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, workflow_id)
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.debug_logs") == [(0,)]
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.step_stats") == [(2,)]
