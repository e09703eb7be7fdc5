"""`baton` on a bad start, as a real process: one line on stderr that says what to do, a
non-zero status, no traceback; permanent errors fail at once; signals stop it while it
waits for the database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.helpers import reap, sql_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_WAIT = "600"  # a connect timeout no test waits out: failing fast must not depend on it


def baton(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``baton`` (the subprocess timeout fails the test if it waits for the database)."""
    return subprocess.run([sys.executable, "-m", "baton", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env["BATON_ENV"] = "production"
    env["BATON_CONNECT_TIMEOUT"] = LONG_WAIT
    return env


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed; fails unless that is all it printed."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("baton: error: ")
    return lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


WORKER = ("worker", "--app", "tests.apps.procs:app")


def test_worker_on_an_unmigrated_database(empty_dsn: str) -> None:
    line = one_error_line(baton(*WORKER, "--dsn", empty_dsn))
    assert "missing migrations" in line and "run `baton migrate`" in line


def test_status_on_an_unmigrated_database(empty_dsn: str) -> None:
    line = one_error_line(baton("status", "--dsn", empty_dsn))
    assert "run `baton migrate`" in line


@pytest.mark.parametrize(("change", "expected"), [
    ({"dbname": "baton_no_such_db"}, 'database "baton_no_such_db" does not exist'),
    ({"user": "baton_no_such_role"}, 'role "baton_no_such_role" does not exist'),
])
def test_worker_fails_at_once_on_a_permanent_error(
    dsn: str, change: dict[str, str], expected: str
) -> None:
    line = one_error_line(baton(*WORKER, "--dsn", make_conninfo(dsn, **change)))
    assert expected in line and "check the URL" in line


@pytest.mark.parametrize("url", ["not a url", "postgresql://localhost:notaport/db"])
def test_worker_fails_at_once_on_a_bad_url(url: str) -> None:
    assert "could not connect to the database" in one_error_line(baton(*WORKER, "--dsn", url))


def test_worker_gives_up_on_an_unreachable_host_after_the_timeout() -> None:
    url = f"postgresql://baton@127.0.0.1:{closed_port()}/baton"
    line = one_error_line(baton(*WORKER, "--dsn", url, "--connect-timeout", "0.5"))
    assert "within 0.5 s" in line and "Connection refused" in line


def test_worker_with_a_bad_app(dsn: str) -> None:
    line = one_error_line(baton("worker", "--app", "tests.apps.nowhere:app", "--dsn", dsn))
    assert "cannot import module 'tests.apps.nowhere'" in line


def test_migrate_fails_at_once_on_a_missing_database(dsn: str) -> None:
    line = one_error_line(baton("migrate", "--dsn", make_conninfo(dsn, dbname="baton_nope")))
    assert "does not exist" in line


def test_json_logs_report_the_failure_as_one_record(empty_dsn: str) -> None:
    done = baton(*WORKER, "--dsn", empty_dsn, "--log-json")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and '"event": "cli.failed"' in lines[0], done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_worker_stops_on_a_signal_while_waiting_for_the_database(signum: int) -> None:
    url = f"postgresql://baton@127.0.0.1:{closed_port()}/baton"
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", *WORKER, "--dsn", url, "--log-level", "debug"],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # waits until it is retrying the connect
            if "db.connect_retrying" in line:
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == 0
    assert "worker.signal" in err and "Traceback" not in err


@pytest.fixture
def usage_only_dsn(dsn: str) -> Iterator[str]:
    """``dsn`` as a role that may use the baton schema but not create anything."""
    role = f"baton_user_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA baton TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON baton.schema_migrations TO {}").format(
            sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_migrate_with_nothing_pending_needs_no_create_privilege(usage_only_dsn: str) -> None:
    done = baton("migrate", "--dsn", usage_only_dsn)
    assert done.returncode == 0, done.stderr
    assert "migrate.done" in done.stderr
    cannot = sql_rows(usage_only_dsn, "SELECT has_database_privilege(current_database(), "
                                      "'CREATE')")
    assert cannot == [(False,)]
