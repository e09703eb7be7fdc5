"""`baton job show|list` and the errors `baton workflow show` prints."""

from __future__ import annotations

import json

import anyio
import pytest

import baton
from baton.cli import main
from baton.testing import running_worker, wait_for_jobs, wait_for_workflow
from tests.apps import kept


def run_jobs(dsn: str) -> dict[str, int]:
    """Run a failing job, a job that keeps its result, one that does not, and leave one
    waiting in another queue; return their ids."""
    kept.app.dsn = dsn

    async def go() -> dict[str, int]:
        try:
            ids = {
                "failed": await kept.app.enqueue(kept.fails.new(message="boom")),
                "kept": await kept.app.enqueue(kept.summarize.new(text="cli shows this")),
                "plain": await kept.app.enqueue(kept.forgetful.new(x=4)),
            }
            async with running_worker(kept.app):
                await wait_for_jobs(kept.app, ids.values(), ["completed", "discarded"])
            ids["waiting"] = await kept.app.enqueue(
                kept.forgetful.new(x=5).options(queue="later", tags=["vip", "eu"]))
            return ids
        finally:
            await kept.app.close()

    return anyio.run(go)


def test_job_show_prints_every_error_with_its_traceback_and_the_result(
        dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = run_jobs(dsn)
    capsys.readouterr()  # the worker's log lines
    assert main(["job", "show", str(ids["failed"]), "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {ids['failed']}  discarded")
    assert "errors (2):" in out and out.count("RuntimeError: boom") >= 4  # entries, traces
    assert "- attempt 1 at" in out and "- attempt 2 at" in out
    assert "Traceback (most recent call last)" in out
    assert "flaky, team:data" in out and '{"message": "boom"}' in out
    assert "is discarded, not completed, so it has no result; retry it" in out

    assert main(["job", "show", str(ids["kept"]), "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    assert 'result     {"title": "cli", "words": 3}' in out  # jsonb's key order

    assert main(["job", "show", str(ids["failed"]), "--dsn", dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "discarded" and data["attempt"] == 2
    assert [e["attempt"] for e in data["errors"]] == [1, 2]
    assert all("Traceback" in e["traceback"] for e in data["errors"])
    assert data["result_kept"] is False and "discarded" in data["result_missing"]
    assert main(["job", "show", str(ids["kept"]), "--dsn", dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["result"] == {"words": 3, "title": "cli"} and data["tags"] == ["reports"]

    assert main(["job", "show", str(ids["waiting"]), "--dsn", dsn, "--json"]) == 0
    assert "available, not completed" in json.loads(capsys.readouterr().out)["result_missing"]
    assert main(["job", "show", "999999", "--dsn", dsn]) == 2
    assert "no job with id 999999" in capsys.readouterr().err


def test_job_list_filters_by_queue_state_step_and_tags(
        dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = run_jobs(dsn)
    capsys.readouterr()  # the worker's log lines

    def listed(*flags: str) -> list[int]:
        assert main(["job", "list", "--dsn", dsn, "--json", *flags]) == 0
        return [row["id"] for row in json.loads(capsys.readouterr().out)]

    assert listed() == sorted(ids.values(), reverse=True)  # newest first
    assert listed("--limit", "2") == sorted(ids.values(), reverse=True)[:2]
    assert listed("--queue", "later") == [ids["waiting"]]
    assert listed("--state", "discarded") == [ids["failed"]]
    assert listed("--step", kept.summarize.name) == [ids["kept"]]
    assert listed("--tag", "vip") == [ids["waiting"]]
    assert listed("--tag", "vip", "--tag", "eu") == [ids["waiting"]]
    assert listed("--tag", "vip", "--tag", "reports") == []
    assert listed("--tag", "team:data", "--state", "discarded") == [ids["failed"]]

    assert main(["job", "list", "--dsn", dsn, "--tag", "vip"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "state", "queue", "step", "attempt", "tags",
                                           "workflow", "inserted"]
    assert f"{ids['waiting']}" in out and "vip,eu" in out
    with pytest.raises(SystemExit):  # argparse refuses an unknown state
        main(["job", "list", "--dsn", dsn, "--state", "done"])


def test_workflow_show_prints_the_last_error_of_each_failed_step(
        dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    kept.app.dsn = dsn

    async def go() -> tuple[str, int]:
        try:
            wf = baton.Workflow("cli-errors")
            wf.add("ok", kept.forgetful.new(x=1))
            wf.add("broken", kept.fails.new(message="the disk is full"), deps=["ok"])
            wf.add("after", kept.forgetful.new(x=2), deps=["broken"])
            await kept.app.insert(wf)
            async with running_worker(kept.app):
                await wait_for_workflow(kept.app, wf.id)
            view = await kept.app.query.workflow(wf.id)
            return str(wf.id), next(s.job_id for s in view.steps if s.step_name == "broken")
        finally:
            await kept.app.close()

    workflow_id, broken = anyio.run(go)
    capsys.readouterr()
    assert main(["workflow", "show", workflow_id, "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    errors = out.split("last errors:\n")[1].splitlines()
    assert errors == ["  broken (discarded, attempt 2): RuntimeError: the disk is full",
                      "  after (cancelled, attempt 1): dependency 'broken' was discarded"]

    assert main(["job", "show", str(broken), "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    assert f"workflow   {workflow_id} step broken" in out
    assert "RuntimeError: the disk is full" in out
