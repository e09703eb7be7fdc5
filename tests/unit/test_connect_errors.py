"""Which failed connects are worth retrying, and which errors mean a lost connection."""

from __future__ import annotations

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from baton.db import connect_heals, connection_lost, database_error
from baton.errors import DatabaseError, OutcomeUnknownError

SOCKET = 'connection failed: connection to server on socket "/run/.s.PGSQL.5432" failed: '
HOST = 'connection failed: connection to server at "10.0.0.5", port 5432 failed: '


@pytest.mark.parametrize("message", [
    HOST + "Connection refused\n\tIs the server running on that host?",
    'connection is bad: connection to server on socket "/run/.s.PGSQL.5432" failed: '
    "No such file or directory",
    HOST + "timeout expired",
    HOST + "FATAL:  the database system is starting up",
    HOST + "FATAL:  the database system is shutting down",
    HOST + "FATAL:  sorry, too many clients already",
    "connection failed: could not translate host name \"db\" to address: "
    "Temporary failure in name resolution",
])
def test_failures_that_can_heal_are_retried(message: str) -> None:
    assert connect_heals(psycopg.OperationalError(message))


@pytest.mark.parametrize("message", [
    SOCKET + 'FATAL:  database "shop" does not exist',
    HOST + 'FATAL:  password authentication failed for user "shop"',
    SOCKET + 'FATAL:  role "shop" does not exist',
    HOST + 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "shop"',
    "failed to resolve host 'db': [Errno -2] Name or service not known",
])
def test_failures_that_cannot_heal_fail_at_once(message: str) -> None:
    assert not connect_heals(psycopg.OperationalError(message))


def test_a_malformed_url_cannot_heal() -> None:
    assert not connect_heals(psycopg.ProgrammingError('missing "=" after "x"'))


def test_only_a_lost_connection_after_a_write_is_outcome_unknown() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert connection_lost(lost)
    assert isinstance(database_error(lost, "enqueue", maybe_done=True), OutcomeUnknownError)
    plain = database_error(lost, "get job")
    assert type(plain) is DatabaseError and plain.sqlstate is None
    timeout = PoolTimeout("couldn't get a connection after 30.00 sec")
    assert not connection_lost(timeout)  # nothing was sent
    assert type(database_error(timeout, "enqueue", maybe_done=True)) is DatabaseError
