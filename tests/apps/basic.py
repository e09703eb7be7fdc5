"""Steps the queue tests run: each records what happened in module-level state."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import datetime
from typing import Any

import anyio

import baton

app = baton.Baton()

CALLS: defaultdict[str, list[Any]] = defaultdict(list)
RUNNING: defaultdict[str, int] = defaultdict(int)
PEAK: defaultdict[str, int] = defaultdict(int)
GATES: dict[str, anyio.Event] = {}
STARTED: dict[str, anyio.Event] = {}
_lock = threading.Lock()


def reset() -> None:
    CALLS.clear()
    RUNNING.clear()
    PEAK.clear()
    GATES.clear()
    STARTED.clear()


def no_wait(attempt: int) -> float:
    return 0.0


@app.step
async def echo(value: Any) -> Any:
    CALLS["echo"].append(value)
    return value


@app.step(queue="ordered")
async def record(key: str, label: str) -> None:
    CALLS[key].append(label)


@app.step(max_attempts=3, backoff=no_wait)
async def flaky(key: str, failures: int, ctx: baton.Context) -> int:
    CALLS[key].append(ctx.attempt)
    if ctx.attempt <= failures:
        raise RuntimeError(f"failure {ctx.attempt}")
    return ctx.attempt


@app.step(max_attempts=2, backoff=no_wait)
async def always_fails() -> None:
    raise ValueError("always")


@app.step
async def snoozer(key: str, seconds: float, ctx: baton.Context) -> None:
    CALLS[key].append((ctx.attempt, ctx.snoozes))
    if ctx.snoozes == 0:
        raise baton.Snooze(seconds)


@app.step
async def canceller() -> None:
    raise baton.Cancel("not needed any more")


@app.step
async def discarder() -> None:
    return baton.Discard("bad input")  # type: ignore[return-value]


@app.step(timeout=0.2, max_attempts=1)
async def too_slow() -> None:
    await anyio.sleep(30)


@app.step(max_attempts=5)
async def blocker(key: str) -> str:
    """Wait until the test opens the gate named ``key``."""
    STARTED.setdefault(key, anyio.Event()).set()
    await GATES.setdefault(key, anyio.Event()).wait()
    CALLS[key].append("done")
    return key


@app.step(queue="limited")
async def counted(key: str, gate: str) -> None:
    with _lock:
        RUNNING[key] += 1
        PEAK[key] = max(PEAK[key], RUNNING[key])
    try:
        await GATES.setdefault(gate, anyio.Event()).wait()
    finally:
        with _lock:
            RUNNING[key] -= 1
    CALLS[key].append(1)


@app.step
def sync_add(a: int, b: int) -> int:
    with _lock:
        CALLS["sync_add"].append(a + b)
    return a + b


@app.step
async def typed(count: int, when: datetime) -> None:
    CALLS["typed"].append((count, when))


@app.step(name="tests.apps.basic.named")
async def named_step() -> None:
    CALLS["named"].append(1)
