"""``baton dashboard``: a web view of queues, jobs, workflows, workers and periodic jobs.

It needs the ``dashboard`` extra (``pip install 'baton[dashboard]'``: Starlette, Jinja2 and
uvicorn). :func:`create_app` returns an ASGI app to mount in your own (``Mount("/baton",
create_app(app, auth=...))``); :func:`serve` runs it on its own, as the ``baton
dashboard`` command does. See ``docs/dashboard.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from baton.errors import ConfigurationError

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed in development
    raise ConfigurationError(
        "the dashboard needs the 'dashboard' extra: pip install 'baton[dashboard]'"
    ) from exc

from baton.dashboard.guard import AuthHook
from baton.dashboard.serve import serve
from baton.dashboard.web import build

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from baton.app import Baton

__all__ = ["AuthHook", "create_app", "serve"]


def create_app(
    app: Baton,
    *,
    token: str | None = None,
    auth: AuthHook | None = None,
    read_dsn: str | None = None,
    max_streams: int = 100,
    title: str = "baton",
    close_app: bool = False,
) -> Starlette:
    """Return the dashboard of ``app`` as an ASGI app, to serve or mount.

    :param token: a secret of at least 8 characters that every request must carry
        (``Authorization: Bearer ...``, or a visit to ``?token=...`` that sets a session
        cookie).
    :param auth: ``auth(request) -> bool`` (or an awaitable of it): requests it accepts
        are let in, as with your own app's login. With neither ``token`` nor ``auth``, only
        requests from this machine (loopback, to ``localhost`` or ``127.0.0.1``) are.
    :param read_dsn: read pages from this database (a read replica; default the app's own
        ``read_dsn`` if it has one, else its ``dsn``). Actions always write through ``app``.
    :param max_streams: the most workflow pages following live events at once (each holds
        one database connection that listens).
    :param title: shown in the page titles.
    :param close_app: close ``app``'s pools when the ASGI server shuts the dashboard down
        (for a dashboard served on its own; a mounted one never sees its lifespan).
    :raises ValueError: if ``token`` is shorter than 8 characters.
    """
    return build(app, token=token, auth=auth, read_dsn=read_dsn, max_streams=max_streams,
                 title=title, close_app=close_app)
