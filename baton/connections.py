"""Pooled connections: opening a pool, lending its connections, running operations on them,
and what a failure on the way becomes.

Every database failure leaves here as :class:`~baton.errors.DatabaseError`, raised from the
driver's error: a pool checkout that times out, a statement, a COMMIT. A write whose
connection was lost once it may have committed (a statement in autocommit, a COMMIT) is
:class:`~baton.errors.OutcomeUnknownError`; a loss before that is a plain DatabaseError,
since the server rolls back what it never saw committed.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, TypeVar

import anyio
import psycopg
import pydantic_core
from psycopg import pq, sql
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from baton import ops
from baton.db import connect, connect_sync, connection_lost, describe, translate_errors
from baton.errors import DatabaseError, OutcomeUnknownError

T = TypeVar("T")

BEGIN = sql.SQL("BEGIN")
COMMIT = sql.SQL("COMMIT")
"""An explicit transaction on an autocommit connection, sent in a pipeline with the
statements between them: one round trip for the whole write."""

# A pooled connection that was used moments ago is alive; checking it would cost a round
# trip per checkout. One idle for longer is checked before it is lent (the server may have
# restarted meanwhile).
_IDLE_CHECK_SECONDS = 2.0
_last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

_IN_TRANSACTION = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


async def _reset(conn: psycopg.AsyncConnection[Any]) -> None:
    # Whatever the borrower did, the next one gets a connection whose statements share a
    # transaction: a lend left in autocommit would split an insert into separate commits.
    if conn.autocommit:
        await conn.set_autocommit(False)
    _last_used[conn] = time.monotonic()


def _reset_sync(conn: psycopg.Connection[Any]) -> None:
    if conn.autocommit:
        conn.autocommit = False
    _last_used[conn] = time.monotonic()


def _recently_used(conn: Any) -> bool:
    return time.monotonic() - _last_used.get(conn, float("-inf")) < _IDLE_CHECK_SECONDS


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(pydantic_core.from_json, conn)  # several times faster than json.loads


def _configure_sync(conn: psycopg.Connection[Any]) -> None:
    set_json_loads(pydantic_core.from_json, conn)


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    if not _recently_used(conn):
        await AsyncConnectionPool.check_connection(conn)


def _check_if_idle_sync(conn: psycopg.Connection[Any]) -> None:
    if not _recently_used(conn):
        ConnectionPool.check_connection(conn)


def _pool_timeout(name: str, timeout: float) -> DatabaseError:
    return DatabaseError(f"could not connect to the database within {timeout:g} s (pool "
                         f"{name}); is it running, and is the URL right?")


# -- opening -----------------------------------------------------------------------------


async def open_pool(dsn: str, *, name: str, size: int, timeout: float,
                    options: dict[str, Any] | None = None) -> AsyncConnectionPool:
    """Open an async pool on ``dsn`` and its first connection; cancellable throughout.

    A first connection is made directly, to tell a failure that cannot heal (no such
    database or role, failed authentication, a malformed URL), raised at once, from one that
    can (the server is starting, or not reachable yet), retried for up to ``timeout``; the
    pool itself would retry both until its timeout. ``options`` go to every connect (see
    :func:`baton.db.pooled_options`).

    :raises DatabaseError: if no connection opens.
    """
    probe = await connect(dsn, timeout, **(options or {}))
    await probe.close()
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=size, open=False,
                               check=_check_if_idle, configure=_configure, reset=_reset,
                               name=name, kwargs=options)
    try:
        await pool.open(wait=True, timeout=timeout)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await pool.close()
        if isinstance(exc, PoolTimeout):
            raise _pool_timeout(name, timeout) from exc
        raise
    return pool


def open_pool_sync(dsn: str, *, name: str, size: int, timeout: float,
                   options: dict[str, Any] | None = None) -> ConnectionPool:
    """Open a sync pool, as :func:`open_pool` does an async one."""
    connect_sync(dsn, timeout, **(options or {})).close()
    pool = ConnectionPool(dsn, min_size=1, max_size=size, open=False,
                          check=_check_if_idle_sync, configure=_configure_sync,
                          reset=_reset_sync, name=name, kwargs=options)
    try:
        pool.open(wait=True, timeout=timeout)
    except BaseException as exc:
        pool.close()
        if isinstance(exc, PoolTimeout):
            raise _pool_timeout(name, timeout) from exc
        raise
    return pool


# -- lending -----------------------------------------------------------------------------


@asynccontextmanager
async def lend(pool: AsyncConnectionPool, *, autocommit: bool, write: bool
               ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """Lend a connection of ``pool``; its transaction commits when the block ends cleanly.

    ``write``: the block may have written, so a COMMIT lost on the way leaves an unknown
    outcome (:class:`OutcomeUnknownError`).
    """
    with translate_errors("get a connection"):
        conn = await pool.getconn()
    try:
        if autocommit:
            await conn.set_autocommit(True)  # the pool's reset turns it off again
        yield conn
        if conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            with translate_errors("commit", maybe_done=write and not conn.broken):
                await conn.commit()
    except BaseException:
        if conn.pgconn.transaction_status in _IN_TRANSACTION:
            # A rollback that fails finds the connection broken: the pool drops it.
            with anyio.CancelScope(shield=True), suppress(psycopg.Error):
                await conn.rollback()
        raise
    finally:
        # No shield needed: the connection is idle here, so returning it does no I/O and
        # cannot be cancelled half way (a shield would cost every enqueue ~5 us).
        await pool.putconn(conn)


@asynccontextmanager
async def rolled_back(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """Roll back what an explicit :data:`BEGIN` left open on ``conn`` if the block fails
    (shielded: a cancel must not leave the transaction open on a pooled connection)."""
    try:
        yield
    except BaseException:
        if conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            with anyio.CancelScope(shield=True):
                await conn.rollback()
        raise


@contextmanager
def lend_sync(pool: ConnectionPool, *, autocommit: bool, write: bool
              ) -> Iterator[psycopg.Connection[Any]]:
    """Lend a connection of a sync pool, as :func:`lend` does."""
    with translate_errors("get a connection"):
        conn = pool.getconn()
    try:
        if autocommit:
            conn.autocommit = True
        yield conn
        if conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            with translate_errors("commit", maybe_done=write and not conn.broken):
                conn.commit()
    except BaseException:
        if conn.pgconn.transaction_status in _IN_TRANSACTION:
            with suppress(psycopg.Error):
                conn.rollback()
        raise
    finally:
        pool.putconn(conn)


@asynccontextmanager
async def transaction(conn: psycopg.AsyncConnection[Any], action: str, *, write: bool
                      ) -> AsyncIterator[None]:
    """``conn.transaction()`` on a caller's connection in autocommit, its BEGIN and COMMIT
    failures raised as ours (a write's lost COMMIT: :class:`OutcomeUnknownError`)."""
    tx = conn.transaction()
    with translate_errors(action):
        await tx.__aenter__()
    try:
        yield
    except BaseException as exc:
        await tx.__aexit__(type(exc), exc, exc.__traceback__)  # rolls back
        raise
    with translate_errors(action, maybe_done=write and not conn.broken):
        await tx.__aexit__(None, None, None)


@contextmanager
def transaction_sync(conn: psycopg.Connection[Any], action: str, *, write: bool
                     ) -> Iterator[None]:
    """As :func:`transaction`, on a sync connection."""
    tx = conn.transaction()
    with translate_errors(action):
        tx.__enter__()
    try:
        yield
    except BaseException as exc:
        tx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with translate_errors(action, maybe_done=write and not conn.broken):
        tx.__exit__(None, None, None)


# -- running operations ------------------------------------------------------------------


def _watch(op: ops.Op[T], sent: list[bool]) -> ops.Op[T]:
    """Pass ``op`` through, noting in ``sent`` when a statement carrying a COMMIT goes out."""
    try:
        stmt = next(op)
        while True:
            if isinstance(stmt, ops.Stmt) and stmt.commit:
                sent.append(True)
            stmt = op.send((yield stmt))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _unknown(exc: DatabaseError, action: str) -> DatabaseError:
    """``exc``, or :class:`OutcomeUnknownError` when its cause is a lost connection."""
    cause = exc.__cause__
    if isinstance(exc, OutcomeUnknownError) or not connection_lost(cause):
        return exc
    assert isinstance(cause, psycopg.Error)
    return OutcomeUnknownError(action, describe(cause))


async def execute(conn: psycopg.AsyncConnection[Any], op: ops.Op[T], action: str, *,
                  write: bool, commits: bool) -> T:
    """Run ``op`` on ``conn``. A write whose connection is lost once it may have committed
    (``commits``: each statement commits on its own; else once a statement carrying the
    COMMIT went out) raises :class:`OutcomeUnknownError`."""
    if not write or conn.broken:  # a broken connection sends nothing
        return await ops.run_async(conn, op, action)
    sent: list[bool] = []
    try:
        return await ops.run_async(conn, op if commits else _watch(op, sent), action)
    except DatabaseError as exc:
        if commits or sent:
            raise _unknown(exc, action) from exc.__cause__
        raise


def execute_sync(conn: psycopg.Connection[Any], op: ops.Op[T], action: str, *,
                 write: bool, commits: bool) -> T:
    """As :func:`execute`, on a sync connection."""
    if not write or conn.broken:
        return ops.run_sync(conn, op, action)
    sent: list[bool] = []
    try:
        return ops.run_sync(conn, op if commits else _watch(op, sent), action)
    except DatabaseError as exc:
        if commits or sent:
            raise _unknown(exc, action) from exc.__cause__
        raise
