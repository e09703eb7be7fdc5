"""Steps the sub-workflow tests run."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import baton

app = baton.Baton()
CALLS: defaultdict[str, list[Any]] = defaultdict(list)
_lock = threading.Lock()


def reset() -> None:
    CALLS.clear()


def note(key: str, value: Any) -> None:
    with _lock:
        CALLS[key].append(value)


@app.step
async def value(v: Any) -> Any:
    return v


@app.step
async def add(n: int, ctx: baton.Context) -> int:
    """Return ``n`` plus every number its dependencies returned."""
    return n + sum(r for r in ctx.results.values() if isinstance(r, int))


@app.step
async def seen(ctx: baton.Context) -> dict[str, Any]:
    """Record and return what the step received from its dependencies."""
    note(ctx.step, dict(ctx.results))
    return dict(ctx.results)


@app.step
async def draft(topic: str, ctx: baton.Context) -> str:
    return f"{ctx.model}:{topic}"


@app.step(max_attempts=1)
async def explode() -> None:
    raise RuntimeError("the child step failed")
