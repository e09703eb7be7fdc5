"""The process executor: plain ``def`` steps declared ``executor="process"`` run in child
processes that a timeout, a cancel or a shutdown kills."""

from __future__ import annotations

import datetime
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import baton
from baton.job import JobState
from baton.logs import capture_logs
from baton.testing import running_worker, wait_for_job, wait_for_jobs, wait_for_workflow
from baton.worker import processes
from baton.worker.executor import Executor
from tests.apps import process_steps as ps
from tests.conftest import bound
from tests.helpers import reap, sql_rows, worker_process

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(ps.app, dsn) as bound_app:
        yield bound_app


async def read_pid(path: Path, timeout: float = 30.0) -> int:
    """Wait for a step's child to write its pid file; return the pid."""
    with anyio.fail_after(timeout):
        while not path.exists():
            await anyio.sleep(0.01)
    return int(path.read_text())


def is_gone(pid: int) -> bool:
    """Whether no process has ``pid`` any more (a zombie nobody reaped still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_until_gone(pid: int, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not is_gone(pid):
            await anyio.sleep(0.01)


def is_gone_or_zombie(pid: int) -> bool:
    """For a process that is not our child: gone, or exited and waiting for init to reap
    it (a container's init may never do so)."""
    if is_gone(pid):
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


# -- registration ------------------------------------------------------------------------------


def test_async_step_refused() -> None:
    app = baton.Baton()

    async def fetch() -> None: ...

    with pytest.raises(baton.StepError, match="async and cannot run in a process"):
        app.step(executor="process", name="fetch")(fetch)
    with pytest.raises(baton.StepError, match="async and cannot run in a process"):
        app.llm_step(executor="process", name="fetch")(fetch)


def test_local_function_and_unknown_executor_refused() -> None:
    app = baton.Baton()

    def local() -> None: ...

    with pytest.raises(baton.StepError, match="defined inside a function"):
        app.step(executor="process", name="local")(local)
    with pytest.raises(baton.StepError, match="executor must be 'thread' or 'process'"):
        app.step(executor="fork", name="local")(local)  # type: ignore[call-overload]
    assert app.step(name="local")(local).options.executor == "thread"
    assert app.llm_step(executor="process")(ps.noop.fn).options.executor == "process"


# -- what comes back ---------------------------------------------------------------------------


async def test_results_and_context_round_trip(app: baton.Baton) -> None:
    wf = baton.Workflow("shapes")
    wf.add("describe", ps.describe.new(point={"x": 2, "y": 3}, scale=10))
    wf.add("combine", ps.combine.new(), deps=["describe"])
    await app.insert(wf)
    async with running_worker(app):
        info = await wait_for_workflow(app, wf.id, timeout=60)
    assert info.state == "completed"
    first = await app.result(wf.id, "describe")
    second = await app.result(wf.id, "combine")
    assert first["sum"] == 50 and first["pid"] != os.getpid()
    assert second == {"upstream_pid": first["pid"], "doubled": 100, "step": "combine",
                      "workflow_id": str(wf.id)}


async def test_usage_and_captures_come_back(app: baton.Baton) -> None:
    ok = await app.enqueue(ps.priced.new())
    failed = await app.enqueue(ps.priced.new(fail=True).options(max_attempts=1))
    async with running_worker(app):
        await wait_for_jobs(app, [ok, failed], ["completed", "discarded"])
    assert (await app.get_job(ok)).state is JobState.COMPLETED
    stats = sql_rows(app.dsn, "SELECT job_id, model, input_tokens FROM baton.step_stats "
                              "ORDER BY job_id, model")
    assert stats == [(ok, "m-process", 10), (ok, "m-result", 3), (failed, "m-process", 10)]
    logs = sql_rows(app.dsn, "SELECT job_id, request, response FROM baton.debug_logs "
                             "ORDER BY job_id")
    assert [(job_id, request) for job_id, request, _ in logs] == [
        (ok, {"q": "what"}), (failed, {"q": "what"})]
    assert all(response["a"] != os.getpid() for _, _, response in logs)


async def test_exception_keeps_the_childs_traceback(app: baton.Baton) -> None:
    job_id = await app.enqueue(ps.boom.new(word="kaput"))
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "discarded", timeout=30)
    [entry] = job.errors
    assert entry["kind"] == "error" and entry["error"] == "ValueError: boom: kaput"
    trace = entry["traceback"]
    assert "in the step's process (pid" in trace
    assert 'process_steps.py", line' in trace and "in boom" in trace
    assert 'raise ValueError(f"boom: {word}")' in trace


async def test_unpicklable_exception_has_a_stand_in(app: baton.Baton) -> None:
    job_id = await app.enqueue(ps.boom_unpicklable.new())
    async with running_worker(app):
        job = await wait_for_job(app, job_id, "discarded", timeout=30)
    [entry] = job.errors
    assert entry["error"] == ("RemoteStepError: tests.apps.process_steps.Unpicklable: "
                              "cannot travel")
    assert "in boom_unpicklable" in entry["traceback"]


async def test_rate_limit_of_an_llm_step_snoozes(app: baton.Baton) -> None:
    job_id = await app.enqueue(ps.ask.new(prompt="hi"))
    async with running_worker(app, queues={"llm": 1}):
        job = await wait_for_job(app, job_id, "scheduled", timeout=30)
        [(seen,)] = sql_rows(app.dsn, "SELECT now()")
    assert job.snoozes == 1 and job.attempt == 0 and job.errors == []
    assert job.scheduled_at is not None and job.attempted_at is not None
    # Retry-After: 7, counted from the snooze's write, which came after the claim and
    # before the job was seen scheduled (however long the child took to start).
    wait = datetime.timedelta(seconds=7)
    assert job.attempted_at + wait <= job.scheduled_at <= seen + wait


async def test_signals_act_as_in_process(app: baton.Baton) -> None:
    snoozed = await app.enqueue(ps.steered.new(how="snooze"))
    cancelled = await app.enqueue(ps.steered.new(how="cancel"))
    discarded = await app.enqueue(ps.steered.new(how="discard"))
    async with running_worker(app):
        jobs = await wait_for_jobs(app, [snoozed, cancelled, discarded],
                                   ["completed", "cancelled", "discarded"], timeout=30)
    by_id = {job.id: job for job in jobs}
    assert by_id[snoozed].state is JobState.COMPLETED
    assert by_id[snoozed].snoozes == 1 and by_id[snoozed].attempt == 1
    assert by_id[cancelled].state is JobState.CANCELLED
    assert by_id[cancelled].errors[-1]["error"] == "Cancel: returned a cancel"
    assert by_id[discarded].state is JobState.DISCARDED
    assert by_id[discarded].attempt == 1  # two attempts were left
    assert by_id[discarded].errors[-1]["kind"] == "discard"


async def test_children_are_reused(app: baton.Baton, tmp_path: Path) -> None:
    ids = await app.enqueue_many([ps.note_pid.new(folder=str(tmp_path), n=n)
                                  for n in range(5)])
    async with running_worker(app, queues={"single": 1}) as worker:
        await wait_for_jobs(app, ids, ["completed"], timeout=60)
        pool = processes.pool_of(worker.executor)
        assert pool.started == 1 and len(pool.idle) == 1
        [child] = pool.idle
    pids = {int((tmp_path / f"{n}.pid").read_text()) for n in range(5)}
    assert pids == {child.pid}
    assert is_gone(child.pid)  # the stopped worker stopped its idle child


async def test_idle_child_that_died_is_replaced() -> None:
    executor = Executor(ps.app, anyio.CapacityLimiter(1))
    point = ps.Point(x=1, y=2)
    first = await processes.call(executor, ps.describe, {"point": point})
    os.kill(first["pid"], signal.SIGKILL)  # while it waits for work
    second = await processes.call(executor, ps.describe, {"point": point})
    assert second["sum"] == 3 and second["pid"] != first["pid"]
    assert is_gone(first["pid"])
    await processes.close(executor)
    assert is_gone(second["pid"])


# -- what kills a child ------------------------------------------------------------------------


async def test_timeout_kills_the_child(app: baton.Baton, tmp_path: Path) -> None:
    # A warm child first, so that starting one does not eat into the timeout.
    warm = await app.enqueue(ps.sleeper.new(folder=str(tmp_path), name="warm", seconds=0))
    job_id = await app.enqueue(
        ps.sleeper.new(folder=str(tmp_path), name="slow", seconds=3600).options(timeout=1))
    async with running_worker(app, queues={"default": 1}):
        await wait_for_job(app, warm, "completed", timeout=30)
        pid = await read_pid(tmp_path / "slow.pid")
        assert pid == int((tmp_path / "warm.pid").read_text())
        job = await wait_for_job(app, job_id, "retryable", timeout=30)
        assert is_gone(pid)  # killed and reaped before the attempt was written
    assert job.errors[-1]["kind"] == "timeout"
    assert not (tmp_path / "slow.done").exists()


async def test_cancel_kills_the_child(app: baton.Baton, tmp_path: Path) -> None:
    job_id = await app.enqueue(ps.sleeper.new(folder=str(tmp_path), name="c", seconds=3600))
    async with running_worker(app):
        pid = await read_pid(tmp_path / "c.pid")
        assert await app.cancel(job_id) is True
        await wait_for_job(app, job_id, "cancelled", timeout=30)
        # The row is cancelled at once; the worker hears of it and kills the child.
        await wait_until_gone(pid)
        # The slot goes on, with a new child.
        after = await app.enqueue(ps.sleeper.new(folder=str(tmp_path), name="d", seconds=0))
        await wait_for_job(app, after, "completed", timeout=30)
    assert int((tmp_path / "d.pid").read_text()) != pid
    assert not (tmp_path / "c.done").exists()


async def test_shutdown_past_grace_kills_then_hands_back(app: baton.Baton, tmp_path: Path
                                                         ) -> None:
    job_id = await app.enqueue(ps.sleeper.new(folder=str(tmp_path), name="s", seconds=3600))
    with capture_logs() as logs:
        async with running_worker(app, shutdown_grace=0.2):
            pid = await read_pid(tmp_path / "s.pid")
    assert is_gone(pid)
    job = await app.get_job(job_id)
    assert job.state is JobState.AVAILABLE and job.attempt == 0  # handed back
    events = [e["event"] for e in logs]
    assert events.index("process.killed") < events.index("job.handed_back")
    [killed] = [e for e in logs if e["event"] == "process.killed"]
    assert killed["pid"] == pid and killed["returncode"] == -signal.SIGTERM
    assert not (tmp_path / "s.done").exists()


async def test_child_that_exits_fails_the_attempt(app: baton.Baton) -> None:
    exited = await app.enqueue(ps.exits.new(code=3))
    crashed = await app.enqueue(ps.crashes.new())
    async with running_worker(app):
        jobs = await wait_for_jobs(app, [exited, crashed], ["discarded"], timeout=30)
        # The worker goes on after both.
        after = await app.enqueue(ps.describe.new(point={"x": 1, "y": 1}))
        await wait_for_job(app, after, "completed", timeout=30)
    by_id = {job.id: job.errors[-1] for job in jobs}
    assert by_id[exited]["kind"] == "error"
    assert by_id[exited]["error"].startswith("ProcessDiedError: the process running step "
                                             "'tests.apps.process_steps.exits' (pid ")
    assert "exited with code 3 before the step returned" in by_id[exited]["error"]
    assert "was killed by SIGSEGV" in by_id[crashed]["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_child_dies_with_a_killed_worker(app: baton.Baton, tmp_path: Path) -> None:
    job_id = await app.enqueue(ps.sleeper.new(folder=str(tmp_path), name="k", seconds=3600))
    proc = worker_process(app.dsn, "tests.apps.process_steps:app", "--queues", "default=1")
    try:
        pid = await read_pid(tmp_path / "k.pid")
        assert pid != proc.pid
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        reap(proc)
    with anyio.fail_after(10):
        while not is_gone_or_zombie(pid):
            await anyio.sleep(0.01)
    assert (await app.get_job(job_id)).state is JobState.EXECUTING  # for the rescuer
    assert not (tmp_path / "k.done").exists()
