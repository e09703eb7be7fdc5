"""Steps the unique-job tests enqueue, and the body of each racing process."""

from __future__ import annotations

from typing import Any

import anyio

import baton

app = baton.Baton()


@app.step(unique=True)
async def refresh(account: int, reason: str = "") -> int:
    return account


@app.step(unique=baton.Unique(keys=["user_id"]))
async def notify(user_id: int, text: str) -> None: ...


@app.step(unique=baton.Unique(keys=[], period=60))
async def rebuild() -> None: ...


@app.step(unique=baton.Unique(states=["available", "scheduled", "executing", "retryable",
                                      "completed"]))
async def once(name: str) -> None: ...


@app.step
async def plain(n: int) -> int:
    return n


@app.step(max_attempts=1)
async def fail(n: int) -> None:
    raise RuntimeError(f"step {n} fails")


def race(dsn: str, barrier: Any, results: Any, many: bool) -> None:
    """One racing process: wait for the others, then insert the same unique job 50 times at
    once (50 concurrent enqueues, or one enqueue_many of 50); report (id, duplicate)s."""
    racer = baton.Baton(dsn, pool_size=10)
    job = refresh.new(account=7)

    async def main() -> list[tuple[int, bool]]:
        await racer.open()
        got: list[tuple[int, bool]] = []

        async def one() -> None:
            job_id = await racer.enqueue(job)
            got.append((int(job_id), job_id.duplicate))

        barrier.wait()
        if many:
            ids = await racer.enqueue_many([job] * 50)
            got = [(i, ids.is_duplicate(n)) for n, i in enumerate(ids)]
        else:
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
        await racer.close()
        return got

    results.put(anyio.run(main))
