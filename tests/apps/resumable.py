"""Steps the resume tests run: one that fails until the test flips its flag, one that
waits for the test, and ones that count their calls."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import anyio

import baton

app = baton.Baton()
CALLS: Counter[str] = Counter()
FIXED: set[str] = set()
"""Keys whose ``flaky`` step succeeds: the test's fix of the cause."""
HOLDS: dict[str, anyio.Event] = {}
STARTED: dict[str, anyio.Event] = {}
_lock = threading.Lock()


def reset() -> None:
    CALLS.clear()
    FIXED.clear()
    HOLDS.clear()
    STARTED.clear()


def _count(key: str) -> None:
    with _lock:
        CALLS[key] += 1


@app.step(max_attempts=1)
async def flaky(key: str) -> str:
    """Fail (and, on its one attempt, be discarded) until ``key`` is in :data:`FIXED`."""
    _count(key)
    if key not in FIXED:
        raise RuntimeError(f"{key} is broken")
    return f"{key} ok"


@app.step
async def counted(key: str, ctx: baton.Context) -> dict[str, Any]:
    """Count the call; return the results of its dependencies."""
    _count(key)
    return {"key": key, "seen": dict(ctx.results)}


@app.step
async def held(key: str) -> str:
    """Say it started, then wait until the test sets ``HOLDS[key]``."""
    _count(key)
    STARTED.setdefault(key, anyio.Event()).set()
    await HOLDS.setdefault(key, anyio.Event()).wait()
    return key
