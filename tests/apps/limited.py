"""Steps for the queue limit tests (run in-process and by ``baton worker`` processes)."""

from __future__ import annotations

import anyio

import baton

app = baton.Baton()

QUEUE = "limited"


@app.step(queue=QUEUE)
async def nap(seconds: float, customer: str = "") -> str:
    """Take ``seconds``; ``customer`` is a partition key."""
    await anyio.sleep(seconds)
    return customer


@app.step(queue=QUEUE)
async def spend(tokens: int) -> dict[str, object]:
    """Record a model call that used ``tokens`` (input and output halves)."""
    half = tokens // 2
    return {"__usage__": {"model": "stand-in", "input_tokens": tokens - half,
                          "output_tokens": half}}


@app.step(queue="unlimited")
async def free_nap(seconds: float) -> None:
    await anyio.sleep(seconds)
