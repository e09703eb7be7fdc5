"""Worker memory across a long drain: RSS of one baton worker every tenth of the way.

    python -m benchmarks.memory [--n 1000000] [--concurrency 100] [--dsn DSN]

Nothing per job is kept by this script, so the RSS it prints is the worker's own. It uses
its own schema, ``bench_memory``, and drops it first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import anyio
import psycopg
from psycopg import sql

import baton
from baton.logs import configure_logging
from baton.migrations import migrate_up
from baton.worker import Worker, WorkerSettings

SCHEMA = "bench_memory"


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def run(dsn: str, n: int, concurrency: int) -> dict[str, object]:
    app = baton.Baton(dsn, schema=SCHEMA)
    state = {"done": 0}
    marks: list[tuple[int, float]] = []
    finished = anyio.Event()

    @app.step(name="bench.memory.noop")
    async def noop(i: int) -> None:
        state["done"] += 1
        if state["done"] % max(1, n // 10) == 0:
            marks.append((state["done"], round(rss_mb(), 1)))
        if state["done"] == n:
            finished.set()

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    migrate_up(dsn, SCHEMA)
    for start in range(0, n, 10_000):
        await app.enqueue_many([noop.new(i=i) for i in range(start, min(n, start + 10_000))])
    marks.append((0, round(rss_mb(), 1)))
    async with Worker(app, WorkerSettings(queues={"default": concurrency})):
        began = time.perf_counter()
        await finished.wait()
        seconds = time.perf_counter() - began
    await app.close()
    first, last = marks[0][1], marks[-1][1]
    return {"n": n, "concurrency": concurrency, "jobs_per_s": round(n / seconds),
            "rss_mb_by_jobs_done": marks, "growth_percent": round((last - first) / first * 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--dsn", default=os.environ.get("BATON_DATABASE_URL"))
    args = parser.parse_args()
    configure_logging("warning")
    dsn = args.dsn or baton.Baton().dsn  # the embedded development server
    result = anyio.run(run, dsn, args.n, args.concurrency)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
