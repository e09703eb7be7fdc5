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
THREAD_GATES: dict[str, threading.Event] = {}
STARTED_THREADS: dict[str, threading.Event] = {}
SPANS: defaultdict[str, list[tuple[int, float, float]]] = defaultdict(list)
"""(attempt, start, end) of each run of a step that records its span, by key."""
_lock = threading.Lock()


def reset() -> None:
    CALLS.clear()
    RUNNING.clear()
    PEAK.clear()
    GATES.clear()
    STARTED.clear()
    for gate in THREAD_GATES.values():  # never leave a thread blocked
        gate.set()
    THREAD_GATES.clear()
    STARTED_THREADS.clear()
    SPANS.clear()


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
async def gated_snoozer(key: str, ctx: baton.Context) -> None:
    """Wait for the gate named ``key``, then snooze 0 s the first time (available again at
    once), complete the next."""
    CALLS[key].append((ctx.attempt, ctx.snoozes))
    STARTED.setdefault(key, anyio.Event()).set()
    await GATES.setdefault(key, anyio.Event()).wait()
    if ctx.snoozes == 0:
        raise baton.Snooze(0)


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



def thread_gate(key: str) -> threading.Event:
    with _lock:
        return THREAD_GATES.setdefault(key, threading.Event())


@app.step(timeout=0.2, max_attempts=2, backoff=no_wait)
def slow_thread(key: str, ctx: baton.Context) -> int:
    """A plain def step: its first attempt blocks until the test sets the gate ``key``."""
    import time

    start = time.monotonic()
    STARTED_THREADS.setdefault(key, threading.Event())
    if ctx.attempt == 1:
        STARTED_THREADS[key].set()
        thread_gate(key).wait(30)
    else:
        thread_gate(f"{key}:again").set()
    with _lock:
        SPANS[key].append((ctx.attempt, start, time.monotonic()))
    return ctx.attempt


@app.step(timeout=0.1, max_attempts=1)
async def blocks_loop(seconds: float) -> str:
    """Blocks the event loop (a bug in a step): nothing can interrupt it."""
    import time

    time.sleep(seconds)
    return "done"


@app.step(max_attempts=1)
async def blocks_and_checks(seconds: float, ctx: baton.Context) -> None:
    """Blocks the event loop for ``seconds``, then records whether its worker's registry
    row is still alive (read on a connection of its own, the loop still blocked)."""
    import time

    import psycopg

    time.sleep(seconds)
    with psycopg.connect(app.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT w.expires_at > now() FROM baton.worker_registry AS w"
            " JOIN baton.jobs AS j ON j.attempted_by = w.id WHERE j.id = %s",
            (ctx.job_id,)).fetchone()
    CALLS["alive"].append(bool(row and row[0]))
