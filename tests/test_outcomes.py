"""Database failures out of the public API: always baton's DatabaseError, with its SQLSTATE;
a write whose reply was lost is OutcomeUnknownError, and an idempotency key makes its retry
safe. The lost replies are real: a proxy between client and server drops them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import anyio
import psycopg
import pytest

import baton
from baton.errors import DatabaseError, OutcomeUnknownError
from tests.apps import basic, flows
from tests.helpers import sql_rows
from tests.proxy import Proxy, statement_contains, statement_is


@pytest.fixture
def proxy(dsn: str) -> Iterator[Proxy]:
    with Proxy(dsn) as running:
        yield running


@pytest.fixture
async def proxied(proxy: Proxy) -> AsyncIterator[baton.Baton]:
    """An app whose connections go through the proxy."""
    app = baton.Baton(proxy.dsn)
    try:
        yield app
    finally:
        await app.close()


def count_jobs(dsn: str) -> int:
    return int(sql_rows(dsn, "SELECT count(*) FROM baton.jobs")[0][0])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_step_workflow() -> baton.Workflow:
    wf = baton.Workflow("lost-reply")
    wf.add("a", flows.noop.new())
    wf.add("b", flows.noop.new(), deps=["a"])
    return wf


# -- lost replies ----------------------------------------------------------------------------


async def test_lost_reply_to_enqueue_is_outcome_unknown_and_key_makes_retry_safe(
    proxy: Proxy, proxied: baton.Baton, dsn: str
) -> None:
    job = basic.echo.new(value="once")
    proxy.drop_next_reply_after(statement_contains("INSERT INTO"))
    with pytest.raises(OutcomeUnknownError) as lost:
        await proxied.enqueue(job, idempotency_key="order-17")
    assert proxy.fired.is_set()
    assert isinstance(lost.value.__cause__, psycopg.OperationalError)
    assert lost.value.sqlstate is None
    assert count_jobs(dsn) == 1  # the server committed it

    job_id = await proxied.enqueue(job, idempotency_key="order-17")
    assert sql_rows(dsn, "SELECT id, idempotency_key FROM baton.jobs") == [(job_id, "order-17")]
    assert await proxied.enqueue(job, idempotency_key="order-18") != job_id
    assert count_jobs(dsn) == 2


def test_lost_reply_to_enqueue_sync_is_outcome_unknown(proxy: Proxy, dsn: str) -> None:
    app = baton.Baton(proxy.dsn)
    try:
        proxy.drop_next_reply_after(statement_contains("INSERT INTO"))
        with pytest.raises(OutcomeUnknownError):
            app.enqueue_sync(basic.echo.new(value=1), idempotency_key="k")
        assert count_jobs(dsn) == 1
        job_id = app.enqueue_sync(basic.echo.new(value=1), idempotency_key="k")
    finally:
        app.close_sync()
    assert sql_rows(dsn, "SELECT id FROM baton.jobs") == [(job_id,)]


def test_lost_commit_reply_of_insert_sync_is_outcome_unknown(proxy: Proxy, dsn: str) -> None:
    app = baton.Baton(proxy.dsn)
    try:
        proxy.drop_next_reply_after(statement_is("COMMIT"))
        with pytest.raises(OutcomeUnknownError) as lost:
            app.insert_sync(two_step_workflow())
        assert isinstance(lost.value.__cause__, psycopg.OperationalError)
    finally:
        app.close_sync()
    assert proxy.fired.is_set()
    assert sql_rows(dsn, "SELECT count(*) FROM baton.workflows") == [(1,)]


async def test_lost_commit_reply_of_a_batch_is_outcome_unknown(
    proxy: Proxy, proxied: baton.Baton, dsn: str
) -> None:
    # A batch large enough for COPY: its COMMIT travels with its last statement.
    proxy.drop_next_reply_after(statement_is("COMMIT"))
    with pytest.raises(OutcomeUnknownError):
        await proxied.enqueue_many([basic.echo.new(value=i) for i in range(100)])
    assert count_jobs(dsn) == 100


async def test_lost_commit_reply_on_a_callers_autocommit_connection(
    proxy: Proxy, dsn: str
) -> None:
    app = baton.Baton(dsn)
    try:
        async with await psycopg.AsyncConnection.connect(proxy.dsn, autocommit=True) as conn:
            proxy.drop_next_reply_after(statement_is("COMMIT"))
            with pytest.raises(OutcomeUnknownError):
                await app.insert(two_step_workflow(), conn=conn)
    finally:
        await app.close()
    assert sql_rows(dsn, "SELECT count(*) FROM baton.workflows") == [(1,)]


async def test_lost_connection_before_the_commit_is_a_plain_database_error(
    proxy: Proxy, proxied: baton.Baton, dsn: str
) -> None:
    job_id = await proxied.enqueue(basic.echo.new(value="stay"))
    # cancel runs in a transaction: losing it before its COMMIT loses the cancel, surely.
    proxy.drop_next_reply_after(statement_contains("state = 'cancelled'"))
    with pytest.raises(DatabaseError) as lost:
        await proxied.cancel(job_id)
    assert proxy.fired.is_set()
    assert not isinstance(lost.value, OutcomeUnknownError)
    assert sql_rows(dsn, "SELECT state FROM baton.jobs") == [("available",)]


async def test_lost_reply_to_a_read_is_a_plain_database_error(
    proxy: Proxy, proxied: baton.Baton
) -> None:
    job_id = await proxied.enqueue(basic.echo.new(value="read"))
    proxy.drop_next_reply_after(statement_contains("FROM \"baton\".jobs"))
    with pytest.raises(DatabaseError) as lost:
        await proxied.get_job(job_id)
    assert not isinstance(lost.value, OutcomeUnknownError)
    assert isinstance(lost.value.__cause__, psycopg.OperationalError)


async def test_proxy_cut_all_closes_both_sides(proxy: Proxy) -> None:
    async with await psycopg.AsyncConnection.connect(proxy.dsn) as conn:
        assert proxy.connections == 1
        proxy.cut_all()
        assert proxy.connections == 0
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
    async with await psycopg.AsyncConnection.connect(proxy.dsn) as conn:  # new ones work
        assert await (await conn.execute("SELECT 1")).fetchall() == [(1,)]


# -- server errors and failed connects --------------------------------------------------------


async def test_failed_commit_of_a_connection_block_carries_its_sqlstate(
    app: baton.Baton,
) -> None:
    with pytest.raises(DatabaseError) as failed:
        async with app.connection() as conn:
            await conn.execute("CREATE TEMP TABLE once (x int UNIQUE DEFERRABLE INITIALLY "
                               "DEFERRED) ON COMMIT DROP")
            await conn.execute("INSERT INTO once VALUES (1), (1)")  # checked at COMMIT
    assert failed.value.sqlstate == "23505"
    assert not isinstance(failed.value, OutcomeUnknownError)
    assert isinstance(failed.value.__cause__, psycopg.errors.UniqueViolation)


def test_failed_commit_of_a_sync_connection_block_carries_its_sqlstate(dsn: str) -> None:
    app = baton.Baton(dsn)
    try:
        with pytest.raises(DatabaseError) as failed, app.connection_sync() as conn:
            conn.execute("CREATE TEMP TABLE once (x int UNIQUE DEFERRABLE INITIALLY "
                         "DEFERRED) ON COMMIT DROP")
            conn.execute("INSERT INTO once VALUES (1), (1)")
    finally:
        app.close_sync()
    assert failed.value.sqlstate == "23505"


async def test_statement_errors_carry_their_sqlstate(app: baton.Baton) -> None:
    async with app.connection() as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1 / 0")  # the caller's own statement: its own error
        with pytest.raises(DatabaseError) as failed:
            await app.enqueue(basic.echo.new(value=1), conn=conn)
        await conn.rollback()
    assert failed.value.sqlstate == "25P02"  # in a failed transaction


async def test_missing_database_fails_at_once_with_a_plain_database_error(dsn: str) -> None:
    app = baton.Baton(psycopg.conninfo.make_conninfo(dsn, dbname="baton_no_such_db"),
                      connect_timeout=600)
    with anyio.fail_after(60):  # far less than connect_timeout: no waiting it out
        with pytest.raises(DatabaseError) as failed:
            await app.enqueue(basic.echo.new(value=1))
    assert type(failed.value) is DatabaseError
    assert "does not exist" in str(failed.value)
    assert not app.is_open


async def test_unreachable_server_is_retried_until_connect_timeout() -> None:
    app = baton.Baton(f"postgresql://baton@127.0.0.1:{closed_port()}/baton",
                      connect_timeout=0.5)
    with pytest.raises(DatabaseError) as failed:
        await app.open()
    assert type(failed.value) is DatabaseError
    assert "within 0.5 s" in str(failed.value) and "Connection refused" in str(failed.value)
    assert isinstance(failed.value.__cause__, psycopg.OperationalError)


def test_sync_api_fails_with_database_error_on_a_missing_database(dsn: str) -> None:
    app = baton.Baton(psycopg.conninfo.make_conninfo(dsn, dbname="baton_no_such_db"),
                      connect_timeout=600)
    with pytest.raises(DatabaseError, match="does not exist"):
        app.get_job_sync(1)


async def test_opening_is_cancellable_while_the_server_is_unreachable() -> None:
    app = baton.Baton(f"postgresql://baton@127.0.0.1:{closed_port()}/baton",
                      connect_timeout=600)
    with anyio.move_on_after(0.3) as scope:
        await app.open()
    assert scope.cancelled_caught and not app.is_open


# -- idempotency keys -------------------------------------------------------------------------


async def test_same_key_concurrently_gives_one_job(app: baton.Baton) -> None:
    job = basic.echo.new(value="race")
    async with await psycopg.AsyncConnection.connect(app.dsn) as first:
        first_id = await app.enqueue(job, conn=first, idempotency_key="race")  # not committed
        second: list[int] = []
        async with anyio.create_task_group() as tg:
            async def enqueue_again() -> None:
                second.append(await app.enqueue(job, idempotency_key="race"))

            tg.start_soon(enqueue_again)
            # The second insert waits on the unique index for the first transaction.
            while not sql_rows(app.dsn, "SELECT 1 FROM pg_locks WHERE NOT granted"):
                await anyio.sleep(0.01)
            await first.commit()
    assert second == [first_id]
    assert count_jobs(app.dsn) == 1


async def test_key_in_a_rolled_back_transaction_is_free_again(app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(app.dsn) as conn:
        await app.enqueue(basic.echo.new(value=1), conn=conn, idempotency_key="k")
        await conn.rollback()
    job_id = await app.enqueue(basic.echo.new(value=2), idempotency_key="k")
    assert (await app.get_job(job_id)).args == {"value": 2}
    assert await app.enqueue(basic.echo.new(value=3), idempotency_key="k") == job_id
    assert count_jobs(app.dsn) == 1


async def test_bad_idempotency_keys_are_refused(app: baton.Baton) -> None:
    for key in ["", "k" * 256]:
        with pytest.raises(baton.OptionsError, match="idempotency_key"):
            await app.enqueue(basic.echo.new(value=1), idempotency_key=key)
    assert count_jobs(app.dsn) == 0
