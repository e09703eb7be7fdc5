"""Steps that hold on past their time: a blocked event loop, plain ``def`` steps past their
timeout, cancelled, or caught by a shutdown."""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest

from tests.faults import app as faults_app
from tests.faults.conftest import MakeScenario
from tests.faults.harness import HEARTBEAT_TTL, ROOT, WorkerProc, query
from tests.faults.scenario import Scenario, verdict


async def wait_leader(s: Scenario, worker: WorkerProc, timeout: float = 30.0) -> None:
    """Poll until ``worker`` holds the maintenance lease."""
    with anyio.fail_after(timeout):
        while not await query(s.dsn, "SELECT 1 FROM baton.leader WHERE leader_id LIKE %s",
                              (f"%:{worker.pid}:%",)):
            await anyio.sleep(0.1)


@pytest.mark.timeout(200)
async def test_step_blocks_the_event_loop(make_scenario: MakeScenario) -> None:
    s = make_scenario("blocked_loop")
    async with s.running():
        # The leader never runs the blocking step, so it rescues on time; two others
        # serve the step's queue: one blocks, the other is free to run a rescued attempt.
        leader = s.cluster.start("leader", {"default": 5})
        await wait_leader(s, leader)
        for name in ("a", "b"):
            s.cluster.start(name, {"default": 5, "loop": 1})
        await s.enqueue_tiny(500)
        seconds = HEARTBEAT_TTL * 3
        job_id = await s.enqueue(faults_app.hog_loop.new(seconds=seconds))
        await s.wait_run(job_id)
        s.faults["loop_blocked"] += 1
        s.notes["blocked_seconds"] = seconds
        await s.enqueue_tiny(500)
        violations = await s.finish()
    assert not violations, verdict(violations)


def cancel_cli(dsn: str, job_id: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "baton", "job", "cancel", str(job_id), "--dsn", dsn],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(200)
async def test_plain_def_steps_past_timeout_cancel_and_shutdown(
    make_scenario: MakeScenario,
) -> None:
    s = make_scenario("plain_def")
    grace = "0.5"
    async with s.running():
        for name in ("a", "b"):
            s.cluster.start(name, {"default": 2, "threads": 1}, "--shutdown-grace", grace)
        # Past its one-second timeout: the first attempt's thread sleeps on.
        job = await s.enqueue(faults_app.hog_thread.new(seconds=3.0))
        await s.wait_run(job)
        s.faults["timeout_overrun"] += 1
        await s.enqueue_tiny(50)
        for n in range(6):
            await s.enqueue(faults_app.quick_thread.new(n=n))
        # Cancelled from the command line while its thread sleeps.
        job = await s.enqueue(faults_app.long_thread.new(seconds=60.0, until_cancelled=True),
                              expected="cancelled")
        await s.wait_run(job)
        s.notes["cancel_output"] = await anyio.to_thread.run_sync(cancel_cli, s.dsn, job)
        s.faults["cancel_running"] += 1
        for n in range(6, 12):
            await s.enqueue(faults_app.quick_thread.new(n=n))
        # Caught by a shutdown (SIGTERM, short grace) while its thread sleeps; a new
        # worker takes the place of the stopped one.
        job = await s.enqueue(faults_app.long_thread.new(seconds=4.0))
        started = await s.wait_run(job)
        worker = s.cluster.by_pid[started["pid"]]
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.cluster.stop, worker)
            s.faults["sigterm_during_step"] += 1
            s.cluster.restart(worker, "--shutdown-grace", grace)
        s.notes["stopped_worker_status"] = worker.proc.returncode
        for n in range(12, 18):
            await s.enqueue(faults_app.quick_thread.new(n=n))
        violations = await s.finish()
    assert not violations, verdict(violations)
