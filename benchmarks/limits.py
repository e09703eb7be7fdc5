"""What queue limits cost: the fetch of a queue without limits, and one under a limit.

    python -m benchmarks.limits [--n 20000] [--concurrency 100] [--rounds 3] [--dsn DSN]
    python -m benchmarks.limits --plain-only   # also runs on a tree without queue limits

Two measures, on one server, in the schema ``bench_limits`` (dropped first):

- ``claim_us``: one claim of 10 jobs from a queue of 20,000 available ones, as a worker
  sends it (the plain ``jobs_fetch``, or the limited claim: lock, claim and commit in one
  round trip), timed from the client; median and 90th percentile of ``--claims`` claims,
  each handed back before the next.
- ``drain_jobs_per_s``: one worker drains ``--n`` no-op jobs at ``--concurrency``: with no
  limit, under a global concurrency limit that never binds (the limited claim's own cost)
  and under one at half the worker's slots, with the worker's CPU per 1,000 jobs. Rounds
  alternate between the cases.

Compare the no-limit figures with a tree before queue limits (``git worktree add``; run
this file from here with ``PYTHONPATH`` set to that tree and ``--plain-only``).
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
from psycopg import sql

import baton
from baton.logs import configure_logging
from baton.migrations import migrate_up
from baton.worker import Worker, WorkerSettings
from baton.worker.producer import head_params

SCHEMA = "bench_limits"
QUEUE = "default"


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    migrate_up(dsn, SCHEMA)


def make_app(dsn: str) -> tuple[baton.Baton, Any]:
    app = baton.Baton(dsn, schema=SCHEMA, pool_size=40)
    done = {"n": 0, "event": None}

    @app.step(name="bench.limits.noop")
    async def noop(i: int) -> None:
        done["n"] += 1
        if done["n"] == done.get("target") and done["event"] is not None:
            done["event"].set()  # type: ignore[attr-defined]

    app.bench_done = done  # type: ignore[attr-defined]
    return app, noop


async def drain(dsn: str, n: int, concurrency: int, limit: int | None
                ) -> tuple[float, float]:
    """Jobs per second of one worker draining ``n`` no-op jobs, and the worker's CPU
    milliseconds per 1,000 jobs (the server's SQL of a queue without limits is unchanged,
    so a change there shows in the worker's CPU, which other load on the machine leaves
    alone)."""
    reset(dsn)
    app, noop = make_app(dsn)
    if limit is not None:
        await app.limit_queue(QUEUE, concurrency=limit)
    for start in range(0, n, 10_000):
        batch = range(start, min(n, start + 10_000))
        await app.enqueue_many(noop.new_many({"i": i} for i in batch))
    done = app.bench_done  # type: ignore[attr-defined]
    done.update(n=0, target=n, event=anyio.Event())
    settings = WorkerSettings(queues={QUEUE: concurrency})
    async with Worker(app, settings):
        began, cpu = time.perf_counter(), time.process_time()
        await done["event"].wait()
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    await app.close()
    return n / seconds, cpu * 1e6 / n


async def claim_times(dsn: str, claims: int, limited: bool) -> dict[str, float]:
    """Client-side microseconds of one claim of 10 jobs, as the producer sends it."""
    reset(dsn)
    app, noop = make_app(dsn)
    await app.enqueue_many(noop.new_many({"i": i} for i in range(20_000)))
    worker = Worker(app, WorkerSettings(queues={QUEUE: 10}))
    if limited:
        await app.limit_queue(QUEUE, concurrency=1_000_000)
        await worker.limits.load()
    params = {"queue": QUEUE, "demand": 10, "worker_id": worker.id,
              "steps": worker.step_names, **head_params()}
    times: list[float] = []
    async with app.connection(autocommit=True) as conn:
        for _ in range(claims):
            began = time.perf_counter()
            if limited:
                rows = await worker.limits.claim(conn, params)
            else:
                cur = await conn.execute(app.sql["jobs_fetch"], params, prepare=True)
                rows = await cur.fetchall()
            times.append(time.perf_counter() - began)
            await conn.execute(app.sql["jobs_hand_back"], {
                "ids": [row[0] for row in rows], "worker_id": worker.id})
    await app.close()
    times.sort()
    return {"median": round(statistics.median(times) * 1e6, 1),
            "p90": round(times[int(len(times) * 0.9)] * 1e6, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cases: dict[str, int | None] = {"no_limit": None}
    if not args.plain_only:
        cases["limit_not_binding"] = 1_000_000
        cases["limit_half"] = max(1, args.concurrency // 2)
    result: dict[str, Any] = {"n": args.n, "concurrency": args.concurrency,
                              "claim_us": {}, "drain_jobs_per_s": {c: [] for c in cases},
                              "drain_cpu_ms_per_1000": {c: [] for c in cases}}
    result["claim_us"]["no_limit"] = await claim_times(args.dsn, args.claims, limited=False)
    if not args.plain_only:
        result["claim_us"]["limited"] = await claim_times(args.dsn, args.claims, limited=True)
    for _ in range(args.rounds):
        for case, limit in cases.items():
            rate, cpu = await drain(args.dsn, args.n, args.concurrency, limit)
            result["drain_jobs_per_s"][case].append(round(rate))
            result["drain_cpu_ms_per_1000"][case].append(round(cpu, 1))
    for key in ("drain_jobs_per_s", "drain_cpu_ms_per_1000"):
        result[key + "_median"] = {c: statistics.median(v) for c, v in result[key].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--claims", type=int, default=500)
    parser.add_argument("--plain-only", action="store_true",
                        help="only the queue without limits (runs on older trees too)")
    parser.add_argument("--dsn", default=os.environ.get("BATON_DATABASE_URL"))
    args = parser.parse_args()
    configure_logging("warning")
    args.dsn = args.dsn or baton.Baton().dsn  # the embedded development server
    sys.stdout.write(json.dumps(anyio.run(run, args)) + "\n")


if __name__ == "__main__":
    main()
