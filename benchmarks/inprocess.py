"""An in-process worker's drain with logging unconfigured, and with it configured at warning.

    python -m benchmarks.inprocess [--n 100000] [--concurrency 100] [--rounds 3] [--dsn DSN]

An application that runs ``async with baton.Worker(app)`` and configures no logging must
drain as fast as one that set its logging to warning: baton's per-job lines are at info,
which Python drops before building a record when nothing is configured. (When baton
printed through structlog's defaults instead, the unconfigured case printed every job to
stdout and drained about 11,000 jobs/s against 41,000 at warning.)

Each case runs in a fresh process (logging is set once per process) on a fresh schema:
enqueue ``--n`` no-op jobs, then time one in-process worker from its start until every job
has run, counting the process's CPU time meanwhile. Rounds alternate the order of the
cases; printed are the median jobs/s and CPU ms per 1,000 jobs of each, with every
round's jobs/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import psycopg
from psycopg import sql

import baton
from baton.migrations import migrate_up
from baton.worker import Worker, WorkerSettings

SCHEMA = "bench_inprocess"
CASES = ("unconfigured", "warning")


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    migrate_up(dsn, SCHEMA)


async def drain(dsn: str, n: int, concurrency: int) -> tuple[float, float]:
    """Jobs per second of one in-process worker draining ``n`` no-op jobs, and the
    process's CPU milliseconds per 1,000 jobs (which other load on the machine leaves
    alone, where it slows the wall clock)."""
    app = baton.Baton(dsn, schema=SCHEMA, pool_size=40)
    ran = {"n": 0}
    done = anyio.Event()

    @app.step(name="bench.inprocess.noop")
    async def noop(i: int) -> None:
        ran["n"] += 1
        if ran["n"] == n:
            done.set()

    for start in range(0, n, 10_000):
        batch = range(start, min(n, start + 10_000))
        await app.enqueue_many(noop.new_many({"i": i} for i in batch))
    async with Worker(app, WorkerSettings(queues={"default": concurrency})):
        began, cpu = time.perf_counter(), time.process_time()
        await done.wait()
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    await app.close()
    return n / seconds, cpu * 1e6 / n


def child(args: argparse.Namespace) -> None:
    if args.child == "warning":
        logging.basicConfig(level=logging.WARNING)
    rate, cpu = anyio.run(drain, args.dsn, args.n, args.concurrency)
    sys.stdout.write(json.dumps({"jobs_per_s": rate, "cpu_ms_per_1000": cpu}) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[int]] = {case: [] for case in CASES}
    cpus: dict[str, list[float]] = {case: [] for case in CASES}
    for round_ in range(args.rounds):
        for case in CASES if round_ % 2 == 0 else CASES[::-1]:
            reset(args.dsn)
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.inprocess", "--child", case,
                 "--dsn", args.dsn, "--n", str(args.n), "--concurrency", str(args.concurrency)],
                stdout=subprocess.PIPE, text=True, check=True)
            lines = done.stdout.splitlines()
            if len(lines) != 1:  # the unconfigured worker printed something of its own
                raise SystemExit(f"{case}: expected one line of output, got:\n{done.stdout}")
            figures = json.loads(lines[0])
            rates[case].append(round(figures["jobs_per_s"]))
            cpus[case].append(round(figures["cpu_ms_per_1000"], 1))
    return {"n": args.n, "concurrency": args.concurrency,
            "median_jobs_per_s": {c: round(statistics.median(r)) for c, r in rates.items()},
            "median_cpu_ms_per_1000": {c: statistics.median(r) for c, r in cpus.items()},
            "jobs_per_s": rates, "cpu_ms_per_1000": cpus}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", default=os.environ.get("BATON_DATABASE_URL"))
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.dsn = args.dsn or baton.Baton().dsn  # the embedded development server
    result = run(args)
    for case in CASES:
        rounds = ", ".join(f"{r:,}" for r in result["jobs_per_s"][case])
        sys.stdout.write(f"{case:<13} {result['median_jobs_per_s'][case]:>8,} jobs/s "
                         f"(rounds: {rounds}), "
                         f"{result['median_cpu_ms_per_1000'][case]} CPU ms per 1,000 jobs\n")
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
