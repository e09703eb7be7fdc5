"""Demo: enqueue jobs, run a worker in-process until they finish, and show the rows.

Runs against BATON_DATABASE_URL, or an embedded PostgreSQL when it is unset.
"""

from __future__ import annotations

import sys

import anyio
import structlog

import baton
from baton.logs import configure_logging
from baton.testing import running_worker, wait_for_jobs

app = baton.Baton()
log = structlog.get_logger("demo")


@app.step(queue="default", max_attempts=3, backoff=lambda attempt: 0.5, name="demo.greet")
async def greet(name: str, ctx: baton.Context) -> str:
    if name == "flaky" and ctx.attempt == 1:
        raise RuntimeError("first attempt fails on purpose")
    return f"hello, {name}"


async def main() -> None:
    configure_logging("info")
    app.migrate_sync()
    ids = await app.enqueue_many([greet.new(name=n) for n in ["ada", "grace", "flaky"]])
    async with running_worker(app, queues={"default": 4}):
        jobs = await wait_for_jobs(app, ids, ["completed"])
    out = sys.stdout
    out.write("\njob  state      attempt  errors\n")
    for job in jobs:
        out.write(f"{job.id:<4} {job.state.value:<10} {job.attempt:<8} {len(job.errors)}\n")
    out.write("\nInspect them yourself:\n  SELECT id, state, step, attempt, errors "
              "FROM baton.jobs ORDER BY id;\n")
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
