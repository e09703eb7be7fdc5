"""Serve the dashboard on its own (``baton dashboard``), with uvicorn."""

from __future__ import annotations

from typing import TYPE_CHECKING

from baton.dashboard.guard import is_loopback
from baton.errors import ConfigurationError
from baton.logs import get_logger

if TYPE_CHECKING:
    from baton.app import Baton

log = get_logger("baton.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8484


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token.

    :raises ConfigurationError: if ``host`` is not a loopback address and ``token`` is None.
    """
    if token is None and not (is_loopback(host) or host == "localhost"):
        raise ConfigurationError(
            f"the dashboard would be open to anyone who reaches {host}: pass --token (or "
            "set BATON_DASHBOARD_TOKEN), or bind to 127.0.0.1")


def serve(app: Baton, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          token: str | None = None, read_dsn: str | None = None) -> None:
    """Serve the dashboard of ``app`` until interrupted (Ctrl-C or SIGTERM).

    :raises ConfigurationError: if bound beyond this machine without a token.
    """
    import uvicorn

    from baton.dashboard import create_app

    check_bind(host, token)
    web = create_app(app, token=token, read_dsn=read_dsn, close_app=True)
    log.info("dashboard.serving", url=f"http://{host}:{port}/", token=token is not None)
    uvicorn.run(web, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5, proxy_headers=False)
