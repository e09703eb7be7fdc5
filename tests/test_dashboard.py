"""The dashboard over HTTP: pages, actions, the token, cross-site refusal and escaping."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import baton
from baton.dashboard import create_app
from baton.testing import running_worker, wait_for_job, wait_for_workflow
from tests.apps import dash
from tests.conftest import bound

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "<img src=x onerror=window.__pwned=1>"


class _Server(uvicorn.Server):
    """uvicorn, telling the test when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def serving(web: Any) -> Iterator[str]:
    """Serve ``web`` on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(web, log_level="warning", lifespan="on",
                                    timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(30), "the dashboard did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    dash.reset()
    async with bound(dash.app, dsn) as bound_app:
        bound_app.pricing = dash.PRICING  # bound() leaves an app unpriced after each test
        yield bound_app
    dash.reset()


def client(web: object, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=web, client=(host, 50000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def test_pages_render(app: baton.Baton) -> None:
    wf = baton.Workflow("render")
    wf.add("a", dash.work.new(item="a"))
    wf.add("b", dash.explode.new(reason="no luck"), deps=["a"])
    wf.add_fan_out("ask", dash.ask.new(question="why?"), models=["small", "other"], deps=["a"])
    await app.insert(wf)
    async with running_worker(app):
        await wait_for_workflow(app, wf.id)
    async with client(create_app(app)) as http:
        for path in ["/", "/jobs", "/jobs?state=discarded", "/workflows",
                     "/workflows?state=finished", f"/workflows/{wf.id}",
                     f"/workflows/{wf.id}/steps/b", f"/workflows/{wf.id}/steps/ask_small"]:
            page = await http.get(path)
            assert page.status_code == 200, (path, page.text)
        view = await app.query.workflow(wf.id)
        failed = next(s for s in view.steps if s.step_name == "b")
        page = await http.get(f"/jobs/{failed.job_id}")
        assert "RuntimeError: no luck" in page.text and "Traceback" in page.text
        page = await http.get(f"/workflows/{wf.id}/steps/ask_small")
        assert "0.0006" in page.text and "why?" in page.text
        page = await http.get(f"/workflows/{wf.id}")
        assert 'cost <span class="cost">0.00060000</span>' in page.text
        assert "unpriced" in page.text  # the step whose model has no price
        for missing in ("/jobs/999999", f"/jobs/{2**64}", f"/workflows/{uuid.uuid4()}",
                        "/workflows/not-a-uuid", f"/workflows/{wf.id}/steps/nope"):
            assert (await http.get(missing)).status_code == 404, missing
        for bad in ("/jobs?state=lost", "/workflows?state=lost", "/jobs?before=x"):
            assert (await http.get(bad)).status_code == 400, bad


async def test_metrics_are_served(app: baton.Baton) -> None:
    await app.enqueue(dash.work.new(item="x"))
    async with client(create_app(app)) as http:
        scraped = await http.get("/metrics")
    assert scraped.status_code == 200
    assert "baton_" in scraped.text


async def test_a_token_is_required_and_sets_a_session(app: baton.Baton) -> None:
    web = create_app(app, token="correct-horse")
    async with client(web, host="10.1.2.3") as http:
        assert (await http.get("/")).status_code == 401
        login = await http.get("/", headers={"accept": "text/html"})
        assert login.status_code == 401 and 'name="token"' in login.text
        wrong = await http.get("/jobs?token=not-it")
        assert wrong.status_code == 401 and "Wrong token" in wrong.text
        assert (await http.get("/", headers={"authorization": "Bearer not-it"})
                ).status_code == 401
        bearer = await http.get("/", headers={"authorization": "Bearer correct-horse"})
        assert bearer.status_code == 200
        visit = await http.get("/jobs?state=available&token=correct-horse")
        assert visit.status_code == 303
        assert visit.headers["location"] == "/jobs?state=available"  # the token leaves the URL
        assert "correct-horse" not in visit.headers["set-cookie"]
        assert "HttpOnly" in visit.headers["set-cookie"]
        assert (await http.get("/jobs?state=available")).status_code == 200  # the cookie
    with pytest.raises(ValueError, match="8 characters"):
        create_app(app, token="short")


async def test_without_a_token_only_this_machine_is_served(app: baton.Baton) -> None:
    web = create_app(app)
    async with client(web, host="10.1.2.3") as http:
        refused = await http.get("/")
        assert refused.status_code == 403 and "--token" in refused.text
    async with client(web) as http:
        assert (await http.get("/")).status_code == 200
        # A page of another site that rebinds its name to 127.0.0.1 names its own host.
        rebound = await http.get("/", headers={"host": "evil.example:8484"})
        assert rebound.status_code == 403
    hooked = create_app(app, auth=lambda request: request.headers.get("x-user") == "ada")
    async with client(hooked, host="10.1.2.3") as http:
        assert (await http.get("/")).status_code == 403
        assert (await http.get("/", headers={"x-user": "ada"})).status_code == 200

    async def slow_hook(request: object) -> bool:
        return True

    async with client(create_app(app, auth=slow_hook), host="10.1.2.3") as http:
        assert (await http.get("/")).status_code == 200


async def test_actions_refuse_cross_site_requests(app: baton.Baton) -> None:
    failed = await app.enqueue(dash.explode.new())
    async with running_worker(app):
        await wait_for_job(app, failed, "discarded")
    async with client(create_app(app)) as http:
        page = await http.get(f"/jobs/{failed}")
        token = csrf_of(page)
        assert http.cookies["baton_csrf"] == token
        form = {"csrf": token}
        assert (await http.get(f"/jobs/{failed}/retry")).status_code == 405
        assert (await http.post(f"/jobs/{failed}/retry")).status_code == 403
        assert (await http.post(f"/jobs/{failed}/retry", data={"csrf": "guess"})
                ).status_code == 403
        evil = await http.post(f"/jobs/{failed}/retry", data=form,
                               headers={"origin": "http://evil.example"})
        assert evil.status_code == 403
        sneaky = await http.post(f"/jobs/{failed}/retry", data=form,
                                 headers={"sec-fetch-site": "cross-site"})
        assert sneaky.status_code == 403
        http.cookies.clear()  # another site's form cannot send our cookie (SameSite=Strict)
        assert (await http.post(f"/jobs/{failed}/retry", data=form)).status_code == 403
        assert (await app.get_job(failed)).state == "discarded"
        http.cookies.set("baton_csrf", token)
        done = await http.post(f"/jobs/{failed}/retry", data=form,
                               headers={"origin": "http://127.0.0.1"})
        assert done.status_code == 303 and done.headers["location"].endswith("notice=retried")
        assert (await app.get_job(failed)).state == "available"


async def test_user_data_is_escaped(app: baton.Baton) -> None:
    wf = baton.Workflow(HOSTILE)
    wf.add("only", dash.explode.new(reason=HOSTILE))
    await app.insert(wf)
    job = await app.enqueue(dash.work.new(item=HOSTILE).options(tags=["t"]))
    async with running_worker(app):
        await wait_for_workflow(app, wf.id)
        await wait_for_job(app, job, "completed")
    async with client(create_app(app)) as http:
        pages = [await http.get(path) for path in (
            f"/workflows/{wf.id}", "/workflows?state=failed", "/jobs", f"/jobs/{job}",
            f"/workflows/{wf.id}/steps/only", f"/jobs?step={HOSTILE}")]
    for page in pages:
        assert page.status_code == 200
        assert "<img" not in page.text
        assert "&lt;img src=x onerror=window.__pwned=1&gt;" in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert page.headers["x-frame-options"] == "DENY"


async def test_mounted_in_another_app(app: baton.Baton) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def theirs(request: object) -> PlainTextResponse:
        return PlainTextResponse("the host app's own page")

    outer = Starlette(routes=[  # routes named as the dashboard's: its links must not use them
        Route("/jobs", theirs, name="jobs"), Route("/", theirs, name="overview"),
        Mount("/ops/baton", create_app(app, token="correct-horse"))])
    async with client(outer) as http:
        visit = await http.get("/ops/baton/?token=correct-horse")
        assert visit.status_code == 303 and visit.headers["location"] == "/ops/baton/"
        assert "Path=/ops/baton/" in visit.headers["set-cookie"]
        page = await http.get("/ops/baton/")
        assert page.status_code == 200
        assert 'href="/ops/baton/jobs"' in page.text and 'href="/ops/baton/"' in page.text
        assert 'src="/ops/baton/static/dashboard.js"' in page.text
        script = await http.get("/ops/baton/static/dashboard.js")
        assert script.status_code == 200 and "textContent" in script.text
        assert "innerHTML" not in script.text


async def test_jobs_are_paged_by_id(app: baton.Baton) -> None:
    ids = await app.enqueue_many([dash.work.new(item=str(i)) for i in range(120)])
    seen: list[int] = []
    path = "/jobs?queue=default"
    async with client(create_app(app)) as http:
        while path:
            page = await http.get(path)
            seen += [int(i) for i in re.findall(r'<tr data-job="(\d+)"', page.text)]
            more = re.search(r'class="more" href="([^"]+)"', page.text)
            path = more.group(1).replace("&amp;", "&") if more else ""
    assert seen == sorted(ids, reverse=True)


async def test_counts_are_read_from_indexes(app: baton.Baton) -> None:
    """The overview's counts of unfinished jobs never read finished ones: each state is
    answered by the partial index that holds only it (shown with seq scans off, as the
    planner would choose on a large table)."""
    async with app.connection() as conn:
        await conn.execute("SET LOCAL enable_seqscan = off")
        cur = await conn.execute(
            b"EXPLAIN " + app.sql["jobs_live_counts"].as_bytes(conn))
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "Seq Scan on jobs" not in plan, plan
    for index in ("jobs_fetch_idx", "jobs_stage_idx", "jobs_executing_idx",
                  "workflows_running_idx"):
        assert index in plan, plan


async def test_cancel_workflow(app: baton.Baton) -> None:
    wf = baton.Workflow("stop me")
    wf.add("slow", dash.work.new(item="slow", gate="hold"))
    wf.add("next", dash.work.new(item="next"), deps=["slow"])
    wf.add("quick", dash.work.new(item="quick"))
    await app.insert(wf)
    view = await app.query.workflow(wf.id)
    slow = next(s.job_id for s in view.steps if s.step_name == "slow")
    quick = next(s.job_id for s in view.steps if s.step_name == "quick")
    finished = []
    async with app.events.subscribe(wf.id) as events, running_worker(app):
        await wait_for_job(app, quick, "completed")
        await wait_for_job(app, slow, "executing")
        cancelled = await app.cancel_workflow(wf.id)
        dash.GATES["hold"].set()
        async for event in events:
            if event.type == "workflow_finished":
                finished.append(event)
                break
    assert "slow" in cancelled and set(cancelled) <= {"slow", "next"}
    info = await app.get_workflow(wf.id)
    assert info.state == "failed" and sorted(info.failed_steps) == ["next", "slow"]
    assert [e.outcome for e in finished] == ["failed"]
    states = {s.step_name: s.state for s in (await app.query.workflow(wf.id)).steps}
    assert states == {"slow": "cancelled", "next": "cancelled", "quick": "completed"}
    assert await app.cancel_workflow(wf.id) == []
    with pytest.raises(baton.WorkflowNotFound):
        await app.cancel_workflow(uuid.uuid4())


def test_cancel_workflow_sync(dsn: str) -> None:
    app = baton.Baton(dsn)
    wf = baton.Workflow("sync stop")
    wf.add("a", dash.work.new(item="a"))
    wf.add("b", dash.work.new(item="b"), deps=["a"])
    app.insert_sync(wf)
    try:
        assert app.cancel_workflow_sync(wf.id) == ["a", "b"]
        assert app.get_workflow_sync(wf.id).state == "failed"
    finally:
        app.close_sync()


def test_the_command_refuses_an_open_bind_without_a_token(
        capsys: pytest.CaptureFixture[str]) -> None:
    from baton.cli import main

    assert main(["dashboard", "--host", "0.0.0.0", "--dsn", "postgresql:///nowhere"]) == 2
    assert "--token" in capsys.readouterr().err


async def test_pages_can_read_from_another_database_url(app: baton.Baton, dsn: str) -> None:
    job = await app.enqueue(dash.work.new(item="replica"))
    web = create_app(app, read_dsn=dsn)
    try:
        async with client(web) as http:
            page = await http.get(f"/jobs/{job}")
        assert page.status_code == 200 and "replica" in page.text
        assert web.state.dashboard._read_pool is not None  # read there, not on app's pool
    finally:
        await web.state.dashboard.close()


async def test_the_event_stream_starts_with_a_snapshot(app: baton.Baton, dsn: str) -> None:
    wf = baton.Workflow("streamed")
    wf.add("a", dash.work.new(item="a", gate="stream"))
    wf.add("b", dash.work.new(item="b"), deps=["a"])
    await app.insert(wf)
    events: list[tuple[str, Any]] = []
    with serving(create_app(baton.Baton(dsn), max_streams=1, close_app=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            path = f"/workflows/{wf.id}/events"
            async with http.stream("GET", path) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                assert (await http.get(path)).status_code == 503  # max_streams=1
                kind = ""
                async with running_worker(app):
                    async for line in stream.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            events.append((kind, json.loads(line[6:])))
                            if kind == "snapshot":
                                dash.GATES["stream"].set()
                            if kind == "workflow_finished":
                                break
    assert events[0][0] == "snapshot"
    snapshot = events[0][1]
    assert [s["step_name"] for s in snapshot["steps"]] == ["a", "b"]
    assert snapshot["workflow"]["state"] == "running"
    steps = [(e["step_name"], e["state"]) for kind, e in events
             if kind == "workflow_step_updated"]
    assert ("a", "completed") in steps and ("b", "completed") in steps
    assert events[-1][1]["outcome"] == "completed"


def test_the_command_serves_until_interrupted(dsn: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BATON_DASHBOARD_TOKEN": "correct-horse"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "dashboard", "--app", "tests.apps.dash:app", "--dsn",
         dsn, "--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # nothing to await in another process: knock until it answers
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/",
                                 headers={"authorization": "Bearer correct-horse"})
                break
            except httpx.ConnectError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.1)
        assert page.status_code == 200 and "Queues" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 401
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
