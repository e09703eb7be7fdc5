"""Small helpers shared by the database tests."""

from __future__ import annotations

import subprocess
from typing import Any

import psycopg


def sql_rows(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one query on a fresh connection and return its rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def reap(proc: subprocess.Popen[Any]) -> None:
    """End ``proc`` if it still runs, and wait for it (a test's ``finally``)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
