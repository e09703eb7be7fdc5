"""The inspection CLI: status, workflow show/list/cost, job retry/cancel."""

from __future__ import annotations

import json
from decimal import Decimal

import anyio
import pytest

import baton
from baton.cli import main
from baton.pricing import ModelPrice, Pricing
from baton.testing import running_worker, wait_for_workflow
from tests.apps import flows


def run_workflow(dsn: str) -> str:
    flows.app.dsn = dsn
    flows.app.pricing = Pricing(models={"model-a": ModelPrice(input=Decimal(1),
                                                              output=Decimal(1))})

    async def go() -> str:
        try:
            wf = baton.Workflow("cli-demo")
            wf.add("ask", flows.ask_llm.new(prompt="q"))
            wf.add_fan_out("draft", flows.draft.new(topic="t"), models=["m1", "bad"],
                           deps=["ask"], synthesize_with=flows.synthesize.new(),
                           min_success=1, strict=True)
            workflow_id = await flows.app.insert(wf)
            async with running_worker(flows.app):
                await wait_for_workflow(flows.app, workflow_id)
            return str(workflow_id)
        finally:
            flows.app.pricing = Pricing()
            await flows.app.close()

    return anyio.run(go)


def test_workflow_views(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    workflow_id = run_workflow(dsn)
    assert main(["workflow", "show", workflow_id, "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    assert "workflow cli-demo" in out and "failed: draft_bad" in out
    lines = {line.split()[1]: line for line in out.splitlines()
             if line.strip() and line.strip()[0] in "✓✗⊘"}
    assert set(lines) == {"ask", "draft_m1", "draft_bad", "draft_synthesis"}
    assert lines["draft_synthesis"].startswith("    ✓")  # depth 2: indented twice
    assert "← draft" in lines["draft_synthesis"] and "0.0012" in lines["ask"]

    assert main(["workflow", "show", workflow_id, "--dsn", dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "failed" and len(data["steps"]) == 4

    assert main(["workflow", "cost", workflow_id, "--dsn", dsn, "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert Decimal(cost["total_cost"]) == Decimal("0.0012")
    assert {(line["step_name"], line["model"]) for line in cost["lines"]} == {
        ("ask", "model-a"), ("ask", "mystery-model")}
    assert main(["workflow", "cost", workflow_id, "--dsn", dsn]) == 0
    assert "total: 0.0012" in capsys.readouterr().out

    assert main(["workflow", "list", "--dsn", dsn, "--state", "failed", "--json"]) == 0
    assert [w["id"] for w in json.loads(capsys.readouterr().out)] == [workflow_id]


def test_status_and_job_commands(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    app = baton.Baton(dsn)
    try:
        job_id = app.enqueue_sync(flows.noop.new())
        later = app.enqueue_sync(flows.noop.new().options(queue="slow", schedule_in=600))
    finally:
        app.close_sync()
    assert main(["status", "--dsn", dsn, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    counts = {q["queue"]: q["counts"] for q in status["queues"]}
    assert counts == {"default": {"available": 1}, "slow": {"scheduled": 1}}
    assert status["workers"] == []
    assert main(["status", "--dsn", dsn]) == 0
    assert "oldest available" in capsys.readouterr().out

    assert main(["job", "cancel", str(later), "--dsn", dsn]) == 0
    assert f"job {later} cancelled" in capsys.readouterr().out
    assert main(["job", "cancel", str(later), "--dsn", dsn]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["job", "retry", str(later), "--dsn", dsn, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"job_id": later, "changed": True}
    assert main(["job", "retry", "999999", "--dsn", dsn]) == 2
    assert "no job with id 999999" in capsys.readouterr().err
    assert job_id
