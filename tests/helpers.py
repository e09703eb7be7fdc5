"""Small helpers shared by the database tests."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import psycopg


def sql_rows(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one query on a fresh connection and return its rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


ROOT = Path(__file__).resolve().parents[1]


def worker_process(dsn: str, app: str, *args: str) -> subprocess.Popen[Any]:
    """Start ``baton worker --app APP --dsn DSN ARGS...`` as a real process, quiet, that can
    never fall back to an embedded server."""
    env = {k: v for k, v in os.environ.items() if k != "BATON_DATABASE_URL"}
    env["BATON_ENV"] = "production"
    return subprocess.Popen(
        [sys.executable, "-m", "baton", "worker", "--app", app, "--dsn", dsn, *args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def live_workers(dsn: str) -> int:
    """How many workers are alive in the registry now."""
    [(count,)] = sql_rows(dsn, "SELECT count(*) FROM baton.worker_registry "
                               "WHERE expires_at > now()")
    return int(count)


def reap(proc: subprocess.Popen[Any]) -> None:
    """End ``proc`` if it still runs, and wait for it (a test's ``finally``)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


LOCK_WAITERS = ("SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()")


async def both_waiting_on_the_lock(
    dsn: str, workflow_id: uuid.UUID, first: Callable[[], Coroutine[Any, Any, None]],
    second: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run ``first``, then ``second``, each until it waits for the workflow's lock, which
    this holds; then let them go (in that order: row lock waiters queue)."""
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT id FROM baton.workflows WHERE id = %s FOR UPDATE",
                             (workflow_id,))
        async with anyio.create_task_group() as tg:
            for n, go in enumerate((first, second), start=1):
                tg.start_soon(go)
                with anyio.fail_after(10):
                    while sql_rows(dsn, LOCK_WAITERS) != [(n,)]:
                        await anyio.sleep(0.01)
            await holder.rollback()
