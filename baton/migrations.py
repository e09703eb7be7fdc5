"""Schema migrations: numbered SQL files applied in order under an advisory lock.

Each file in ``sql/`` (shipped in the wheel as ``baton/_migrations``) holds an
``-- migrate:up`` section and a ``-- migrate:down`` section. Every statement is idempotent,
so applying a file twice is harmless; applied versions are recorded in
``<schema>.schema_migrations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg

from baton.db import connect_sync, quote_schema, render, translate_errors
from baton.errors import MigrationError
from baton.logs import get_logger

log = get_logger("baton.migrations")

_FILE_RE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_UP = "-- migrate:up"
_DOWN = "-- migrate:down"


@dataclass(frozen=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str
    up: str
    down: str


def _folder() -> Traversable:
    packaged = resources.files("baton") / "_migrations"
    if packaged.is_dir():
        return packaged
    # A source checkout (editable install): the top-level sql/ folder.
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations() -> list[Migration]:
    """Return every migration in version order."""
    found: list[Migration] = []
    for entry in _folder().iterdir():
        match = _FILE_RE.match(entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        if _UP not in text or _DOWN not in text:
            raise MigrationError(f"{entry.name} needs '{_UP}' and '{_DOWN}' sections")
        up, down = text.split(_UP, 1)[1].split(_DOWN, 1)
        found.append(Migration(int(match.group(1)), match.group(2), up.strip(), down.strip()))
    found.sort(key=lambda m: m.version)
    if not found:
        raise MigrationError("no migration files found; the installation is incomplete")
    return found


def latest_version() -> int:
    """Return the version the code expects the schema to be at."""
    return load_migrations()[-1].version


def _lock(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"baton.migrate.{schema}",))


def _bootstrap(conn: psycopg.Connection[Any], schema: str) -> None:
    # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists:
    # a role that may only create in the schema must not be asked for it.
    exists = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL",
                          (quote_schema(schema),)).fetchone()
    if not exists or not exists[0]:
        conn.execute(render("CREATE SCHEMA {schema}", schema))
    conn.execute(
        render(
            "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())",
            schema,
        )
    )


def applied_versions(conn: psycopg.Connection[Any], schema: str) -> set[int]:
    """Return the versions recorded as applied (empty if baton was never installed)."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{quote_schema(schema)}.schema_migrations",)
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    rows = conn.execute(render("SELECT version FROM {schema}.schema_migrations", schema))
    return {int(r[0]) for r in rows.fetchall()}


def migrate_up(dsn: str, schema: str = "baton", *, target: int | None = None,
               connect_timeout: float = 0.0) -> list[int]:
    """Apply every migration up to ``target`` (default: all) and return those applied.

    The applied versions are read first: with nothing pending no DDL runs, so a role that
    may only use the schema can run it (a deploy step that always migrates).
    ``connect_timeout``: how long to wait for a server that is starting or not reachable yet.

    :raises DatabaseError: if the database cannot be reached or refuses a statement.
    """
    applied: list[int] = []
    # Nothing prepared: behind a pooler, a statement prepared here would stay on a server
    # session that other clients then use.
    with translate_errors("migrate up"), connect_sync(dsn, connect_timeout,
                                              prepare_threshold=None) as conn:
        _lock(conn, schema)
        done = applied_versions(conn, schema)
        pending = [m for m in load_migrations()
                   if m.version not in done and (target is None or m.version <= target)]
        if pending:
            _bootstrap(conn, schema)
        for migration in pending:
            conn.execute(render(migration.up, schema))
            conn.execute(
                render(
                    "INSERT INTO {schema}.schema_migrations (version, name) VALUES (%s, %s)",
                    schema,
                ),
                (migration.version, migration.name),
            )
            applied.append(migration.version)
            log.info("migration.applied", version=migration.version, name=migration.name)
        conn.commit()
    return applied


def migrate_down(dsn: str, schema: str = "baton", *, target: int = 0,
                 connect_timeout: float = 0.0) -> list[int]:
    """Revert applied migrations above ``target`` (default: all) and return those reverted.

    Reverting everything drops the schema's tables and the schema itself if it is empty.
    """
    reverted: list[int] = []
    with translate_errors("migrate down"), connect_sync(dsn, connect_timeout,
                                              prepare_threshold=None) as conn:
        _lock(conn, schema)
        done = applied_versions(conn, schema)
        for migration in reversed(load_migrations()):
            if migration.version <= target or migration.version not in done:
                continue
            conn.execute(render(migration.down, schema))
            conn.execute(
                render("DELETE FROM {schema}.schema_migrations WHERE version = %s", schema),
                (migration.version,),
            )
            reverted.append(migration.version)
            log.info("migration.reverted", version=migration.version, name=migration.name)
        if target == 0 and done:
            conn.execute(render("DROP TABLE IF EXISTS {schema}.schema_migrations", schema))
            conn.execute(render("DROP SCHEMA IF EXISTS {schema} RESTRICT", schema))
        conn.commit()
    return reverted


def check_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Raise :class:`MigrationError` unless the schema is at the latest version."""
    done = applied_versions(conn, schema)
    missing = sorted({m.version for m in load_migrations()} - done)
    if missing:
        raise MigrationError(
            f"schema {schema!r} is missing migrations {missing}; run `baton migrate`"
        )
