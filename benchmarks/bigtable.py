"""Drain and enqueue speed beside a big history: an empty jobs table against one holding
10 million finished jobs and 1 million finished workflows.

    python -m benchmarks.bigtable [--jobs 10000000] [--workflows 1000000] [--n 50000]
                                  [--rounds 3] [--dsn ADMIN_DSN] [--keep] [--reuse]

Two databases on one server (``--dsn``, else ``BATON_DATABASE_URL``, else an embedded
server started for the run): ``bench_bigtable_empty`` and ``bench_bigtable_full``. The
full one is filled in SQL (``INSERT … SELECT generate_series``, then ``VACUUM ANALYZE``):
``--jobs`` finished jobs in all, of which ``--workflows`` x ``--steps`` are the steps of
finished workflows (with their nodes, edges and completions); the rest are plain jobs,
about 90 % completed, 7 % discarded (with an error) and 3 % cancelled, args of about
300 bytes, some tagged, finished over the last ``--days`` days.

Each round runs, on each database in turn (the order alternates between rounds):

- ``enqueue``: ``--n`` no-op jobs by ``enqueue_many`` in batches of 1,000, in jobs/s;
- ``drain``: one in-process worker (concurrency ``--concurrency``, its maintenance loop
  running as leader) runs them, in jobs/s from the worker's start to the last job's end.

Three phases: rounds with the archive off (``archive_after=None``: the big table as it
was), then the archive catching up on the full database (the leader's pass, ``--archive-limit``
jobs at a time, without the pause between passes; then ``VACUUM`` of jobs), then rounds
with the archive on (``archive_after=3600``, the default). The jobs of a round stay (finished),
as they would in production. Prints one JSON line with every figure, the medians and the
ratio full/empty of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import anyio
import psycopg

import baton
from baton.db import quote_schema
from baton.logs import configure_logging
from baton.migrations import migrate_up
from baton.worker import Worker, WorkerSettings
from benchmarks import server
from benchmarks.peers.run_all import db_dsn, drop_db, fresh_db

SCHEMA = "baton"
DATABASES = ("empty", "full")
CHUNK = 1_000_000

# Plain finished jobs, ids from %(first)s to %(last)s: 90 % completed, 7 % discarded with
# one error, 3 % cancelled; one in ten tagged; finished at a time spread over %(days)s days.
FILL_JOBS = """
INSERT INTO {schema}.jobs (id, state, queue, step, args, errors, attempt, max_attempts,
                           tags, inserted_at, scheduled_at, attempted_at, attempted_by,
                           finalized_at)
SELECT i,
       CASE WHEN i %% 100 < 90 THEN 'completed'
            WHEN i %% 100 < 97 THEN 'discarded' ELSE 'cancelled' END,
       CASE WHEN i %% 5 = 0 THEN 'mail' ELSE 'default' END,
       CASE WHEN i %% 5 = 0 THEN 'app.send_mail' ELSE 'app.sync_account' END,
       jsonb_build_object('account_id', i, 'email', 'user' || i || '@example.com',
                          'reason', 'nightly', 'payload', repeat(md5(i::text), 6)),
       CASE WHEN i %% 100 BETWEEN 90 AND 96 THEN jsonb_build_array(jsonb_build_object(
            'attempt', 20, 'at', t, 'error', 'TimeoutError: upstream did not answer'))
            ELSE '[]'::jsonb END,
       CASE WHEN i %% 100 BETWEEN 90 AND 96 THEN 20 ELSE 1 END,
       20,
       CASE WHEN i %% 10 = 0 THEN ARRAY['nightly'] ELSE '{}'::text[] END,
       t - interval '2 seconds', t - interval '2 seconds', t - interval '1 second',
       'bench-worker', t
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS i,
     LATERAL (SELECT now() - make_interval(secs => %(days)s * 86400.0
                                           * (%(total)s - i) / %(total)s) AS t) AS at
"""

# Finished workflows %(first)s to %(last)s, each of %(steps)s steps in a chain, with their
# step jobs (ids after the plain jobs), nodes, edges and completions.
FILL_WORKFLOWS = """
INSERT INTO {schema}.workflows (id, label, state, total_steps, settled_steps,
                                inserted_at, finished_at)
SELECT md5('wf' || w)::uuid, 'nightly-report', 'completed', %(steps)s, %(steps)s,
       t - interval '10 seconds', t
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS w,
     LATERAL (SELECT now() - make_interval(secs => %(days)s * 86400.0
                                           * (%(last_all)s - w) / %(all)s) AS t) AS at;

INSERT INTO {schema}.jobs (id, state, queue, step, args, attempt, max_attempts, workflow_id,
                           workflow_step, inserted_at, scheduled_at, attempted_at,
                           attempted_by, finalized_at)
SELECT %(job_base)s + w * %(steps)s + s, 'completed', 'default', 'app.report_part',
       jsonb_build_object('report', w, 'part', s), 1, 20, md5('wf' || w)::uuid,
       'part' || s, w_at.finished_at - interval '10 seconds',
       w_at.finished_at - interval '10 seconds', w_at.finished_at - interval '5 seconds',
       'bench-worker', w_at.finished_at - make_interval(secs => %(steps)s - s)
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS w,
     generate_series(0, %(steps)s - 1) AS s,
     LATERAL (SELECT now() - make_interval(secs => %(days)s * 86400.0
                                           * (%(last_all)s - w) / %(all)s) AS finished_at
              ) AS w_at;

INSERT INTO {schema}.nodes (workflow_id, name, job_id, step, deps, pending_deps, result,
                            has_result, inserted_at, result_at)
SELECT md5('wf' || w)::uuid, 'part' || s, %(job_base)s + w * %(steps)s + s,
       'app.report_part', CASE WHEN s = 0 THEN '{}'::text[] ELSE ARRAY['part' || (s - 1)] END,
       0, jsonb_build_object('value', jsonb_build_object('rows', w %% 1000)), true,
       now(), now()
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS w,
     generate_series(0, %(steps)s - 1) AS s;

INSERT INTO {schema}.edges (workflow_id, node, dep)
SELECT md5('wf' || w)::uuid, 'part' || s, 'part' || (s - 1)
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS w,
     generate_series(1, %(steps)s - 1) AS s;

INSERT INTO {schema}.completions (workflow_id, name, outcome)
SELECT md5('wf' || w)::uuid, 'part' || s, 'completed'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS w,
     generate_series(0, %(steps)s - 1) AS s;
"""


def render(text: str) -> str:
    """The statement for the benchmark's schema."""
    return text.replace("{schema}", quote_schema(SCHEMA))


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def fill(dsn: str, jobs: int, workflows: int, steps: int, days: float) -> dict[str, Any]:
    """Fill the jobs and workflow tables of ``dsn``; return row counts and sizes."""
    plain = jobs - workflows * steps
    if plain < 0:
        raise SystemExit("--jobs must be at least --workflows x --steps")
    began = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        for first in range(1, plain + 1, CHUNK):
            last = min(plain, first + CHUNK - 1)
            conn.execute(render(FILL_JOBS),
                         {"first": first, "last": last, "total": plain, "days": days})
            err(f"  jobs {last:,} / {plain:,} ({time.perf_counter() - began:.0f} s)")
        per_chunk = max(1, CHUNK // max(1, steps))
        for first in range(1, workflows + 1, per_chunk):
            last = min(workflows, first + per_chunk - 1)
            with conn.transaction():
                for statement in render(FILL_WORKFLOWS).split(";\n"):
                    if statement.strip():
                        conn.execute(statement, {
                            "first": first, "last": last, "last_all": workflows,
                            "all": workflows, "steps": steps, "days": days,
                            "job_base": plain})
            err(f"  workflows {last:,} / {workflows:,} ({time.perf_counter() - began:.0f} s)")
        conn.execute(render("SELECT setval(pg_get_serial_sequence('{schema}.jobs', 'id'),"
                            " (SELECT max(id) FROM {schema}.jobs))"))
        filled = time.perf_counter() - began
        conn.execute(b"VACUUM (ANALYZE)")
        vacuumed = time.perf_counter() - began - filled
        err(f"  vacuum analyze ({vacuumed:.0f} s)")
        sizes = {}
        for table in ("jobs", "workflows", "nodes"):
            name = f"{quote_schema(SCHEMA)}.{table}"
            row = conn.execute(
                f"SELECT pg_total_relation_size('{name}'), pg_relation_size('{name}'),"
                f" (SELECT count(*) FROM {name})").fetchone()
            assert row is not None
            sizes[table] = {"rows": int(row[2]), "total_mb": round(row[0] / 2**20),
                            "heap_mb": round(row[1] / 2**20)}
    return {"fill_s": round(filled), "vacuum_s": round(vacuumed), "tables": sizes}


async def trial(dsn: str, n: int, concurrency: int, archive: bool) -> dict[str, float]:
    """Enqueue ``n`` no-op jobs, then drain them with one worker (its leader archiving
    if ``archive``); jobs/s of each."""
    app = baton.Baton(dsn, schema=SCHEMA, pool_size=max(10, min(40, concurrency // 2 + 4)))
    done = anyio.Event()
    ran = 0

    @app.step(name="bench.bigtable.noop")
    async def noop(i: int) -> None:
        nonlocal ran
        ran += 1
        if ran == n:
            done.set()

    await app.open()
    try:
        began = time.perf_counter()
        for start in range(0, n, 1000):
            await app.enqueue_many(noop.new_many(
                {"i": i} for i in range(start, min(n, start + 1000))))
        enqueued = time.perf_counter() - began
        began = time.perf_counter()
        settings = WorkerSettings(queues={"default": concurrency},
                                  archive_after=3600.0 if archive else None)
        async with Worker(app, settings):
            await done.wait()
            drained = time.perf_counter() - began
    finally:
        await app.close()
    return {"enqueue": round(n / enqueued), "drain": round(n / drained)}


async def archive_all(dsn: str, limit: int) -> dict[str, Any]:
    """Move every job due into the archive as the maintenance leader does (one batch of
    ``limit`` a pass, without the pause between passes), then VACUUM jobs (autovacuum would,
    later); return the time each took and the rows moved."""
    app = baton.Baton(dsn, schema=SCHEMA)
    maintenance = Worker(app, WorkerSettings(archive_limit=limit)).maintenance
    began, moved, passes = time.perf_counter(), 0, 0
    try:
        while done := await maintenance.archive():
            moved += done.get("jobs", 0)
            passes += 1
            if passes % 50 == 0:
                err(f"  moved {moved:,} ({time.perf_counter() - began:.0f} s)")
    finally:
        await app.close()
    archived = time.perf_counter() - began
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(render("VACUUM (ANALYZE) {schema}.jobs"))
        sizes = conn.execute(render(
            "SELECT (SELECT count(*) FROM {schema}.jobs),"
            " (SELECT count(*) FROM {schema}.jobs_archive)")).fetchone()
    assert sizes is not None
    return {"moved": moved, "passes": passes, "archive_s": round(archived),
            "rows_per_s": round(moved / archived) if archived else 0,
            "vacuum_s": round(time.perf_counter() - began - archived),
            "hot_rows": sizes[0], "archived_rows": sizes[1]}


def trials(dsns: dict[str, str], args: argparse.Namespace, archive: bool) -> dict[str, Any]:
    """Alternating rounds of :func:`trial` on the empty and the full database."""
    figures: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in DATABASES} for kind in ("enqueue", "drain")}
    for round_no in range(args.rounds):
        order = DATABASES if round_no % 2 == 0 else tuple(reversed(DATABASES))
        for name in order:
            got = anyio.run(trial, dsns[name], args.n, args.concurrency, archive)
            err(f"  round {round_no + 1} {name}: {got}")
            for kind, value in got.items():
                figures[kind][name].append(value)
    median = {kind: {name: statistics.median(v) for name, v in by_db.items()}
              for kind, by_db in figures.items()}
    return {"jobs_per_s": figures, "median": median,
            "ratio_full_to_empty": {kind: round(m["full"] / m["empty"], 3)
                                    for kind, m in median.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"jobs": args.jobs, "workflows": args.workflows,
                              "steps": args.steps, "n": args.n,
                              "concurrency": args.concurrency}
    with server.postgres(args.dsn) as admin:
        result["server"] = server.describe(admin)
        dsns = {}
        for name in DATABASES:
            dsns[name] = (db_dsn(admin, f"bench_bigtable_{name}") if args.reuse
                          else fresh_db(admin, f"bench_bigtable_{name}"))
            migrate_up(dsns[name], SCHEMA)
        if not args.reuse:
            err(f"filling bench_bigtable_full: {args.jobs:,} jobs, "
                f"{args.workflows:,} workflows")
            result["fill"] = fill(dsns["full"], args.jobs, args.workflows, args.steps,
                                  args.days)
        if not args.skip_before:
            err("before the archive (archive_after=None)")
            result["before_archive"] = trials(dsns, args, archive=False)
        err("archiving bench_bigtable_full")
        result["archive"] = anyio.run(archive_all, dsns["full"], args.archive_limit)
        err(f"  {result['archive']}")
        err("after the archive (archive_after=3600)")
        result["after_archive"] = trials(dsns, args, archive=True)
        if not args.keep:
            for name in DATABASES:
                drop_db(admin, f"bench_bigtable_{name}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000_000)
    parser.add_argument("--workflows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=2, help="steps of each workflow")
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--n", type=int, default=50_000, help="jobs per trial")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", default=os.environ.get("BATON_DATABASE_URL"),
                        help="admin DSN; default BATON_DATABASE_URL, else an embedded server")
    parser.add_argument("--archive-limit", type=int, default=50_000,
                        help="jobs a pass moves while the archive catches up")
    parser.add_argument("--skip-before", action="store_true",
                        help="no trials before the archive")
    parser.add_argument("--keep", action="store_true", help="keep the two databases")
    parser.add_argument("--reuse", action="store_true",
                        help="run the trials on the databases a --keep run left (no fill)")
    args = parser.parse_args()
    configure_logging("warning")
    sys.stdout.write(json.dumps(run(args)) + "\n")


if __name__ == "__main__":
    main()
