"""Steps for the tests of ``baton worker --processes N`` (real supervisor processes)."""

from __future__ import annotations

import os

import anyio

import baton

app = baton.Baton()


@app.step
async def quick(n: int) -> int:
    return n


@app.step(max_attempts=3)
async def hold_first_attempt(ctx: baton.Context) -> int:
    """Hang on the first attempt (until the process is killed); succeed after."""
    if ctx.attempt == 1:
        await anyio.sleep(3600)
    return ctx.attempt


@app.step
async def until_file(path: str) -> str:
    """Run until ``path`` exists (a test creates it once the worker is stopping)."""
    while not os.path.exists(path):
        await anyio.sleep(0.02)
    return "done"
