"""Who may see the dashboard and act through it: the token or auth hook, the cross-site
request checks, and the headers every response carries.

- With a ``token``, a request is let in with ``Authorization: Bearer <token>`` or the
  session cookie a visit to any page with ``?token=<token>`` sets (the token then leaves
  the address bar by a redirect). With an ``auth`` hook, whatever the hook accepts is let
  in too. With neither, only clients on the loopback interface that name a loopback host
  are (a page of another site reaching it through DNS rebinding names its own).
- An action (a POST) must carry the form field ``csrf`` equal to the ``baton_csrf`` cookie
  (``SameSite=Strict``, which another site can neither read nor send), and its ``Origin``
  (or ``Sec-Fetch-Site``), when the browser sends one, must be this site.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from ipaddress import ip_address
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

AuthHook = Callable[[Request], bool | Awaitable[bool]]
"""Decides whether a request may see the dashboard (sync or async)."""

SESSION_COOKIE = "baton_dashboard"
CSRF_COOKIE = "baton_csrf"
CSRF_FIELD = "csrf"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address) is on the loopback interface."""
    if not host:
        return False
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(request: Request) -> str:
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_site(request: Request) -> bool:
    """Whether a state-changing request comes from this site (or says nothing of it)."""
    origin = request.headers.get("origin")
    if origin is not None:
        return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()
    site = request.headers.get("sec-fetch-site")
    return site is None or site in ("same-origin", "none")


def csrf_token(request: Request) -> str:
    """The CSRF token of this request's browser (set on the response when new)."""
    token = request.scope.get("baton_csrf")
    assert isinstance(token, str), "the guard sets it on every request"
    return token


def csrf_ok(request: Request, submitted: str | None) -> bool:
    """Whether ``submitted`` is this browser's CSRF token."""
    cookie = request.cookies.get(CSRF_COOKIE)
    return bool(cookie and submitted) and hmac.compare_digest(str(cookie), str(submitted))


class Guard:
    """ASGI middleware: authentication, then security headers and the CSRF cookie."""

    def __init__(self, app: ASGIApp, *, token: str | None, auth: AuthHook | None) -> None:
        if token is not None and len(token) < 8:
            raise ValueError("the dashboard token must be at least 8 characters")
        self.app = app
        self.token = token
        self.auth = auth
        self.session = (hmac.new(token.encode(), b"baton-dashboard-session", hashlib.sha256)
                        .hexdigest() if token else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (the dashboard has no websocket)
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        csrf = request.cookies.get(CSRF_COOKIE)
        new_csrf = not csrf or len(csrf) < 20
        scope["baton_csrf"] = secrets.token_urlsafe(24) if new_csrf else csrf
        path = (scope.get("root_path") or "") + "/"

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if new_csrf:
                    headers.append("set-cookie", _cookie(CSRF_COOKIE, scope["baton_csrf"],
                                                         path, request.url.scheme))
            await send(message)

        given = request.query_params.get("token")
        if given is not None and self.token is not None and request.method in ("GET", "HEAD"):
            await self._login(request, given)(scope, receive, send_guarded)
            return
        refusal = await self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send_guarded)
            return
        await self.app(scope, receive, send_guarded)

    async def _refusal(self, request: Request) -> Response | None:
        if self.token is not None:
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer ") and hmac.compare_digest(
                    bearer[7:].strip().encode(), self.token.encode()):
                return None
            cookie = request.cookies.get(SESSION_COOKIE, "")
            assert self.session is not None
            if cookie and hmac.compare_digest(cookie.encode(), self.session.encode()):
                return None
        if self.auth is not None:
            allowed = self.auth(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if allowed:
                return None
        if self.token is None and self.auth is None:
            client = request.client.host if request.client else None
            if is_loopback(client) and _host_name(request).lower() in LOOPBACK_NAMES:
                return None
            return PlainTextResponse(
                "This dashboard has no token, so it serves only this machine "
                "(127.0.0.1 or localhost). Start it with --token, or pass token= or auth= "
                "to baton.dashboard.create_app.", status_code=403)
        if self.token is None:
            return PlainTextResponse("not allowed (the dashboard's auth hook refused)",
                                     status_code=403)
        if request.method in ("GET", "HEAD") and \
                "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(_LOGIN, status_code=401)
        return PlainTextResponse("a token is required (Authorization: Bearer <token>)",
                                 status_code=401, headers={"www-authenticate": "Bearer"})

    def _login(self, request: Request, given: str) -> Response:
        assert self.token is not None and self.session is not None
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return HTMLResponse(_LOGIN.replace("<!--wrong-->", "<p>Wrong token.</p>"),
                                status_code=401)
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + ("?" + urlencode(rest) if rest else "")
        response = RedirectResponse(target, status_code=303)
        path = (request.scope.get("root_path") or "") + "/"
        response.headers.append("set-cookie", _cookie(SESSION_COOKIE, self.session, path,
                                                      request.url.scheme))
        return response


def _cookie(name: str, value: str, path: str, scheme: str) -> str:
    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["path"] = path
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    if scheme == "https":
        morsel["secure"] = True
    return morsel.OutputString()


_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>baton dashboard</title></head>
<body><h1>baton dashboard</h1><!--wrong-->
<form method="get"><label>Token <input type="password" name="token" autofocus></label>
<button type="submit">Open</button></form></body></html>
"""
