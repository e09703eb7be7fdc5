"""Steps for tests that run ``baton worker`` as a real subprocess."""

from __future__ import annotations

import anyio

import baton

app = baton.Baton()


@app.step(max_attempts=3)
async def hold_first_attempt(ctx: baton.Context) -> int:
    """Hang on the first attempt (until the process is killed); succeed after."""
    if ctx.attempt == 1:
        await anyio.sleep(3600)
    return ctx.attempt


@app.step
async def quick(n: int) -> int:
    return n


@app.step(max_attempts=3)
def hold_thread_first_attempt(ctx: baton.Context) -> int:
    """A plain def step that blocks its thread on the first attempt (until the process
    ends); succeeds after."""
    import time

    if ctx.attempt == 1:
        time.sleep(3600)
    return ctx.attempt


@app.step(max_attempts=3)
async def paid(path: str) -> dict[str, int]:
    """A paid call: each run appends a line to ``path``."""
    with open(path, "a") as calls:
        calls.write("called\n")
    return {"answer": 42}
