"""Migrations: idempotent, versioned, reversible, schema-configurable, race-free."""

from __future__ import annotations

import threading

import pytest

import baton
from baton.migrations import latest_version, migrate_down, migrate_up
from tests.helpers import sql_rows


def test_migrate_is_idempotent_and_recorded(empty_dsn: str) -> None:
    assert migrate_up(empty_dsn) == list(range(1, latest_version() + 1))
    assert migrate_up(empty_dsn) == []
    versions = sql_rows(empty_dsn, "SELECT version FROM baton.schema_migrations ORDER BY 1")
    assert [v for (v,) in versions] == list(range(1, latest_version() + 1))


def test_migrate_down_removes_everything(empty_dsn: str) -> None:
    migrate_up(empty_dsn)
    assert migrate_down(empty_dsn) == list(range(latest_version(), 0, -1))
    assert sql_rows(empty_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'baton'") == [
        (0,)]
    assert migrate_up(empty_dsn)  # and back up again


def test_concurrent_migrations_do_not_race(empty_dsn: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate_up(empty_dsn))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, 0, latest_version()]


def test_custom_schema(empty_dsn: str) -> None:
    migrate_up(empty_dsn, "tenant_a")
    app = baton.Baton(empty_dsn, schema="tenant_a")
    from tests.apps import basic

    try:
        job_id = app.enqueue_sync(basic.echo.new(value=1))
    finally:
        app.close_sync()
    assert sql_rows(empty_dsn, "SELECT id FROM tenant_a.jobs") == [(job_id,)]
    assert sql_rows(empty_dsn, "SELECT to_regclass('baton.jobs') IS NULL") == [(True,)]


@pytest.mark.parametrize("name", ["", "Baton", "1abc", "a-b", 'x"; drop table jobs; --',
                                  "a" * 64, "with space"])
def test_invalid_schema_names_are_refused(name: str) -> None:
    with pytest.raises(baton.ConfigurationError, match="invalid schema name"):
        baton.Baton(schema=name)


def test_unmigrated_database_gives_clear_error(empty_dsn: str) -> None:
    import anyio

    from baton.worker import Worker

    app = baton.Baton(empty_dsn)

    async def start() -> None:
        try:
            await Worker(app).run()
        finally:
            await app.close()

    with pytest.raises(baton.MigrationError, match="baton migrate"):
        anyio.run(start)
