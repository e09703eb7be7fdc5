"""The dashboard's pages, actions and live event stream, as a Starlette app."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

import anyio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from baton import connections, metrics
from baton.app import Baton
from baton.dashboard import graph, reads
from baton.dashboard.guard import CSRF_FIELD, AuthHook, Guard, csrf_ok, csrf_token, same_site
from baton.errors import (
    BatonError,
    DatabaseError,
    JobNotFound,
    NoSuchStepError,
    QueueNotFound,
    WorkflowNotFound,
)
from baton.logs import get_logger
from baton.ops import Op

log = get_logger("baton.dashboard")

T = TypeVar("T")
HERE = Path(__file__).parent
MAX_FORM_BYTES = 4096
KEEPALIVE_SECONDS = 15.0

NOTICES = {
    "retried": "Job made available again.",
    "not_retried": "The job is running: it was not retried.",
    "cancelled": "Cancelled.",
    "not_cancelled": "It had already finished: nothing was cancelled.",
    "resumed": "Workflow resumed.",
    "nothing_to_resume": "No step was discarded or cancelled: nothing to resume.",
    "paused": "Queue paused.",
    "unpaused": "Queue resumed.",
}


class Dashboard:
    """What the pages share: the baton app, the read connection, the templates."""

    def __init__(self, app: Baton, *, read_dsn: str | None, max_streams: int,
                 title: str) -> None:
        self.app = app
        self.read_dsn = read_dsn
        self.max_streams = max_streams
        self.streams = 0
        self.title = title
        self.router: Router | None = None
        self._read_pool: AsyncConnectionPool | None = None
        self._lock = anyio.Lock()
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(when=_when, clock=_clock, ago=_ago, pretty=_pretty,
                                seconds=_seconds)

    async def read(self, op: Op[T], action: str) -> T:
        """Run a read-only operation: on ``read_dsn`` when one is set, else the app's reads."""
        if self.read_dsn is not None:
            async with self._lock:
                if self._read_pool is None:
                    self._read_pool = await connections.open_pool(
                        self.read_dsn, name=f"baton-{self.app.schema}-dashboard", size=4,
                        timeout=self.app.connect_timeout)
            async with connections.lend(self._read_pool, autocommit=True, write=False) as conn:
                return await connections.execute(conn, op, action, write=False, commits=True)
        return await self.app._inspect(op, action)  # on the app's own read_dsn

    async def close(self) -> None:
        """Close the read pool and the app's pools."""
        if self._read_pool is not None:
            await self._read_pool.close()
            self._read_pool = None
        await self.app.close()

    def page(self, request: Request, template: str, status_code: int = 200,
             **context: Any) -> HTMLResponse:
        """Render a page (every value escaped)."""
        def url(name: str, /, query: dict[str, Any] | None = None, **params: Any) -> str:
            path = self.path(request, name, **params)
            kept = {k: v for k, v in (query or {}).items() if v not in (None, "")}
            return path + ("?" + urlencode(kept) if kept else "")

        notice = NOTICES.get(request.query_params.get("notice", ""))
        html = self.env.get_template(template).render(
            request=request, url=url, csrf=csrf_token(request), csrf_field=CSRF_FIELD,
            title=self.title, notice=notice, **context)
        return HTMLResponse(html, status_code=status_code)

    def path(self, request: Request, name: str, /, **params: Any) -> str:
        """The path of one of the dashboard's routes, under wherever it is mounted (looked up
        in its own routes: the app it is mounted in may have routes of the same names)."""
        assert self.router is not None
        found = self.router.url_path_for(name, **{k: str(v) for k, v in params.items()})
        return str(request.scope.get("root_path", "")) + str(found)

    def problem(self, request: Request, status_code: int, message: str) -> HTMLResponse:
        return self.page(request, "problem.html", status_code, message=message)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _clock(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    moment = moment.astimezone(UTC)
    if moment.date() == datetime.now(UTC).date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return _seconds((datetime.now(UTC) - moment).total_seconds()) + " ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = max(value, 0.0)
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.0f} h"
    return f"{value / 86400:.0f} d"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def _workflow_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(str(request.path_params["workflow_id"]))
    except ValueError:
        raise WorkflowNotFound(str(request.path_params["workflow_id"])) from None


def _job_id(request: Request) -> int:
    job_id: int = request.path_params["job_id"]
    if job_id >= 2**63:  # beyond bigint: no such job
        raise JobNotFound(job_id)
    return job_id


def _opt(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or None


async def _form(request: Request) -> dict[str, str] | None:
    """The fields of an action's form, or None if it is not this site's own."""
    if not same_site(request):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    return fields if csrf_ok(request, fields.get(CSRF_FIELD)) else None


class EventStream(Response):
    """Server-sent events of one workflow: a snapshot of its steps, then every event the
    app's subscription brings, until the browser goes away."""

    media_type = "text/event-stream"

    def __init__(self, dashboard: Dashboard, workflow_id: uuid.UUID) -> None:
        super().__init__(headers={"cache-control": "no-store", "x-accel-buffering": "no"})
        del self.headers["content-length"]  # a stream of unknown length
        self.dashboard = dashboard
        self.workflow_id = workflow_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        board = self.dashboard
        if board.streams >= board.max_streams:
            await Response("too many live pages open", status_code=503)(scope, receive, send)
            return
        board.streams += 1
        lock = anyio.Lock()

        async def emit(text: str) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": text.encode(),
                            "more_body": True})

        try:
            async with board.app.events.subscribe(self.workflow_id) as events:
                # Listening already: read the steps now, so nothing between is missed.
                detail = await board.read(reads.workflow(board.app.sql, self.workflow_id),
                                          "dashboard snapshot")
                await send({"type": "http.response.start", "status": 200,
                            "headers": self.raw_headers})
                await emit("retry: 2000\n" + _sse("snapshot", _snapshot(detail)))
                async with anyio.create_task_group() as tg:
                    async def until_gone() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        tg.cancel_scope.cancel()

                    async def keepalive() -> None:
                        while True:
                            await anyio.sleep(KEEPALIVE_SECONDS)
                            await emit(": keepalive\n\n")

                    tg.start_soon(until_gone)
                    tg.start_soon(keepalive)
                    try:
                        async for event in events:
                            await emit(_sse(event.type, event.model_dump(mode="json")))
                    except DatabaseError as exc:  # one a reconnect cannot heal: end the
                        # stream; the browser comes back, and is told why if it persists
                        log.warning("dashboard.stream_failed", workflow_id=str(self.workflow_id),
                                    error=str(exc))
                    tg.cancel_scope.cancel()
        finally:
            board.streams -= 1


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def _snapshot(detail: reads.WorkflowDetail) -> dict[str, Any]:
    wf = detail.workflow
    return {"workflow": {"state": wf.state, "settled_steps": wf.settled_steps,
                         "total_steps": wf.total_steps},
            "steps": [{"step_name": s.step_name, "state": s.state, "attempt": s.attempt,
                       "job_id": s.job_id, "error": s.last_error} for s in detail.steps]}


def routes(board: Dashboard) -> list[BaseRoute]:
    """The dashboard's routes."""
    q = board.app.sql

    async def overview(request: Request) -> Response:
        registered = sorted({s.options.queue for s in board.app.steps.values()})
        data = await board.read(reads.overview(q, registered), "dashboard overview")
        return board.page(request, "overview.html", view=data)

    async def jobs(request: Request) -> Response:
        filters = {name: _opt(request, name) for name in ("queue", "state", "step", "tag")}
        before_text = _opt(request, "before")
        try:
            before = int(before_text) if before_text else None
            rows = await board.read(reads.jobs(
                q, queue=filters["queue"], state=filters["state"], step=filters["step"],
                tag=filters["tag"], before=before), "dashboard jobs")
        except ValueError as exc:
            return board.problem(request, 400, str(exc))
        more = rows[-1].id if len(rows) == reads.PAGE_SIZE else None
        return board.page(request, "jobs.html", jobs=rows, filters=filters, more=more,
                          states=[*reads.UNFINISHED, *reads.FINISHED])

    async def job(request: Request) -> Response:
        detail = await board.read(reads.job(q, _job_id(request)), "dashboard job")
        return board.page(request, "job.html", detail=detail, job=detail.job)

    async def job_action(request: Request) -> Response:
        job_id = _job_id(request)
        action: str = request.path_params["action"]
        if await _form(request) is None:
            return board.problem(request, 403, "refused: not a form of this dashboard")
        if action == "retry":
            notice = "retried" if await board.app.retry(job_id) else "not_retried"
        elif action == "cancel":
            notice = "cancelled" if await board.app.cancel(job_id) else "not_cancelled"
        else:
            return board.problem(request, 404, f"no action {action!r}")
        log.info("dashboard.job_action", job_id=job_id, action=action, outcome=notice)
        return _back(board, request, "job", notice, job_id=job_id)

    async def workflows(request: Request) -> Response:
        state, label = _opt(request, "state"), _opt(request, "label")
        before_at, before_id = _opt(request, "before_at"), _opt(request, "before_id")
        try:
            before = (datetime.fromisoformat(before_at), uuid.UUID(before_id)) \
                if before_at and before_id else None
            rows = await board.read(reads.workflows(q, state=state, label=label,
                                                    before=before), "dashboard workflows")
        except ValueError as exc:
            return board.problem(request, 400, str(exc))
        more = None
        if len(rows) == reads.PAGE_SIZE:
            last = rows[-1]
            moment = last.inserted_at if state in (None, "running") else last.finished_at
            more = {"before_at": moment.isoformat() if moment else None,
                    "before_id": str(last.id)}
        return board.page(request, "workflows.html", workflows=rows, state=state or "running",
                          label=label, more=more)

    async def workflow(request: Request) -> Response:
        wid = _workflow_id(request)
        detail = await board.read(reads.workflow(q, wid), "dashboard workflow")
        drawn = None
        if len(detail.steps) <= graph.MAX_DRAWN:
            drawn = graph.layout([graph.StepShape(s.step_name, s.deps, s.group_name, s.state)
                                  for s in detail.steps])
        return board.page(request, "workflow.html", detail=detail, wf=detail.workflow,
                          drawn=drawn)

    async def workflow_events(request: Request) -> Response:
        wid = _workflow_id(request)
        return EventStream(board, wid)

    async def workflow_action(request: Request) -> Response:
        wid = _workflow_id(request)
        action: str = request.path_params["action"]
        if await _form(request) is None:
            return board.problem(request, 403, "refused: not a form of this dashboard")
        if action == "resume":
            notice = "resumed" if await board.app.resume(wid) else "nothing_to_resume"
        elif action == "cancel":
            notice = "cancelled" if await board.app.cancel_workflow(wid) else "not_cancelled"
        else:
            return board.problem(request, 404, f"no action {action!r}")
        log.info("dashboard.workflow_action", workflow_id=str(wid), action=action,
                 outcome=notice)
        return _back(board, request, "workflow", notice, workflow_id=wid)

    async def step(request: Request) -> Response:
        wid = _workflow_id(request)
        detail = await board.read(reads.step(q, wid, request.path_params["name"]),
                                  "dashboard step")
        return board.page(request, "step.html", detail=detail, wf=detail.workflow,
                          node=detail.step, job=detail.job)

    async def queue_action(request: Request) -> Response:
        name: str = request.path_params["name"]
        action: str = request.path_params["action"]
        if await _form(request) is None:
            return board.problem(request, 403, "refused: not a form of this dashboard")
        if action == "pause":
            await board.app.pause_queue(name)
        elif action == "resume":
            await board.app.resume_queue(name)
        else:
            return board.problem(request, 404, f"no action {action!r}")
        log.info("dashboard.queue_action", queue=name, action=action)
        return _back(board, request, "overview",
                     "paused" if action == "pause" else "unpaused")

    found: list[BaseRoute] = [
        Route("/", overview, name="overview"),
        Route("/jobs", jobs, name="jobs"),
        Route("/jobs/{job_id:int}", job, name="job"),
        Route("/jobs/{job_id:int}/{action}", job_action, methods=["POST"], name="job_action"),
        Route("/workflows", workflows, name="workflows"),
        Route("/workflows/{workflow_id}", workflow, name="workflow"),
        Route("/workflows/{workflow_id}/events", workflow_events, name="workflow_events"),
        Route("/workflows/{workflow_id}/steps/{name:path}", step, name="step"),
        Route("/workflows/{workflow_id}/{action}", workflow_action, methods=["POST"],
              name="workflow_action"),
        Route("/queues/{name}/{action}", queue_action, methods=["POST"], name="queue_action"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    found.append(Route("/metrics", _Asgi(metrics.asgi_app(board.app)), name="metrics"))
    return found


class _Asgi:
    """An ASGI function as a route's endpoint (a plain function would be taken for a
    request handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _back(board: Dashboard, request: Request, name: str, notice: str, **params: Any
          ) -> RedirectResponse:
    path = board.path(request, name, **params)
    return RedirectResponse(f"{path}?notice={notice}", status_code=303)


def build(app: Baton, *, token: str | None, auth: AuthHook | None, read_dsn: str | None,
          max_streams: int, title: str, close_app: bool) -> Starlette:
    """Build the Starlette app (see :func:`baton.dashboard.create_app`)."""
    if token is not None and len(token) < 8:
        raise ValueError("the dashboard token must be at least 8 characters")
    board = Dashboard(app, read_dsn=read_dsn, max_streams=max_streams, title=title)

    async def not_found(request: Request, exc: Exception) -> Response:
        return board.problem(request, 404, str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("dashboard.database_error", path=request.url.path, error=str(exc))
        return board.problem(request, 503, f"the database cannot be read: {exc}")

    async def refused(request: Request, exc: Exception) -> Response:
        return board.problem(request, 400, str(exc))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_app:
                await board.close()

    web = Starlette(routes=routes(board), lifespan=lifespan, exception_handlers={
        JobNotFound: not_found, WorkflowNotFound: not_found, NoSuchStepError: not_found,
        QueueNotFound: not_found, DatabaseError: unavailable, BatonError: refused,
    })
    web.state.dashboard = board
    board.router = web.router
    web.add_middleware(Guard, token=token, auth=auth)
    return web
