"""The SQL access layer: named queries, schema quoting and driver-error mapping.

This is the one module that turns query text into statements. Queries live in
``baton/queries/*.sql`` under a ``-- name: noun_verb`` header and use ``%(param)s``
placeholders; ``{schema}`` stands for the validated, quoted schema name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources

import psycopg
from psycopg import sql

from baton.errors import ConfigurationError, DatabaseError

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


@contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """Raise :class:`DatabaseError` from any psycopg error inside the block."""
    try:
        yield
    except psycopg.Error as exc:
        raise DatabaseError(f"{action} failed: {describe(exc)}") from exc

