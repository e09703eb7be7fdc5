"""``baton worker --processes N``: a real supervisor and its worker processes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import pytest

import baton
from baton.errors import ConfigurationError, WorkerStartError
from baton.job import JobSpec, JobState
from baton.testing import wait_for_job, wait_for_jobs
from baton.worker import supervisor
from tests.apps import supervised
from tests.conftest import bound
from tests.helpers import ROOT, reap, sql_rows

LIVE = "SELECT pid FROM baton.worker_registry WHERE expires_at > now() ORDER BY pid"
FAST_RESCUE = ("--heartbeat-interval", "0.2", "--heartbeat-ttl", "1",
               "--maintenance-interval", "0.1", "--leader-ttl", "1")


@pytest.fixture
async def supervised_app(dsn: str) -> AsyncIterator[baton.Baton]:
    async with bound(supervised.app, dsn) as bound_app:
        yield bound_app


class Logs:
    """The JSON log lines of a supervisor and its children, read as they come."""

    def __init__(self, stream: IO[str]) -> None:
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": None}
            with self._changed:
                self.lines.append(line)
                self.events.append(event if isinstance(event, dict) else {"event": None})
                self._changed.notify_all()
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e.get("event") == name
                    and all(e.get(k) == v for k, v in fields.items())]

    async def wait_for(self, name: str, count: int = 1, *, timeout: float = 30,
                       **fields: Any) -> list[dict[str, Any]]:
        """The first ``count`` events called ``name`` with ``fields``, once logged."""
        def enough() -> bool:
            return len(self.named(name, **fields)) >= count or self.closed

        def wait() -> None:
            with self._changed:
                self._changed.wait_for(enough, timeout)

        await anyio.to_thread.run_sync(wait)
        found = self.named(name, **fields)
        assert len(found) >= count, (
            f"{count} x {name} {fields} not logged; last lines:\n" + "".join(self.lines[-30:]))
        return found[:count]

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def start(dsn: str, *args: str, app: str = "tests.apps.supervised:app",
          preexec_fn: Callable[[], None] | None = None) -> tuple[subprocess.Popen[str], Logs]:
    env = {k: v for k, v in os.environ.items() if k != "BATON_DATABASE_URL"}
    env["BATON_ENV"] = "production"
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "worker", "--app", app, "--dsn", dsn, "--log-json",
         *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=preexec_fn)
    assert proc.stderr is not None
    return proc, Logs(proc.stderr)


def worker_pid(worker_id: str) -> int:
    return int(worker_id.split(":")[-2])


async def wait_status(proc: subprocess.Popen[str], timeout: float = 60) -> int:
    return await anyio.to_thread.run_sync(lambda: proc.wait(timeout=timeout))


async def start_running(app: baton.Baton, job: JobSpec
                        ) -> tuple[subprocess.Popen[str], Logs, int]:
    """Start two worker processes, then ``job``; return once a worker runs it."""
    proc, logs = start(app.dsn, "--processes", "2")
    try:
        await logs.wait_for("supervisor.child_ready", 2)
        job_id = await app.enqueue(job)
        await wait_for_job(app, job_id, "executing", timeout=30)
    except BaseException:
        reap(proc)
        raise
    return proc, logs, job_id


# -- without a database ------------------------------------------------------------------


def test_processes_flag() -> None:
    assert supervisor.parse_processes("3") == 3
    assert supervisor.parse_processes(" AUTO ") == supervisor.usable_cores() >= 1
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ConfigurationError, match="--processes"):
            supervisor.parse_processes(bad)


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    waits = [supervisor.backoff(n) for n in range(1, 10)]
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0]
    assert waits[-1] == supervisor.MAX_BACKOFF == max(waits)


def test_child_command_is_the_same_worker_with_one_process() -> None:
    argv = ["worker", "--app", "a:app", "--processes", "4", "--queues", "x=2"]
    assert supervisor.worker_command(argv) == [sys.executable, "-m", "baton", *argv,
                                               "--processes", "1"]


# -- real processes ----------------------------------------------------------------------


async def test_two_processes_two_heartbeat_rows_and_jobs_run(
    supervised_app: baton.Baton,
) -> None:
    app = supervised_app
    ids = await app.enqueue_many([supervised.quick.new(n=i) for i in range(100)])
    proc, logs = start(app.dsn, "--processes", "2", "--queues", "default=5")
    try:
        started = await logs.wait_for("supervisor.child_started", 2)
        await logs.wait_for("supervisor.child_ready", 2)
        children = sorted(e["pid"] for e in started)
        assert proc.pid not in children
        assert sql_rows(app.dsn, LIVE) == [(pid,) for pid in children]
        jobs = await wait_for_jobs(app, ids, ["completed"])
        assert {worker_pid(j.attempted_by or "") for j in jobs} <= set(children)
        proc.send_signal(signal.SIGTERM)
        assert await wait_status(proc) == 0
    finally:
        reap(proc)
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.worker_registry") == [(0,)]
    logs.text()
    assert logs.named("supervisor.started", processes=2)
    assert sorted(e["pid"] for e in logs.named("supervisor.child_exited")) == children
    assert {e["status"] for e in logs.named("supervisor.child_exited")} == {"0"}
    assert logs.named("supervisor.stopped", status=0)


async def test_killed_child_is_restarted_and_its_job_rescued(
    supervised_app: baton.Baton,
) -> None:
    app = supervised_app
    proc, logs = start(app.dsn, "--processes", "2", "--queues", "default=2", *FAST_RESCUE)
    try:
        started = await logs.wait_for("supervisor.child_ready", 2)
        job_id = await app.enqueue(supervised.hold_first_attempt.new())
        holding = await wait_for_job(app, job_id, "executing", timeout=30)
        killed = worker_pid(holding.attempted_by or "")
        [other] = {e["pid"] for e in started} - {killed}
        os.kill(killed, signal.SIGKILL)
        [exited] = await logs.wait_for("supervisor.child_exited", pid=killed)
        assert exited["status"] == "SIGKILL" and exited["unexpected"] is True
        [restarted] = await logs.wait_for("supervisor.child_restarted", slot=exited["slot"])
        await logs.wait_for("supervisor.child_ready", pid=restarted["pid"])
        job = await wait_for_job(app, job_id, "completed", timeout=30)
        assert job.attempt == 2 and job.errors[0]["kind"] == "rescued"
        assert worker_pid(job.attempted_by or "") in (other, restarted["pid"])
        assert sql_rows(app.dsn, LIVE) == [(p,) for p in sorted((other, restarted["pid"]))]
        more = await app.enqueue_many([supervised.quick.new(n=i) for i in range(20)])
        await wait_for_jobs(app, more, ["completed"])
        proc.send_signal(signal.SIGTERM)
        assert await wait_status(proc) == 0
    finally:
        reap(proc)
    logs.text()
    assert len(logs.named("supervisor.child_started")) == 2
    assert len(logs.named("supervisor.child_restarted")) == 1


async def test_sigterm_stops_every_child_after_its_running_job_finishes(
    supervised_app: baton.Baton, tmp_path: Path,
) -> None:
    app = supervised_app
    gate = tmp_path / "go"
    proc, logs, job_id = await start_running(app, supervised.until_file.new(path=str(gate)))
    try:
        proc.send_signal(signal.SIGTERM)
        await logs.wait_for("worker.stopping", 2)  # both children are winding down
        assert (await app.get_job(job_id)).state is JobState.EXECUTING
        gate.touch()
        assert await wait_status(proc) == 0
    finally:
        reap(proc)
    job = await app.get_job(job_id)
    assert job.state is JobState.COMPLETED and job.attempt == 1
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.worker_registry") == [(0,)]
    logs.text()
    assert logs.named("supervisor.stopping", signal="SIGTERM")
    assert not logs.named("supervisor.child_restarted")


async def test_second_signal_kills_the_children(supervised_app: baton.Baton) -> None:
    app = supervised_app
    proc, logs, job_id = await start_running(app, supervised.hold_first_attempt.new())
    try:
        proc.send_signal(signal.SIGINT)
        await logs.wait_for("worker.stopping", 2)
        proc.send_signal(signal.SIGINT)
        assert await wait_status(proc) == 128 + signal.SIGINT
    finally:
        reap(proc)
    logs.text()
    assert logs.named("supervisor.forcing", signal="SIGINT")
    assert "SIGKILL" in {e["status"] for e in logs.named("supervisor.child_exited")}
    assert (await app.get_job(job_id)).state is JobState.EXECUTING  # rescued later


async def test_children_that_cannot_start_make_it_give_up(dsn: str) -> None:
    proc, logs = start(dsn, "--processes", "2", app="tests.apps.supervised_broken:app")
    try:
        assert await wait_status(proc, timeout=90) == 2
    finally:
        reap(proc)
    text = logs.text()
    starts = logs.named("supervisor.child_started") + logs.named("supervisor.child_restarted")
    assert len(starts) >= supervisor.MAX_FAILED_STARTS
    assert not logs.named("supervisor.child_ready")
    [gave_up] = logs.named("supervisor.gave_up")
    assert gave_up["failed_starts"] == supervisor.MAX_FAILED_STARTS
    [failed] = logs.named("cli.failed")
    assert "keep exiting before they are ready" in failed["error"]
    assert "cannot be imported in a worker process" in text  # each child's own error


def test_bad_app_fails_before_any_child_starts(dsn: str) -> None:
    proc, logs = start(dsn, "--processes", "3", app="tests.apps.nowhere:app")
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        reap(proc)
    logs.text()
    [failed] = logs.named("cli.failed")
    assert "cannot import module 'tests.apps.nowhere'" in failed["error"]
    assert not logs.named("supervisor.started")


def test_bad_processes_value_is_a_clear_error(dsn: str) -> None:
    proc, logs = start(dsn, "--processes", "many")
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        reap(proc)
    logs.text()
    [failed] = logs.named("cli.failed")
    assert "--processes" in failed["error"] and "'auto'" in failed["error"]


async def test_auto_runs_one_process_per_usable_core(supervised_app: baton.Baton) -> None:
    app = supervised_app
    cores = sorted(os.sched_getaffinity(0))[:2]  # at most two here: CPU is shared

    def pin() -> None:
        os.sched_setaffinity(0, cores)

    proc, logs = start(app.dsn, "--processes", "auto", preexec_fn=pin)
    try:
        await logs.wait_for("worker.started", len(cores))
        if len(cores) > 1:
            assert logs.named("supervisor.started", processes=len(cores))
            await logs.wait_for("supervisor.child_ready", len(cores))
        assert len(sql_rows(app.dsn, LIVE)) == len(cores)
        proc.send_signal(signal.SIGTERM)
        assert await wait_status(proc) == 0
    finally:
        reap(proc)


async def test_sigterm_while_children_start_is_a_clean_stop(dsn: str) -> None:
    proc, logs = start(dsn, "--processes", "2")
    try:
        await logs.wait_for("supervisor.child_started", 2)
        proc.send_signal(signal.SIGTERM)
        assert await wait_status(proc) == 0
    finally:
        reap(proc)
    logs.text()
    assert len(logs.named("supervisor.child_exited")) == 2
    assert not logs.named("supervisor.child_restarted")


async def test_workers_stop_gracefully_when_the_supervisor_is_killed(
    supervised_app: baton.Baton, tmp_path: Path,
) -> None:
    app = supervised_app
    gate = tmp_path / "go"
    proc, logs, job_id = await start_running(app, supervised.until_file.new(path=str(gate)))
    try:
        proc.kill()
        assert await wait_status(proc) == -signal.SIGKILL
        await logs.wait_for("worker.stopping", 2)  # the kernel's SIGTERM, not a kill
        gate.touch()
        await logs.wait_for("worker.stopped", 2)
    finally:
        reap(proc)
    logs.text()  # every worker has closed its end of the pipe: they have all exited
    job = await app.get_job(job_id)
    assert job.state is JobState.COMPLETED and job.attempt == 1
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.worker_registry") == [(0,)]


# -- the supervisor alone, with stand-in children -----------------------------------------

STAND_IN = """
import os, signal, sys
import anyio
from baton.worker.supervisor import under_supervisor

status = int(sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
notify = under_supervisor()
assert notify is not None and "BATON_SUPERVISOR_PID" not in os.environ

async def ready() -> None:
    started = anyio.Event()
    started.set()
    await notify(started)

anyio.run(ready)
try:  # the first child ready asks the supervisor to stop
    os.close(os.open(sys.argv[2], os.O_CREAT | os.O_EXCL))
    os.kill(os.getppid(), signal.SIGTERM)
except FileExistsError:
    pass
signal.sigwait({signal.SIGTERM})
sys.exit(status)
"""


@pytest.mark.parametrize(("child_status", "status"), [(0, 0), (70, 70), (3, 1)])
def test_exit_status_says_how_the_children_stopped(
    child_status: int, status: int, tmp_path: Path,
) -> None:
    command = [sys.executable, "-c", STAND_IN, str(child_status), str(tmp_path / "first")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert supervisor.Supervisor(2, command, env=env).run() == status


HELD_OPEN = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
holder = os.fork()
if holder == 0:  # keeps the ready pipe open after this child ends, as a forked pool would
    signal.sigwait({signal.SIGTERM})
    os._exit(0)
with open(sys.argv[1], "w") as out:
    out.write(str(holder))
os.kill(os.getppid(), signal.SIGTERM)  # the supervisor stops before this child is ready
signal.sigwait({signal.SIGTERM})
"""

SUPERVISE = """
import sys
from baton.worker.supervisor import Supervisor
sys.exit(Supervisor(1, sys.argv[1:]).run())
"""


def test_a_ready_pipe_held_open_by_another_process_does_not_block_it(tmp_path: Path) -> None:
    holder = tmp_path / "holder"
    child = [sys.executable, "-c", HELD_OPEN, str(holder)]
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISE, *child], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
        if holder.exists():
            os.kill(int(holder.read_text()), signal.SIGKILL)


FLAPPING = """
import os, signal, sys
import anyio
from baton.worker.supervisor import under_supervisor

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
notify = under_supervisor()
assert notify is not None


async def ready() -> None:
    started = anyio.Event()
    started.set()
    await notify(started)

anyio.run(ready)
with open(sys.argv[1], "a") as starts:
    starts.write("x")
if os.path.getsize(sys.argv[1]) < 3:
    sys.exit(1)  # the first two end just after they said ready
os.kill(os.getppid(), signal.SIGTERM)
signal.sigwait({signal.SIGTERM})
"""


@pytest.mark.parametrize(("stable_after", "delays"), [(3600.0, [0.5, 1.0]), (0.0, [0.5, 0.5])])
def test_restart_waits_double_until_a_worker_ran_long_enough(
    stable_after: float, delays: list[float], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "STABLE_AFTER", stable_after)
    command = [sys.executable, "-c", FLAPPING, str(tmp_path / "starts")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with caplog.at_level("INFO", logger="baton.supervisor"):
        assert supervisor.Supervisor(1, command, env=env).run() == 0
    restarting = [r.msg for r in caplog.records if isinstance(r.msg, dict)
                  and r.msg.get("event") == "supervisor.child_restarting"]
    assert [event["delay"] for event in restarting] == delays
    assert [event["failed_starts"] for event in restarting] == [0, 0]


def test_a_child_the_system_will_not_start_is_retried_then_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF", 0.01)
    gone = str(tmp_path / "python")  # an interpreter a deploy removed
    with caplog.at_level("INFO", logger="baton.supervisor"), \
            pytest.raises(WorkerStartError, match="could not be started") as raised:
        supervisor.Supervisor(2, [gone, "-c", "pass"]).run()
    assert raised.value.failed_starts == supervisor.MAX_FAILED_STARTS
    assert raised.value.status is None
    failed = [r.msg for r in caplog.records if isinstance(r.msg, dict)
              and r.msg.get("event") == "supervisor.child_start_failed"]
    assert len(failed) >= supervisor.MAX_FAILED_STARTS
    assert all(gone in event["error"] for event in failed)


class _Healing(supervisor.Supervisor):
    """A supervisor whose child's interpreter comes back after the first failed start."""

    def __init__(self, link: Path, command: list[str], env: dict[str, str]) -> None:
        super().__init__(1, command, env=env)
        self.link = link

    def _start(self, slot: Any) -> None:
        super()._start(slot)
        if slot.child is None and not self.link.exists():
            script = self.link.with_suffix(".new")
            script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
            script.chmod(0o755)
            script.rename(self.link)


def test_a_child_that_could_not_be_started_is_started_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF", 0.01)
    link = tmp_path / "python"
    command = [str(link), "-c", FLAPPING, str(tmp_path / "starts")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with caplog.at_level("INFO", logger="baton.supervisor"):
        assert _Healing(link, command, env).run() == 0  # the third start stops it cleanly
    events = [r.msg["event"] for r in caplog.records if isinstance(r.msg, dict)]
    assert events.count("supervisor.child_start_failed") == 1
    assert events.count("supervisor.child_ready") == 3
