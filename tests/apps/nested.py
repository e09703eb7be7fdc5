"""Steps the sub-workflow tests run."""

from __future__ import annotations

from typing import Any

import baton
from tests.apps.flows import CALLS as CALLS
from tests.apps.flows import note
from tests.apps.flows import reset as reset

app = baton.Baton()


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
