"""The SQL access layer: named queries, schema quoting and driver-error mapping.

This is the one module that turns query text into statements. Queries live in
``baton/queries/*.sql`` under a ``-- name: noun_verb`` header and use ``%(param)s``
placeholders; ``{schema}`` stands for the validated, quoted schema name.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg_pool import PoolTimeout

from baton.errors import (
    ConfigurationError,
    DatabaseError,
    OutcomeUnknownError,
    UniqueKeyTakenError,
)
from baton.logs import get_logger

log = get_logger("baton.db")

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NAME_RE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def validate_schema(schema: str) -> str:
    """Return ``schema`` if it is a safe schema name, else raise :class:`ConfigurationError`.

    Allowed: lowercase letters, digits and underscores, starting with a letter or
    underscore, at most 63 characters (PostgreSQL's identifier limit).
    """
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"invalid schema name {schema!r}: use 1-63 lowercase letters, digits or "
            "underscores, starting with a letter or underscore"
        )
    return schema


def quote_schema(schema: str) -> str:
    """Return the schema name validated and quoted as an SQL identifier."""
    return '"' + validate_schema(schema) + '"'


def render(text: str, schema: str) -> sql.SQL:
    """Turn query text into a statement for ``schema``."""
    return sql.SQL(text.replace("{schema}", quote_schema(schema)))


@cache
def _load_all() -> dict[str, str]:
    queries: dict[str, str] = {}
    folder = resources.files("baton") / "queries"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text(encoding="utf-8")
        parts = _NAME_RE.split(text)
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice")
            queries[name] = body.strip()
    return queries


class Queries:
    """Every named query, rendered once for one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = validate_schema(schema)
        self._rendered = {name: render(text, schema) for name, text in _load_all().items()}

    def __getitem__(self, name: str) -> sql.SQL:
        return self._rendered[name]

    def channel(self, name: str) -> str:
        """Return the NOTIFY channel ``name`` namespaced by this schema."""
        return channel_name(self.schema, name)


def channel_name(schema: str, name: str) -> str:
    """Return the NOTIFY channel for ``name`` in ``schema`` (``<schema>.<name>``)."""
    return f"{validate_schema(schema)}.{name}"


def describe(exc: BaseException) -> str:
    """Return a one-line description of an error (a driver error's primary message)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        return str(primary)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connection_lost(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the driver reporting a connection that dropped: no reply (and so no
    SQLSTATE) came from the server. Pool errors (a timeout waiting for a connection) are
    not: they happen before anything is sent."""
    return (isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None
            and not isinstance(exc, PoolTimeout))


_UNIQUE_KEY_INDEXES = {"jobs_unique_key_idx": "job", "workflows_unique_key_idx": "workflow"}
"""The indexes that hold unique keys (migration 0011), and what holds a key in each."""


def database_error(exc: psycopg.Error, action: str, *, maybe_done: bool = False
                   ) -> DatabaseError:
    """Return our error for the driver error ``exc`` (raise it ``from exc``).

    ``maybe_done``: a write that commits on its own (or a COMMIT) was sent, so a lost
    connection leaves its outcome unknown (:class:`OutcomeUnknownError`).
    """
    if maybe_done and connection_lost(exc):
        return OutcomeUnknownError(action, describe(exc))
    if isinstance(exc, psycopg.errors.UniqueViolation):
        index = exc.diag.constraint_name
        if index in _UNIQUE_KEY_INDEXES:
            return UniqueKeyTakenError(action, _UNIQUE_KEY_INDEXES[index])
    return DatabaseError(f"{action} failed: {describe(exc)}", sqlstate=exc.sqlstate)


@contextmanager
def translate_errors(action: str, *, maybe_done: bool = False) -> Iterator[None]:
    """Raise :class:`DatabaseError` from any psycopg error inside the block (see
    :func:`database_error` for ``maybe_done``)."""
    try:
        yield
    except psycopg.Error as exc:
        raise database_error(exc, action, maybe_done=maybe_done) from exc


# libpq reports a failed connect without a SQLSTATE (the server's code is not exposed), so
# what can heal is told by its message: the server is not reachable yet, or reached but not
# ready (57P03 "the database system is starting up", 53300 too many clients). Everything
# else (no such database or role, failed authentication, a malformed URL) fails at once.
_HEALS = (
    "Connection refused", "No such file or directory", "timeout expired",
    "Connection timed out", "Network is unreachable", "No route to host",
    "Temporary failure in name resolution", "server closed the connection unexpectedly",
    "Connection reset by peer", "the database system is", "too many clients",
    "connection slots are reserved",
)


def connect_heals(exc: psycopg.Error) -> bool:
    """Whether a failed connect may succeed if tried again later."""
    if not isinstance(exc, psycopg.OperationalError):
        return False  # ProgrammingError: a malformed URL
    text = str(exc)
    return any(marker in text for marker in _HEALS)


def _connect_error(exc: psycopg.Error, waited: float | None = None) -> DatabaseError:
    detail = " ".join(describe(exc).removeprefix("connection failed: ").split())
    if not connect_heals(exc):
        advice = "check the URL (host, port, database, user and password)"
    else:
        advice = "is the server running and reachable at that URL?"
    within = f" within {waited:g} s" if waited else ""
    return DatabaseError(f"could not connect to the database{within}: {detail}; {advice}",
                         sqlstate=exc.sqlstate)


def _next_delay(delay: float) -> float:
    return min(delay * 2, 1.0)


async def connect(dsn: str, timeout: float, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """Open one connection to ``dsn``, retrying failures that can heal for up to
    ``timeout`` seconds; cancellable throughout.

    :raises DatabaseError: at once for a failure that cannot heal (no such database or
        role, authentication, a malformed URL), else once ``timeout`` has passed.
    """
    delay = 0.05
    last: psycopg.Error | None = None
    with anyio.move_on_after(timeout):
        while True:
            try:
                return await psycopg.AsyncConnection.connect(dsn, **kwargs)
            except psycopg.Error as exc:
                if not connect_heals(exc):
                    raise _connect_error(exc) from exc
                last = exc
                log.debug("db.connect_retrying", error=describe(exc), delay=delay)
            await anyio.sleep(delay)
            delay = _next_delay(delay)
    if last is None:  # the first attempt itself outlasted the timeout
        raise DatabaseError(f"could not connect to the database within {timeout:g} s; "
                            "is the server running and reachable at that URL?")
    raise _connect_error(last, timeout) from last


def connect_sync(dsn: str, timeout: float, **kwargs: Any) -> psycopg.Connection[Any]:
    """Open one connection to ``dsn`` from synchronous code, as :func:`connect` does."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        remaining = deadline - time.monotonic()
        # libpq's connect_timeout: whole seconds, at least 2.
        limit: dict[str, Any] = {"connect_timeout": max(2, math.ceil(remaining))
                                 } if timeout > 0 else {}
        try:
            return psycopg.connect(dsn, **limit, **kwargs)
        except psycopg.Error as exc:
            if not connect_heals(exc):
                raise _connect_error(exc) from exc
            if time.monotonic() + delay >= deadline:
                raise _connect_error(exc, timeout) from exc
            log.debug("db.connect_retrying", error=describe(exc), delay=delay)
        time.sleep(delay)
        delay = _next_delay(delay)


# -- connection settings -----------------------------------------------------------------

ENV_LISTEN_URL = "BATON_LISTEN_URL"
"""The URL of the direct connections a worker keeps (LISTEN and its heartbeat) and of
event subscriptions; default the database URL."""
ENV_READ_URL = "BATON_READ_URL"
"""The URL read-only inspection (``app.query``, ``baton status``) reads from, e.g. a
replica; default the database URL."""
ENV_POOLER = "BATON_POOLER"
"""``transaction`` when the database URL goes through a pooler in transaction mode."""

POOLERS = ("transaction",)
"""The poolers baton knows how to work behind (``pooler=``)."""


def check_pooler(pooler: str | None) -> str | None:
    """Return ``pooler`` if baton can work behind it (``None``: a direct connection).

    :raises ConfigurationError: for any other value.
    """
    if pooler is None or pooler in POOLERS:
        return pooler
    raise ConfigurationError(
        f"unknown pooler {pooler!r}: use 'transaction' for a pooler in transaction mode "
        "(PgBouncer's pool_mode = transaction), or None for a direct connection or a "
        "pooler in session mode")


def pooled_options(pooler: str | None) -> dict[str, Any]:
    """Return the connection options for a URL behind ``pooler``.

    Behind a pooler in transaction mode consecutive transactions may run on different
    server sessions, so nothing may be prepared: a statement prepared on one session is
    unknown on the next (PgBouncer before 1.21 does not track them). psycopg prepares a
    statement run often enough, and baton asks for it on its hot queries;
    ``prepare_threshold=None`` turns both off.
    """
    return {"prepare_threshold": None} if pooler == "transaction" else {}
