"""The ``baton`` command line: migrate the schema, run workers, inspect and steer jobs.

Every flag also reads a ``BATON_*`` environment variable (named in its help).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio

from baton import embedded, metrics, render
from baton.app import Baton
from baton.db import check_pooler
from baton.errors import (
    BatonError,
    ConfigurationError,
    DatabaseError,
    OptionsError,
    ResultNotKeptError,
    ResultNotReadyError,
)
from baton.job import Job, JobState
from baton.logs import configure_logging, get_logger
from baton.migrations import migrate_down, migrate_up
from baton.periodic import ScheduleInfo, local_time
from baton.query import Status
from baton.worker import Worker, WorkerSettings, parse_queues, supervisor

log = get_logger("baton.cli")
T = TypeVar("T")


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"BATON_{name}", default)


def load_app(spec: str) -> Baton:
    """Import ``"package.module:attribute"`` (the current folder is importable) and return it.

    :raises ConfigurationError: if the spec is malformed, the module is missing or the
        attribute is not a :class:`Baton` app.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"invalid --app {spec!r}: expected 'package.module:app'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(f"cannot import module {module_name!r} for --app") from exc
        raise
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, Baton):
        raise ConfigurationError(f"{spec!r} is a {type(app).__name__}, not a baton.Baton app")
    return app


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default=_env("DATABASE_URL"),
                        help="PostgreSQL URL [BATON_DATABASE_URL]")
    parser.add_argument("--listen-url", default=_env("LISTEN_URL"),
                        help="direct PostgreSQL URL for LISTEN and the heartbeat, past any "
                             "pooler; default --dsn [BATON_LISTEN_URL]")
    parser.add_argument("--read-url", default=_env("READ_URL"),
                        help="PostgreSQL URL inspection reads from, e.g. a replica; default "
                             "--dsn [BATON_READ_URL]")
    parser.add_argument("--pooler", choices=["transaction"], default=_env("POOLER"),
                        help="'transaction' when --dsn goes through a pooler in transaction "
                             "mode, such as PgBouncer [BATON_POOLER]")
    parser.add_argument("--schema", default=_env("SCHEMA"),
                        help="schema of baton's tables, default 'baton' [BATON_SCHEMA]")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                        help="baton's log level: debug, info (a line per job), warning or "
                             "error; other libraries log warnings [BATON_LOG_LEVEL]")
    parser.add_argument("--log-json", action="store_true",
                        default=_env("LOG_JSON", "") not in ("", "0", "false"),
                        help="log JSON lines, psycopg's too (else human lines, coloured "
                             "on a terminal) [BATON_LOG_JSON]")
    parser.add_argument("--connect-timeout", type=float,
                        default=float(_env("CONNECT_TIMEOUT")) if _env("CONNECT_TIMEOUT") else None,
                        help="seconds to wait for a database that is starting or not reachable "
                             "yet, default the app's (30) [BATON_CONNECT_TIMEOUT]")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for ``baton``."""
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    migrate = sub.add_parser("migrate", help="apply (or revert) the database schema")
    _common(migrate)
    migrate.add_argument("--app", default=_env("APP"), help="take dsn and schema from this app")
    migrate.add_argument("--down", action="store_true", help="revert every migration")
    migrate.add_argument("--target", type=int, default=None, help="stop at this version")

    worker = sub.add_parser("worker", help="run jobs")
    _common(worker)
    worker.add_argument("--app", default=_env("APP"), required=_env("APP") is None,
                        help="the app to run, as 'package.module:app' [BATON_APP]")
    worker.add_argument("--queues", default=_env("QUEUES", "default=10"),
                        help="queues and their concurrency, e.g. default=10,llm=4 "
                             "[BATON_QUEUES]")
    worker.add_argument("--shutdown-grace", type=float,
                        default=float(_env("SHUTDOWN_GRACE", 15.0)),
                        help="seconds running jobs get to finish on SIGTERM "
                             "[BATON_SHUTDOWN_GRACE]")
    worker.add_argument("--poll-interval", type=float, default=float(_env("POLL_INTERVAL", 1.0)),
                        help="fallback fetch interval in seconds [BATON_POLL_INTERVAL]")
    worker.add_argument("--peer-wake-delay", type=float,
                        default=float(_env("PEER_WAKE_DELAY", 0.025)),
                        help="seconds after an insert's NOTIFY at which the worker processes "
                             "not chosen to fetch at once fetch; 0: all at once "
                             "[BATON_PEER_WAKE_DELAY]")
    worker.add_argument("--heartbeat-interval", type=float,
                        default=float(_env("HEARTBEAT_INTERVAL", 2.0)),
                        help="seconds between heartbeats [BATON_HEARTBEAT_INTERVAL]")
    worker.add_argument("--heartbeat-ttl", type=float, default=float(_env("HEARTBEAT_TTL", 10.0)),
                        help="seconds of silence after which a worker's jobs are rescued "
                             "[BATON_HEARTBEAT_TTL]")
    worker.add_argument("--maintenance-interval", type=float,
                        default=float(_env("MAINTENANCE_INTERVAL", 1.0)),
                        help="seconds between leader maintenance passes "
                             "[BATON_MAINTENANCE_INTERVAL]")
    worker.add_argument("--leader-ttl", type=float, default=float(_env("LEADER_TTL", 10.0)),
                        help="seconds a leader's lease lasts unrenewed; after a leader dies, "
                             "another takes over within it [BATON_LEADER_TTL]")
    worker.add_argument("--processes", default=_env("PROCESSES", "1"), metavar="N",
                        help="worker processes to run under a supervisor that restarts "
                             "them, or 'auto' for one per core; default 1 [BATON_PROCESSES]")
    worker.add_argument("--prune-after", type=float,
                        default=float(_env("PRUNE_AFTER")) if _env("PRUNE_AFTER") else None,
                        help="delete finished jobs older than this many seconds "
                             "[BATON_PRUNE_AFTER]")
    worker.add_argument("--archive-after", type=float,
                        default=float(_env("ARCHIVE_AFTER", 3600.0)),
                        help="move finished jobs older than this many seconds into the "
                             "archive; 0 keeps them in jobs [BATON_ARCHIVE_AFTER]")
    status = sub.add_parser("status", help="queues by state and live workers")
    _common(status)
    _inspect(status)

    workflow = sub.add_parser("workflow", help="inspect and resume workflows")
    wf_sub = workflow.add_subparsers(dest="action", required=True)
    show = wf_sub.add_parser("show", help="every step, its state, attempts, duration, cost")
    show.add_argument("id")
    cost = wf_sub.add_parser("cost", help="what a workflow cost, per step and model")
    cost.add_argument("id")
    listing = wf_sub.add_parser("list", help="recent workflows")
    listing.add_argument("--label")
    listing.add_argument("--state", choices=["running", "completed", "failed"])
    listing.add_argument("--limit", type=int, default=20)
    resume = wf_sub.add_parser(
        "resume", help="run a workflow's discarded and cancelled steps again")
    resume.add_argument("id")
    resume.add_argument("--step", action="append", dest="steps", metavar="NAME",
                        help="resume this step and the discarded or cancelled steps "
                             "downstream of it (repeat for more); default: every one")
    for p in (show, cost, listing, resume):
        _common(p)
        _inspect(p)

    job = sub.add_parser("job", help="steer one job")
    job_sub = job.add_subparsers(dest="action", required=True)
    for name, text in (("retry", "make a job that is not running available again"),
                       ("cancel", "cancel a job (a running one is told to stop)")):
        p = job_sub.add_parser(name, help=text)
        p.add_argument("id", type=int)
        _common(p)
        _inspect(p)
    job_show = job_sub.add_parser(
        "show", help="one job: args, state, attempts, every error, its kept result")
    job_show.add_argument("id", type=int)
    job_list = job_sub.add_parser("list", help="recent jobs, newest first")
    job_list.add_argument("--queue")
    job_list.add_argument("--state", choices=[s.value for s in JobState])
    job_list.add_argument("--step", help="the step's registered name")
    job_list.add_argument("--tag", action="append", dest="tags", metavar="TAG",
                          help="only jobs with this tag (repeat: jobs with every one)")
    job_list.add_argument("--limit", type=int, default=20)
    for p in (job_show, job_list):
        _common(p)
        _inspect(p)

    queue = sub.add_parser("queue", help="pause, resume and scale queues in every worker")
    queue_sub = queue.add_subparsers(dest="action", required=True)
    pause = queue_sub.add_parser("pause", help="stop fetching a queue's jobs (running ones "
                                 "finish; new ones are accepted and wait)")
    resume_queue = queue_sub.add_parser("resume", help="fetch a paused queue's jobs again")
    scale = queue_sub.add_parser("scale", help="set how many jobs of a queue each worker "
                                 "serving it runs at once")
    for p in (pause, resume_queue, scale):
        p.add_argument("name", help="the queue")
    scale.add_argument("concurrency", metavar="N",
                       help="a whole number from 1, or 'default' for each worker's own "
                            "--queues setting")
    queues = queue_sub.add_parser("list", help="every queue: paused, scale, jobs by state, "
                                  "live workers")
    limit = queue_sub.add_parser("limit", help="set a queue's limits across all workers "
                                 "(replacing any it had)")
    limit.add_argument("--concurrency", type=int, help="the most jobs executing at once")
    limit.add_argument("--rate", help="the most jobs started in any window, e.g. 20/1s")
    limit.add_argument("--tokens", help="no job starts while the queue's jobs recorded this "
                       "many tokens within the window, e.g. 100000/1m")
    limit.add_argument("--partition-by", metavar="KEY",
                       help="apply every limit to each value of this key of the jobs' args")
    limit.add_argument("--total-concurrency", type=int,
                       help="with --partition-by: the most jobs of the whole queue at once")
    unlimit = queue_sub.add_parser("unlimit", help="remove every limit of a queue")
    for p in (limit, unlimit):
        p.add_argument("name", help="the queue")
    limits = queue_sub.add_parser("limits", help="the limits of every limited queue")
    for p in (pause, resume_queue, scale, queues, limit, unlimit, limits):
        _common(p)
        _inspect(p)

    db = sub.add_parser("db", help="print the database URL, starting the embedded "
                                   "development server if none is set")
    _common(db)
    db.add_argument("--psql", action="store_true", help="open psql on it")
    db.add_argument("psql_args", nargs="*", metavar="PSQL_ARG",
                    help="more arguments for psql, after --, e.g. -- -c 'SELECT 1'")

    served = sub.add_parser("metrics", help="serve Prometheus metrics at /metrics")
    _common(served)
    served.add_argument("--app", default=_env("APP"), help="take dsn and schema from this app")
    served.add_argument("--host", default=_env("METRICS_HOST", "127.0.0.1"),
                        help="address to listen on [BATON_METRICS_HOST]")
    served.add_argument("--port", type=int, default=int(_env("METRICS_PORT", 9464)),
                        help="port to listen on [BATON_METRICS_PORT]")

    board = sub.add_parser("dashboard", help="serve the web dashboard (the 'dashboard' extra)")
    _common(board)
    board.add_argument("--app", default=_env("APP"), help="take dsn and schema from this app")
    board.add_argument("--host", default=_env("DASHBOARD_HOST", "127.0.0.1"),
                       help="address to listen on; beyond this machine needs --token "
                            "[BATON_DASHBOARD_HOST]")
    board.add_argument("--port", type=int, default=int(_env("DASHBOARD_PORT", 8484)),
                       help="port to listen on [BATON_DASHBOARD_PORT]")
    board.add_argument("--token", default=_env("DASHBOARD_TOKEN"),
                       help="secret every request must carry (prefer the variable: a "
                            "command line is visible to other users) [BATON_DASHBOARD_TOKEN]")
    return parser


def cmd_dashboard(args: argparse.Namespace) -> int:
    from baton.dashboard.serve import check_bind, serve

    check_bind(args.host, args.token)  # before anything connects
    serve(_app_for(args), host=args.host, port=args.port, token=args.token)
    return 0


def _inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app", default=_env("APP"), help="take dsn and schema from this app")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _app_for(args: argparse.Namespace) -> Baton:
    app = load_app(args.app) if args.app else Baton(schema=args.schema or "baton")
    if args.schema and args.app and args.schema != app.schema:
        raise ConfigurationError(
            f"--schema {args.schema!r} differs from the app's schema {app.schema!r}"
        )
    if args.dsn:
        app.dsn = args.dsn
    if args.listen_url:
        app.listen_dsn = args.listen_url
    if args.read_url:
        app.read_dsn = args.read_url
    if args.pooler:
        app.pooler = check_pooler(args.pooler)
    if args.connect_timeout is not None:
        app.connect_timeout = args.connect_timeout
    return app


def cmd_migrate(args: argparse.Namespace) -> int:
    app = _app_for(args)
    if args.down:
        reverted = migrate_down(app.dsn, app.schema, target=args.target or 0,
                                connect_timeout=app.connect_timeout)
        log.info("migrate.done", direction="down", versions=reverted, schema=app.schema)
    else:
        applied = migrate_up(app.dsn, app.schema, target=args.target,
                             connect_timeout=app.connect_timeout)
        log.info("migrate.done", direction="up", versions=applied, schema=app.schema)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    app = _app_for(args)
    settings = WorkerSettings(
        queues=parse_queues(args.queues),
        shutdown_grace=args.shutdown_grace,
        poll_interval=args.poll_interval,
        peer_wake_delay=args.peer_wake_delay,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_ttl=args.heartbeat_ttl,
        maintenance_interval=args.maintenance_interval,
        leader_ttl=args.leader_ttl,
        prune_after=args.prune_after,
        archive_after=args.archive_after or None,
        exit_with_threads=True,  # past the grace, end threads that cannot be stopped
    )
    processes = supervisor.parse_processes(args.processes)
    if processes > 1:  # every flag was checked above, once; each child is one worker
        env = {**os.environ, "BATON_DATABASE_URL": app.dsn}  # an embedded one started here
        return supervisor.Supervisor(
            processes, supervisor.worker_command(args.argv), env=env).run()
    ready = supervisor.under_supervisor()
    worker = Worker(app, settings)
    failed: list[Exception] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

                async def watch() -> None:
                    async for signum in signals:
                        log.info("worker.signal", signal=signal.Signals(signum).name)
                        if worker.started.is_set():
                            worker.stop()
                        else:  # still connecting or starting: nothing to wind down yet
                            tg.cancel_scope.cancel()

                tg.start_soon(watch)
                if ready is not None:
                    tg.start_soon(ready, worker.started)
                try:
                    await worker.run()
                except Exception as exc:  # raised below, not wrapped in the task group's
                    failed.append(exc)
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await app.close()

    anyio.run(main)
    if failed:
        raise failed[0]
    return 0


def _out(args: argparse.Namespace, data: Any, human: str) -> int:
    sys.stdout.write((json.dumps(data, indent=2, default=str) if args.json else human) + "\n")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Print the database URL (``--dsn``, ``BATON_DATABASE_URL``, else the embedded
    development server's, started if needed and left running); with ``--psql``, become
    psql on it."""
    url = args.dsn or embedded.development_url()
    if not args.psql:
        sys.stdout.write(url + "\n")
        return 0
    psql = embedded.psql_command()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(psql, [psql, url, *args.psql_args])


def cmd_metrics(args: argparse.Namespace) -> int:
    app = _app_for(args)
    anyio.run(_using(app, lambda: metrics.serve(app, args.host, args.port)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    app = _app_for(args)
    async def read() -> tuple[Status, list[ScheduleInfo]]:
        return await app.query.status(), await app.query.schedules()

    status, schedules = anyio.run(_using(app, read))
    states = ["available", "executing", "scheduled", "retryable", "pending", "completed",
              "discarded", "cancelled"]
    rows = [[q.queue, *(q.counts.get(s, 0) for s in states),
             f"{q.oldest_available_seconds:.1f}s" if q.oldest_available_seconds else "-"]
            for q in status.queues]
    human = render.table(["queue", *states, "oldest available"], rows)
    human += "\n\n" + render.table(
        ["worker", "queues", "last heartbeat"],
        [[w.id, ",".join(f"{k}={v}" for k, v in w.queues.items()), w.heartbeat_at]
         for w in status.workers])
    if status.unrunnable:
        human += ("\n\njobs no live worker can run (no worker serves the queue or knows "
                  "the step):\n")
        human += render.table(["queue", "step", "available"],
                              [[u.queue, u.step, u.jobs] for u in status.unrunnable])
    if schedules:
        human += "\n\nschedules (a past next tick is enqueued late, once, by the next leader):\n"
        human += render.table(
            ["schedule", "cron", "time zone", "step", "next tick", "last tick", "live"],
            [[s.name, s.cron, s.timezone, s.step, local_time(s.next_tick, s.timezone),
              local_time(s.last_tick, s.timezone), "yes" if s.live else "no"]
             for s in schedules])
    data = {**status.model_dump(mode="json"),
            "schedules": [s.model_dump(mode="json") for s in schedules]}
    return _out(args, data, human)


def cmd_workflow(args: argparse.Namespace) -> int:
    app = _app_for(args)
    if args.action == "list":
        views = anyio.run(_using(app, lambda: app.query.workflows(
            label=args.label, state=args.state, limit=args.limit)))
        rows = [[v.id, v.label, v.state, f"{v.settled_steps}/{v.total_steps}",
                 ",".join(v.failed_steps), v.inserted_at] for v in views]
        return _out(args, [v.model_dump(mode="json") for v in views], render.table(
            ["id", "label", "state", "settled", "failed", "inserted"], rows))
    if args.action == "resume":
        resumed = anyio.run(_using(app, lambda: app.resume(args.id, args.steps)))
        human = (f"workflow {args.id} resumed: {', '.join(resumed)}" if resumed
                 else f"workflow {args.id} unchanged (no discarded or cancelled step to resume)")
        return _out(args, {"workflow_id": args.id, "resumed": resumed}, human)
    if args.action == "cost":
        report = anyio.run(_using(app, lambda: app.query.cost(args.id)))
        rows = [[line.step_name, line.model, line.calls, line.input_tokens, line.output_tokens,
                 line.cached_tokens, render.money(line.cost)] for line in report.lines]
        human = render.table(["step", "model", "calls", "input", "output", "cached", "cost"],
                             rows)
        by_model = render.table(["model", "cost"], [[m, render.money(c)] for m, c in
                                                   report.by_model().items()])
        human += f"\n\n{by_model}\n\ntotal: {render.money(report.total_cost)}"
        data = {**report.model_dump(mode="json"), "total_cost": str(report.total_cost)}
        return _out(args, data, human)

    async def both() -> tuple[Any, Any]:
        return await app.query.workflow(args.id), await app.query.cost(args.id)

    view, report = anyio.run(_using(app, both))
    return _out(args, view.model_dump(mode="json"), render.workflow_dag(view, report))


def cmd_job(args: argparse.Namespace) -> int:
    app = _app_for(args)
    if args.action == "show":
        job, result = anyio.run(_using(app, lambda: _job_and_result(app, args.id)))
        return _out(args, {**job.model_dump(mode="json"), **result}, render.job(job, result))
    if args.action == "list":
        jobs = anyio.run(_using(app, lambda: app.query.jobs(
            queue=args.queue, state=args.state, step=args.step, tags=args.tags,
            limit=args.limit)))
        return _out(args, [j.model_dump(mode="json") for j in jobs], render.job_list(jobs))
    action = app.retry if args.action == "retry" else app.cancel
    changed = anyio.run(_using(app, lambda: action(args.id)))
    verb = "retried" if args.action == "retry" else "cancelled"
    human = f"job {args.id} {verb}" if changed else f"job {args.id} unchanged (" + (
        "it is running)" if args.action == "retry" else "it had already finished)")
    return _out(args, {"job_id": args.id, "changed": changed}, human)


def cmd_queue(args: argparse.Namespace) -> int:
    app = _app_for(args)
    if args.action in ("limit", "unlimit", "limits"):
        return _queue_limits(app, args)
    if args.action == "list":
        infos = anyio.run(_using(app, app.list_queues))
        states = ["available", "executing", "scheduled", "retryable", "pending", "completed",
                  "discarded", "cancelled"]
        human = render.table(
            ["queue", "paused", "scale", *states, "workers"],
            [[q.name, "yes" if q.paused else "no", q.concurrency or "-",
              *(q.counts.get(s, 0) for s in states), len(q.workers)] for q in infos])
        serving = [[q.name, w.id, q.concurrency or w.concurrency] for q in infos
                   for w in q.workers]
        if serving:
            human += "\n\n" + render.table(["queue", "worker", "concurrency"], serving)
        return _out(args, [q.model_dump(mode="json") for q in infos], human)
    if args.action == "scale":
        concurrency = _concurrency(args.concurrency)
        control = anyio.run(_using(app, lambda: app.scale_queue(args.name, concurrency)))
        human = f"queue {control.name} scaled to " + (
            f"{control.concurrency} at once per worker" if control.concurrency
            else "each worker's own concurrency")
    else:
        action = app.pause_queue if args.action == "pause" else app.resume_queue
        control = anyio.run(_using(app, lambda: action(args.name)))
        human = f"queue {control.name} " + ("paused" if control.paused else "resumed")
    return _out(args, control.model_dump(mode="json"), human)


def _queue_limits(app: Baton, args: argparse.Namespace) -> int:
    if args.action == "limits":
        found = anyio.run(_using(app, app.queue_limits))
        rows = [[lim.queue, lim.concurrency or "-", lim.rate or "-", lim.tokens or "-",
                 lim.partition_by or "-"] for lim in found]
        return _out(args, [lim.model_dump(mode="json") for lim in found], render.table(
            ["queue", "concurrency", "rate", "tokens", "partition by"], rows))
    if args.action == "unlimit":
        removed = anyio.run(_using(app, lambda: app.unlimit_queue(args.name)))
        human = f"queue {args.name} " + ("has no limits now" if removed else
                                         "unchanged (it had no limits)")
        return _out(args, {"queue": args.name, "changed": removed}, human)
    set_to = anyio.run(_using(app, lambda: app.limit_queue(
        args.name, concurrency=args.concurrency, rate=args.rate, tokens=args.tokens,
        partition_by=args.partition_by, total_concurrency=args.total_concurrency)))
    return _out(args, set_to.model_dump(mode="json"),
                f"queue {set_to.queue} limited: {set_to.describe()}")


def _concurrency(text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise OptionsError("concurrency", f"expected a whole number from 1, or 'default', "
                           f"got {text!r:.80}") from None


async def _job_and_result(app: Baton, job_id: int) -> tuple[Job, dict[str, Any]]:
    """A job and what ``job show`` says of its result: ``result`` when there is one, and
    ``result_kept`` (false, with ``result_missing`` saying why, when there is none)."""
    job = await app.get_job(job_id)
    try:
        return job, {"result_kept": True, "result": await app.result_of(job_id)}
    except (ResultNotReadyError, ResultNotKeptError) as exc:
        return job, {"result_kept": False, "result_missing": str(exc)}


def _using(app: Baton, fn: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    async def run() -> T:
        try:
            return await fn()
        finally:
            await app.close()

    return run


_UNMIGRATED = {"42P01", "3F000"}  # undefined_table, invalid_schema_name


def _expected(exc: BaseException) -> str | None:
    """What to tell the user about ``exc`` (unwrapping a group of one), or ``None`` when it
    is not an error a user can act on."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, DatabaseError) and exc.sqlstate in _UNMIGRATED:
        return f"{exc}; is the schema migrated? run `baton migrate`"
    return str(exc) if isinstance(exc, (BatonError, ValueError)) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    An expected failure (the database cannot be reached or is not migrated, a bad
    ``--app``, ...) is one line on stderr and status 2, never a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a supervisor's children's
    try:
        configure_logging(args.log_level, json=args.log_json)
        handler = {"migrate": cmd_migrate, "worker": cmd_worker, "status": cmd_status,
                   "workflow": cmd_workflow, "job": cmd_job,
                   "queue": cmd_queue, "db": cmd_db, "metrics": cmd_metrics,
                   "dashboard": cmd_dashboard}[args.command]
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = _expected(exc)
        if error is None and args.log_json and isinstance(exc, Exception):
            log.exception("cli.crashed", command=args.command)  # JSON, traceback included
            return 1
        if error is None:
            raise
        if args.log_json:  # the one line is a log record
            log.error("cli.failed", command=args.command, error=error)
        else:
            sys.stderr.write(f"baton: error: {error}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
