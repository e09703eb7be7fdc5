"""Steps the workflow tests run."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from pydantic import BaseModel

import baton

app = baton.Baton()
CALLS: defaultdict[str, list[Any]] = defaultdict(list)
_lock = threading.Lock()


def reset() -> None:
    CALLS.clear()


def note(key: str, value: Any) -> None:
    with _lock:
        CALLS[key].append(value)


class Page(BaseModel):
    url: str
    body: str


@app.step
async def fetch(url: str) -> Page:
    note("fetch", url)
    return Page(url=url, body=f"<html>{url}</html>")


@app.step
async def parse(ctx: baton.Context) -> dict[str, Any]:
    page = ctx.result("fetch", Page)
    return {"length": len(page.body), "url": page.url}


@app.step
async def store(ctx: baton.Context) -> str:
    note("store", ctx.results["parse"])
    return "stored"


@app.step
async def value(v: Any) -> Any:
    return v


@app.step
async def join(ctx: baton.Context) -> dict[str, Any]:
    note("join", dict(ctx.results))
    return {"count": len(ctx.results), "failed": ctx.failed_deps}


@app.step
async def spoil(ctx: baton.Context) -> None:
    """Notes how many items its dependency's result had, then changes its copy."""
    seen = ctx.results["root"]
    note("spoil", len(seen["items"]))
    seen["items"].append("changed")


@app.step
async def noop() -> None:
    return None


@app.step
async def cancelled_by_hand(ctx: baton.Context) -> str:
    """Cancel its own job in SQL while it runs, as a person might, then return normally."""
    async with app.connection() as conn:
        await conn.execute("UPDATE baton.jobs SET state = 'cancelled', finalized_at = now() "
                           "WHERE id = %s", (ctx.job_id,))
    return "finished anyway"


@app.step(max_attempts=1)
async def explode(message: str = "boom") -> None:
    raise RuntimeError(message)


def _record_cancel(ctx: baton.Context, reason: str) -> None:
    note("on_dep_cancelled", (ctx.step, reason))


async def _record_discard(ctx: baton.Context, reason: str) -> None:
    note("on_dep_discarded", (ctx.step, reason))


@app.step(on_dep_cancelled=_record_cancel, on_dep_discarded=_record_discard)
async def watcher() -> str:
    note("watcher_ran", 1)
    return "ran"


@app.step(max_attempts=3)
async def paid_call(key: str) -> dict[str, Any]:
    """A step with a side effect that must happen once (think: a paid LLM call)."""
    note(f"paid:{key}", 1)
    return {"answer": 42, "key": key}


@app.step(max_attempts=2, backoff=lambda attempt: 0.0)
async def draft(topic: str, ctx: baton.Context) -> str:
    if ctx.model and ctx.model.startswith("bad"):
        raise RuntimeError(f"{ctx.model} is down")
    return f"{ctx.model}:{topic}"


@app.step
async def synthesize(ctx: baton.Context) -> dict[str, Any]:
    drafts = ctx.results["draft"]
    return {"drafts": drafts, "failed": sorted(ctx.failed_deps)}


@app.step
async def expand(count: int, ctx: baton.Context) -> list[int]:
    more = baton.Workflow()
    for i in range(count):
        more.add(f"item_{i}", value.new(v=i * 10), deps=[ctx.step])
    more.add("collect", join.new(), deps=[f"item_{i}" for i in range(count)])
    await ctx.append(more)
    return list(range(count))


@app.step
async def reader(ctx: baton.Context) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("fetch", "nonexistent_dep"):
        try:
            ctx.result(name)
        except baton.ResultError as exc:
            out[name] = type(exc).__name__
    try:
        await ctx.read_result("no_such_step")
    except baton.ResultError as exc:
        out["no_such_step"] = type(exc).__name__
    try:
        await ctx.read_result("quiet")
    except baton.ResultError as exc:
        out["quiet"] = type(exc).__name__
    out["fetch_url"] = (await ctx.read_result("fetch"))["url"]
    return out


@app.step
async def plain_reader(ctx: baton.Context) -> str:
    try:
        ctx.result("anything")
    except baton.NotInWorkflowError:
        return "not in a workflow"
    return "?"


class RateLimitError(Exception):
    status_code = 429


@app.step(llm=True, queue="llm")
async def rate_limited() -> None:
    raise RateLimitError("slow down")


@app.step
async def modelled(ctx: baton.Context) -> str | None:
    return ctx.model


@app.step(llm=True)
async def ask_llm(prompt: str, ctx: baton.Context) -> dict[str, Any]:
    """A stand-in LLM call: records usage one way and reports more in its result."""
    ctx.record_usage(model="model-a", input_tokens=1000, output_tokens=200, cached_tokens=400)
    ctx.capture(prompt=prompt, response="an answer", temperature=0.2)
    return {"answer": f"re: {prompt}",
            "__usage__": {"model": "mystery-model", "input_tokens": 10, "output_tokens": 5}}


@app.step
async def after_llm(ctx: baton.Context) -> Any:
    return ctx.results["ask"]


@app.step(max_attempts=1, capture=True)
async def paid_then_fails(ctx: baton.Context) -> None:
    ctx.record_usage(model="model-b", input_tokens=2_000_000, output_tokens=0)
    ctx.capture(prompt="p", response=None)
    raise RuntimeError("provider returned garbage")


HOLDS: dict[str, Any] = {}


@app.step
async def hold(key: str) -> str:
    """Wait until the test sets the anyio event ``HOLDS[key]``."""
    import anyio

    await HOLDS.setdefault(key, anyio.Event()).wait()
    note(key, "done")
    return key


@app.step
async def recorded(key: str) -> str:
    note(key, "ran")
    return key
