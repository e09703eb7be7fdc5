"""Real processes: ``baton worker`` killed with SIGKILL, a server restart, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import anyio
import pytest

import baton
from baton.job import JobState
from baton.testing import running_worker, wait_for_job
from tests.apps import basic, procs
from tests.conftest import Server
from tests.helpers import reap, sql_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baton_cli(*args: str, dsn: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "baton", *args]
    return [*cmd, "--dsn", dsn] if dsn else cmd


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BATON_DATABASE_URL"}
    env["BATON_ENV"] = "production"  # never fall back to an embedded server here
    return env


async def test_killed_worker_job_is_rescued_and_completed(procs_app: baton.Baton) -> None:
    app = procs_app
    job_id = await app.enqueue(procs.hold_first_attempt.new())
    proc = subprocess.Popen(
        baton_cli("worker", "--app", "tests.apps.procs:app", "--queues", "default=2",
                  "--heartbeat-interval", "0.2", "--heartbeat-ttl", "1",
                  "--maintenance-interval", "0.1", dsn=app.dsn),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        first = await wait_for_job(app, job_id, "executing", timeout=30)
        assert first.attempted_by and f":{proc.pid}:" in first.attempted_by
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        reap(proc)
        assert proc.stderr is not None
        proc.stderr.close()
    assert (await app.get_job(job_id)).state is JobState.EXECUTING  # nobody finished it
    async with running_worker(app) as rescuer:
        job = await wait_for_job(app, job_id, "completed", timeout=30)
    assert job.attempt == 2 and job.attempted_by == rescuer.id
    assert job.errors[0]["kind"] == "rescued"
    assert f":{proc.pid}:" in job.errors[0]["error"]


async def test_worker_cli_runs_jobs_and_stops_on_sigterm(procs_app: baton.Baton) -> None:
    app = procs_app
    ids = await app.enqueue_many([procs.quick.new(n=i) for i in range(50)])
    proc = subprocess.Popen(
        baton_cli("worker", "--app", "tests.apps.procs:app", "--queues", "default=5",
                  dsn=app.dsn),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        for job_id in ids:
            await wait_for_job(app, job_id, "completed", timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 0
    assert "worker.stopped" in err and "job.completed" in err
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.worker_registry") == [(0,)]


async def test_worker_survives_server_restart(
    app: baton.Baton, pg_server: Server
) -> None:
    if not pg_server.embedded:
        pytest.skip("needs the suite's own embedded server to restart it")
    before = await app.enqueue(basic.echo.new(value="before"))
    running = await app.enqueue(basic.blocker.new(key="across"))
    async with running_worker(app) as worker:
        await wait_for_job(app, before, "completed")
        with anyio.fail_after(10):
            await basic.STARTED.setdefault("across", anyio.Event()).wait()
        await anyio.to_thread.run_sync(pg_server.restart)
        basic.GATES.setdefault("across", anyio.Event()).set()
        after = await app.enqueue(basic.echo.new(value="after"))
        await wait_for_job(app, after, "completed", timeout=30)
        job = await wait_for_job(app, running, "completed", timeout=30)
        assert not worker.stopped.is_set()
    assert basic.CALLS["echo"] == ["before", "after"]
    assert job.attempt == 1


def test_cli_migrate_and_bad_app(empty_dsn: str) -> None:
    done = subprocess.run(baton_cli("migrate", dsn=empty_dsn), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sql_rows(empty_dsn, "SELECT count(*) FROM baton.schema_migrations")[0][0] >= 1
    bad = subprocess.run(baton_cli("worker", "--app", "tests.apps.nowhere:app", dsn=empty_dsn),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "cannot import module 'tests.apps.nowhere'" in bad.stderr
    wrong = subprocess.run(baton_cli("worker", "--app", "tests.apps.procs:quick", dsn=empty_dsn),
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "not a baton.Baton app" in wrong.stderr


def test_production_without_url_is_a_clear_error(tmp_path: object) -> None:
    done = subprocess.run(baton_cli("migrate"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "BATON_DATABASE_URL is not set" in done.stderr


async def test_worker_past_its_grace_exits_rather_than_hand_back_a_running_thread(
    procs_app: baton.Baton,
) -> None:
    """SIGTERM while a plain def step blocks its thread: past the grace the process exits
    (status 70) with the job still executing under it, so the job is not run elsewhere
    until the process, and so the thread, is gone; then it is rescued."""
    app = procs_app
    job_id = await app.enqueue(procs.hold_thread_first_attempt.new())
    proc = subprocess.Popen(
        baton_cli("worker", "--app", "tests.apps.procs:app", "--queues", "default=2",
                  "--heartbeat-interval", "0.2", "--heartbeat-ttl", "1",
                  "--maintenance-interval", "0.1", "--shutdown-grace", "0.3", dsn=app.dsn),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        await wait_for_job(app, job_id, "executing", timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 70
    finally:
        reap(proc)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert "worker.exiting_with_threads" in err
    assert (await app.get_job(job_id)).state is JobState.EXECUTING  # not handed back
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "completed", timeout=30)
    assert job.attempt == 2 and job.errors[0]["kind"] == "rescued"
