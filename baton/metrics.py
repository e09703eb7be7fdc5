"""Prometheus metrics read from the database at each scrape.

Owns the metrics a scrape reports (jobs by queue and state, finished jobs, failures,
retries, run durations, workflows by outcome, LLM calls, tokens and cost), their
counters in ``metrics_counters`` (migration 0017), and the Prometheus text format they are
served in: :func:`asgi_app` for an ASGI server or the dashboard, :func:`serve` for
``baton metrics``.

The counters never read the past: :func:`advance` adds what the rows finished since a
watermark amount to and moves the watermark (the maintenance leader does it every pass,
and so does each scrape), and a scrape reports the counters plus what the rows past the
watermark add, all through indexes on the finish times. Nothing is written when a job
finishes. See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from psycopg.types.json import Jsonb

from baton import ops
from baton.db import Queries
from baton.errors import ConfigurationError, DatabaseError
from baton.logs import get_logger
from baton.ops import Op, Stmt

if TYPE_CHECKING:
    from baton.app import Baton

log = get_logger("baton.metrics")

BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0)
"""Upper bounds (seconds) of the buckets of ``baton_job_duration_seconds``. They are
counted into stored counters, so they are fixed: a change would mix old and new buckets."""

FAILURE_KINDS: tuple[str, ...] = ("error", "timeout", "rescued", "invalid", "result")
"""Kinds of a job's error entries that are failed attempts: the step raised, ran past its
timeout, its worker stopped heartbeating (rescued), its args were invalid or its result
could not be kept. Cancel, discard, budget and workflow entries are decisions, not
failures."""

MAX_LAG = 60.0
"""Seconds an open transaction may hold the counters' watermark back (see
``metrics_horizon`` in baton/queries/metrics.sql)."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format."""

SOURCES: dict[str, str] = {
    "jobs": "metrics_jobs_delta",
    "workflows": "metrics_workflows_delta",
    "step_stats": "metrics_usage_delta",
}
"""Each watermarked table and the query of what its rows add to the counters."""

LIVE_STATES = ("available", "scheduled", "executing", "retryable", "pending")

_READ_ONLY = "25006"
"""SQLSTATE of a write on a read-only server or transaction (a replica)."""

Labels = tuple[tuple[str, str], ...]
"""Label names and values, sorted by name."""


def _labels(raw: dict[str, Any]) -> Labels:
    return tuple(sorted((str(k), "" if v is None else str(v)) for k, v in raw.items()))


def _delta_params(source: str, since: datetime, until: datetime | str) -> dict[str, Any]:
    params: dict[str, Any] = {"since": since, "until": until}
    if source == "jobs":
        params.update(negated_bounds=[-b for b in reversed(BUCKETS)],
                      les=[*map(_number, BUCKETS), "+Inf"], failure_kinds=list(FAILURE_KINDS))
    return params


def advance_op(q: Queries, *, through_age: float | None = None, max_lag: float = MAX_LAG
               ) -> Op[datetime | None]:
    """Add the rows finished since each watermark (up to a horizon before which every
    finish has committed) into ``metrics_counters`` and move the watermarks; return the
    horizon, or ``None`` when another session is advancing them.

    Run it in a transaction of its own: it sets the transaction's isolation level.
    ``through_age``: count at least every row older than this many seconds (the pruner
    deletes them next).
    """
    yield Stmt(q["metrics_read_committed"], {}, rows=False)
    [(horizon,)] = yield Stmt(q["metrics_horizon"], {"max_lag": max_lag,
                                                     "through_age": through_age})
    marks: dict[str, datetime] = dict((yield Stmt(q["metrics_sources_lock"], {})))
    if set(marks) != set(SOURCES):
        return None
    names: list[str] = []
    labels: list[Jsonb] = []
    values: list[Decimal] = []
    for source, query in SOURCES.items():
        if marks[source] >= horizon:
            continue
        for name, label_set, value in (yield Stmt(q[query],
                                                  _delta_params(source, marks[source], horizon))):
            names.append(name)
            labels.append(Jsonb(label_set))
            values.append(Decimal(value))
    yield Stmt(q["metrics_counters_add"], {"names": names, "labels": labels, "values": values,
                                           "horizon": horizon})
    return horizon  # type: ignore[no-any-return]


@dataclass
class Reading:
    """What one scrape read: the counters (stored plus the rows past the watermarks) and
    the gauges."""

    counters: dict[tuple[str, Labels], Decimal] = field(default_factory=dict)
    live: list[tuple[str, str, int, float | None]] = field(default_factory=list)
    """``(queue, state, jobs, oldest_seconds)``; the oldest is for available jobs only."""
    workflows_running: int = 0
    workers: int = 0

    def add(self, name: str, labels: dict[str, Any], value: Any) -> None:
        key = (name, _labels(labels))
        self.counters[key] = self.counters.get(key, Decimal(0)) + Decimal(value)


def read_op(q: Queries) -> Op[Reading]:
    """Read every metric in one snapshot (a transaction of its own: it sets the isolation
    level)."""
    yield Stmt(q["metrics_snapshot"], {}, rows=False)
    marks: dict[str, datetime] = dict((yield Stmt(q["metrics_sources"], {})))
    reading = Reading()
    for name, labels, value in (yield Stmt(q["metrics_counters"], {})):
        reading.add(name, labels, value)
    for source, query in SOURCES.items():
        for name, labels, value in (yield Stmt(q[query],
                                               _delta_params(source, marks[source], "infinity"))):
            reading.add(name, labels, value)
    reading.live = [(queue, state, int(jobs), oldest)
                    for queue, state, jobs, oldest in (yield Stmt(q["jobs_live_counts"], {}))]
    [(running, workers)] = yield Stmt(q["metrics_gauges"], {})
    reading.workflows_running, reading.workers = int(running), int(workers)
    return reading


async def advance(app: Baton, *, through_age: float | None = None) -> bool:
    """Advance the counters' watermarks (see :func:`advance_op`); return whether this call
    did (``False``: another session was doing it).

    :raises DatabaseError: if the database cannot be reached or written.
    """
    async with app.connection() as conn:
        horizon = await ops.run_async(conn, advance_op(app.sql, through_age=through_age),
                                      "advance metrics")
    return _advanced(horizon)


def _advanced(horizon: datetime | None) -> bool:
    if horizon is not None:
        log.debug("metrics.advanced", counted_until=horizon.isoformat())
    return horizon is not None


def _unless_read_only(exc: DatabaseError) -> None:
    """Re-raise ``exc`` (an advance that failed) unless the server is read-only: then the
    scrape reads without advancing."""
    if exc.sqlstate != _READ_ONLY:
        raise exc
    log.debug("metrics.advance_skipped", reason="read-only server")


class Advancer:
    """The maintenance leader's advance of the counters, before each pruning pass.

    With pruning on it advances every pass, first counting every row old enough to be
    pruned, so no pruned row is missing from the counters; with pruning off, every
    ``every`` seconds, so that a scrape (which also advances) never has more than that
    much to read past the watermarks, however rarely it comes.
    """

    def __init__(self, app: Baton, every: float = 10.0) -> None:
        self.app = app
        self.every = every
        self._next = 0.0

    async def before_prune(self, prune_after: float | None) -> None:
        """Advance if pruning is on or ``every`` seconds have passed since the last time.

        :raises DatabaseError: if the database cannot be written (the pass, and so its
            pruning, stops there).
        """
        if prune_after is None and anyio.current_time() < self._next:
            return
        await advance(self.app, through_age=prune_after)
        self._next = anyio.current_time() + self.every


async def collect(app: Baton, *, advance_first: bool = True) -> Reading:
    """Read every metric; first advance the counters unless ``advance_first`` is false (a
    read-only server, such as a replica, is read without advancing).

    :raises DatabaseError: if the database cannot be reached.
    """
    if advance_first:
        try:
            await advance(app)
        except DatabaseError as exc:
            _unless_read_only(exc)
    async with app.connection() as conn:
        return await ops.run_async(conn, read_op(app.sql), "read metrics")


def collect_sync(app: Baton, *, advance_first: bool = True) -> Reading:
    """Read every metric from synchronous code, as :func:`collect` does."""
    if advance_first:
        try:
            with app.connection_sync() as conn:
                _advanced(ops.run_sync(conn, advance_op(app.sql), "advance metrics"))
        except DatabaseError as exc:
            _unless_read_only(exc)
    with app.connection_sync() as conn:
        return ops.run_sync(conn, read_op(app.sql), "read metrics")


async def scrape(app: Baton, *, advance_first: bool = True) -> str:
    """Return every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    return exposition(await collect(app, advance_first=advance_first))


def scrape_sync(app: Baton, *, advance_first: bool = True) -> str:
    """Return every metric in the Prometheus text format, from synchronous code."""
    return exposition(collect_sync(app, advance_first=advance_first))


# -- The text format -----------------------------------------------------------------------

@dataclass
class Family:
    """One metric: its name, type, help and samples ``(name suffix, labels, value)``."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Labels, Decimal | float | int]] = field(default_factory=list)


_COUNTERS: dict[str, tuple[str, str]] = {
    "jobs_finished": ("baton_jobs_finished_total",
                      "Jobs finished (completed, discarded or cancelled), by queue, step and "
                      "final state."),
    "job_retries": ("baton_job_retries_total",
                    "Attempts after the first, of finished jobs, by queue and step."),
    "job_failures": ("baton_job_failures_total",
                     "Failed attempts of finished jobs, by queue, step and kind (error, "
                     "timeout, rescued, invalid, result)."),
    "workflows_finished": ("baton_workflows_finished_total",
                           "Workflow runs finished, by outcome (completed, failed)."),
    "llm_calls": ("baton_llm_calls_total", "Recorded LLM calls (usage records), by model."),
    "llm_tokens": ("baton_llm_tokens_total",
                   "Recorded tokens, by model and kind (input, output, cached, cache_write)."),
    "llm_cost_usd": ("baton_llm_cost_usd_total",
                     "What the priced LLM calls cost, in US dollars, by model."),
}


def families(reading: Reading) -> list[Family]:
    """Turn a reading into metric families, every sample sorted by its labels."""
    gauges = _gauges(reading)
    counters = {internal: Family(name, "counter", text)
                for internal, (name, text) in _COUNTERS.items()}
    duration = Family("baton_job_duration_seconds", "histogram",
                      "Run time of completed jobs, from the claim of their last attempt to "
                      "their recorded finish, by queue.")
    buckets: dict[str, dict[str, Decimal]] = {}
    sums: dict[str, Decimal] = {}
    for (name, labels), value in sorted(reading.counters.items()):
        if name in counters:
            counters[name].samples.append(("", labels, value))
        elif name == "job_duration_bucket":
            named = dict(labels)
            buckets.setdefault(named["queue"], {})[named["le"]] = value
        elif name == "job_duration_sum":
            sums[dict(labels)["queue"]] = value
    for queue in sorted(buckets.keys() | sums.keys()):
        total = Decimal(0)
        for le in [*map(_number, BUCKETS), "+Inf"]:
            total += buckets.get(queue, {}).get(le, Decimal(0))
            duration.samples.append(("_bucket", (("le", le), ("queue", queue)), total))
        duration.samples.append(("_sum", (("queue", queue),), sums.get(queue, Decimal(0))))
        duration.samples.append(("_count", (("queue", queue),), total))
    return [*gauges, *counters.values(), duration]


def _gauges(reading: Reading) -> list[Family]:
    jobs = Family("baton_jobs", "gauge",
                  "Jobs in a live state (available, scheduled, executing, retryable, and "
                  "pending: workflow steps held for their dependencies), by queue.")
    oldest = Family("baton_queue_oldest_available_seconds", "gauge",
                    "How long the oldest available job of each queue has waited to run.")
    counts = {(queue, state): n for queue, state, n, _ in reading.live}
    waits = {queue: age for queue, state, _, age in reading.live if state == "available"}
    queues = {queue for queue, *_ in reading.live} | {
        dict(labels)["queue"] for name, labels in reading.counters if name == "jobs_finished"}
    for queue in sorted(queues):
        for state in LIVE_STATES:
            jobs.samples.append(("", (("queue", queue), ("state", state)),
                                 counts.get((queue, state), 0)))
        oldest.samples.append(("", (("queue", queue),), waits.get(queue) or 0.0))
    running = Family("baton_workflows_running", "gauge", "Workflows running now.",
                     [("", (), reading.workflows_running)])
    workers = Family("baton_workers", "gauge", "Workers with an unexpired heartbeat.",
                     [("", (), reading.workers)])
    return [jobs, oldest, running, workers]


def exposition(reading: Reading) -> str:
    """Return ``reading`` in the Prometheus text exposition format."""
    lines: list[str] = []
    for family in families(reading):
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{family.name}{suffix}{{{text}}} {_number(value)}" if text
                         else f"{family.name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Decimal | float | int) -> str:
    """A sample value or bucket bound as Prometheus reads it (integers without a point)."""
    if isinstance(value, Decimal):
        return str(int(value)) if value == value.to_integral_value() else repr(float(value))
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


# -- Serving -------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def asgi_app(app: Baton, *, advance_first: bool = True) -> ASGIApp:
    """Return an ASGI app that answers ``GET`` with every metric of ``app`` (whatever the
    path: mount it where it should be served, such as ``/metrics``).

    A scrape the database cannot answer gets status 503 (Prometheus records the target as
    down) and a ``metrics.scrape_failed`` warning is logged.
    """

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, body = await _respond(app, scope["method"], "/metrics", advance_first)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", (CONTENT_TYPE if status == 200 else "text/plain").encode()),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    return metrics_app


async def _respond(app: Baton, method: str, path: str, advance_first: bool
                   ) -> tuple[int, bytes]:
    if method not in ("GET", "HEAD"):
        return 405, b"only GET and HEAD are served\n"
    if path == "/":
        return 200, b"baton metrics: scrape /metrics\n"
    if path != "/metrics":
        return 404, b"not found: scrape /metrics\n"
    try:
        return 200, (await scrape(app, advance_first=advance_first)).encode()
    except DatabaseError as exc:
        log.warning("metrics.scrape_failed", error=str(exc))
        return 503, f"metrics unavailable: {exc}\n".encode()
    except Exception:  # a bug: the endpoint answers and says so, and serves the next one
        log.exception("metrics.scrape_failed")
        return 500, b"metrics failed: see the server's log\n"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


async def serve(app: Baton, host: str = "127.0.0.1", port: int = 9464, *,
                advance_first: bool = True,
                task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app``'s metrics over HTTP at ``http://host:port/metrics`` until cancelled.

    A plain HTTP/1.1 server for scrapers: one request per connection. Reports the port it
    listens on (useful with ``port=0``) to ``task_status``.

    :raises ConfigurationError: if it cannot listen there (the port is taken, say).
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; is another "
            "process using the port? choose another with --port") from exc
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)
    log.info("metrics.serving", url=f"http://{host}:{bound}/metrics")
    task_status.started(bound)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(10), suppress(anyio.BrokenResourceError, OSError):
                request = await _read_request(stream)
                if request is None:
                    status, body = 400, b"bad request\n"
                    method = "GET"
                else:
                    method, path = request
                    status, body = await _respond(app, method, path, advance_first)
                head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                        f"Content-Type: {CONTENT_TYPE if status == 200 else 'text/plain'}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                await stream.send(head.encode() + (b"" if method == "HEAD" else body))

    async with listener:
        await listener.serve(handle)


async def _read_request(stream: anyio.abc.SocketStream) -> tuple[str, str] | None:
    """Read a request's head; return its method and path (without the query), or ``None``
    for a malformed or oversized one."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > 16_384:
            return None
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
    parts = data.split(b"\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    return parts[0], parts[1].split("?", 1)[0]
