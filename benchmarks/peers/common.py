"""Shared result model, job body and workload runner for the peer benchmarks.

Stdlib only: the oban peer imports this module from a separate Python >= 3.12 venv.
Each peer module subclasses :class:`Peer` and calls :func:`main`. The only thing a
peer prints to stdout is the final JSON line; progress and library logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as pkg_version
from typing import Any, TextIO

from benchmarks.peers import dbstats

WORKLOADS = ("enqueue_one", "enqueue_batch", "drain", "latency")
DEFAULT_N = {"enqueue_one": 2000, "enqueue_batch": 2000, "drain": 2000, "latency": 500}
LATENCY_SPACING_S = 0.010
log = logging.getLogger("benchmarks.peers")


@dataclass
class Result:
    """One benchmark measurement; serialised as the peer's last stdout line."""

    system: str
    version: str | None
    workload: str
    n: int
    concurrency: int | None = None
    seconds: float | None = None
    jobs_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    error: str | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        return json.dumps(data, sort_keys=False)


class Tracker:
    """Records job-body executions (start time per job index) for the running workload."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, target: int) -> None:
        self.target = target
        self.calls = 0
        self.started: dict[int, float] = {}
        self.done = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.get_ident()
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def hit(self, i: int) -> None:
        now = time.perf_counter()
        self.calls += 1
        self.started.setdefault(int(i), now)
        if self.target and len(self.started) >= self.target and not self.done.is_set():
            if self._loop is not None and threading.get_ident() != self._thread:
                self._loop.call_soon_threadsafe(self.done.set)
            else:
                self.done.set()


TRACKER = Tracker()


async def noop_job(i: int) -> None:
    """The job body every peer runs: record that job ``i`` started, do nothing else."""
    TRACKER.hit(i)


class Peer(ABC):
    """Adapter from the workload runner to one queue library."""

    system: str = ""
    package: str = ""

    def __init__(self, dsn: str, concurrency: int) -> None:
        self.dsn = dsn
        self.concurrency = concurrency

    @abstractmethod
    async def setup(self) -> None:
        """Open connections and install the library's schema with its own installer."""

    @abstractmethod
    async def enqueue_one(self, i: int) -> None:
        """Enqueue one no-op job carrying index ``i`` with a single library call."""

    @abstractmethod
    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        """Enqueue jobs for all ``ids`` with the library's batch API (one call)."""

    @abstractmethod
    async def start_worker(self) -> None:
        """Start one in-process worker at ``self.concurrency``; return once it runs."""

    @abstractmethod
    async def stop_worker(self) -> None:
        """Stop the worker cleanly."""

    pending_filter: str = ""
    """SQL ``WHERE`` clause selecting the library's jobs not yet in a finished state."""

    @abstractmethod
    async def count(self, where: str) -> int:
        """Rows of the library's job table matching ``where`` (may be empty)."""

    async def pending(self) -> int:
        """Jobs in the library's table not yet in a finished state."""
        return await self.count(self.pending_filter)

    async def total(self) -> int:
        """All jobs in the library's table (to verify enqueues)."""
        return await self.count("")

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    def settings(self) -> dict[str, Any]:
        """Library settings used, reported in the result's ``extra``."""
        return {}


def emit(line: str, stream: TextIO | None = None) -> None:
    """Write one line to stdout (or ``stream``) and flush."""
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


def chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    idx = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[idx]


async def _bounded(coro: Any, timeout: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{what} did not finish within {timeout:.0f}s") from exc


async def _wait_drained(peer: Peer, res: Result, t0: float, timeout: float) -> None:
    """After all bodies ran, poll the library table until it reports every job finished."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        left = await peer.pending()
        if left == 0:
            res.extra["seconds_until_table_done"] = round(time.perf_counter() - t0, 4)
            return
        await asyncio.sleep(0.02)
    res.extra["table_pending_after_wait"] = await peer.pending()


async def _run_workers(peer: Peer, res: Result, args: argparse.Namespace) -> None:
    n, timeout = args.n, args.timeout
    if args.workload == "drain":
        for ids in chunks(n, args.batch_size):
            await _bounded(peer.enqueue_batch(ids), timeout, "pre-enqueue")
        TRACKER.reset(n)
        before = await dbstats.snapshot(peer.dsn)
        rss = dbstats.RssSampler()
        sampler = asyncio.create_task(rss.run(lambda: len(TRACKER.started), n))
        t0 = time.perf_counter()
        await _bounded(peer.start_worker(), 60, "worker start")
        try:
            await _bounded(TRACKER.done.wait(), timeout, f"drain of {n} jobs")
            res.seconds = time.perf_counter() - t0
            first, last = min(TRACKER.started.values()), max(TRACKER.started.values())
            res.extra["first_job_after_s"] = round(first - t0, 4)
            # Throughput once running: first to last job start (worker start-up excluded).
            if last > first:
                res.extra["steady_jobs_per_s"] = round((n - 1) / (last - first), 1)
            await _wait_drained(peer, res, t0, 30)
            # The window ends when the table says done; the idle worker's polling during
            # the settle of the lagged counters is included (small against n jobs).
            res.extra["db"] = dbstats.per_job(
                dbstats.delta(before, await dbstats.snapshot(peer.dsn)), n
            )
            await asyncio.wait_for(sampler, 5)
            res.extra["worker"] = rss.report()
        finally:
            sampler.cancel()
            res.extra["bodies_run"] = len(TRACKER.started)
            res.extra["duplicate_runs"] = TRACKER.calls - len(TRACKER.started)
            await _bounded(peer.stop_worker(), 60, "worker stop")
        return
    TRACKER.reset(n)
    await _bounded(peer.start_worker(), 60, "worker start")
    try:
        await asyncio.sleep(1.0)  # let the idle worker settle (LISTEN etc.)
        enq: dict[int, float] = {}
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i * LATENCY_SPACING_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            enq[i] = time.perf_counter()
            await _bounded(peer.enqueue_one(i), 30, "enqueue")
        await _bounded(TRACKER.done.wait(), timeout, f"latency run of {n} jobs")
        lat = sorted((TRACKER.started[i] - enq[i]) * 1000 for i in range(n))
        res.p50_ms, res.p99_ms, res.max_ms = (
            round(percentile(lat, 50), 3),
            round(percentile(lat, 99), 3),
            round(lat[-1], 3),
        )
        res.seconds = time.perf_counter() - t0
        res.extra["latency_from"] = "just before the enqueue call"
    finally:
        res.extra["duplicate_runs"] = TRACKER.calls - len(TRACKER.started)
        await _bounded(peer.stop_worker(), 60, "worker stop")


async def run_workload(peer: Peer, res: Result, args: argparse.Namespace) -> None:
    await _bounded(peer.setup(), 120, "schema setup")
    n, timeout = args.n, args.timeout
    if args.workload in ("enqueue_one", "enqueue_batch"):
        t0 = time.perf_counter()
        if args.workload == "enqueue_one":
            for i in range(n):
                await _bounded(peer.enqueue_one(i), 30, "enqueue")
        else:
            for ids in chunks(n, args.batch_size):
                await _bounded(peer.enqueue_batch(ids), timeout, "batch enqueue")
        res.seconds = time.perf_counter() - t0
        res.extra["rows_in_table"] = await peer.total()
        if res.extra["rows_in_table"] != n:
            res.error = f"expected {n} rows, found {res.extra['rows_in_table']}"
    else:
        await _run_workers(peer, res, args)
    if res.seconds and args.workload != "latency":
        res.jobs_per_s = round(n / res.seconds, 1)
    if res.seconds:
        res.seconds = round(res.seconds, 4)


def parse_args(
    argv: Sequence[str] | None = None, defaults: dict[str, int] | None = None
) -> argparse.Namespace:
    defaults = {**DEFAULT_N, **(defaults or {})}
    p = argparse.ArgumentParser(description="Run one peer-queue benchmark workload.")
    p.add_argument("--dsn", required=True, help="DSN of a fresh database for this run")
    p.add_argument("--workload", required=True, choices=list(defaults))
    p.add_argument("--n", type=int, default=None, help="number of jobs")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=300.0, help="per phase, seconds")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = defaults[args.workload]
    return args


def _watchdog(res: Result, seconds: float) -> threading.Timer:
    """Last resort: if the event loop wedges, still print one JSON line and exit."""

    def fire() -> None:
        res.error = f"watchdog: run wedged for {seconds:.0f}s"
        emit(res.to_json())
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


Extra = Callable[[Any, Result, argparse.Namespace], Awaitable[None]]


def main(
    system: str,
    package: str,
    make_peer: Callable[[str, int], Peer],
    extra: dict[str, tuple[int, Extra]] | None = None,
) -> None:
    """CLI entry point shared by all peers: run one workload, print one JSON line.

    ``extra`` maps a system-only workload name to (default n, coroutine function run
    instead of :func:`run_workload`, after nothing but the peer's construction).
    """
    extra = extra or {}
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s %(message)s"
    )
    args = parse_args(defaults={k: v[0] for k, v in extra.items()})
    res = Result(system=system, version=pkg_version(package), workload=args.workload, n=args.n)
    if args.workload in ("drain", "latency"):
        res.concurrency = args.concurrency
    timer = _watchdog(res, 2 * args.timeout + 300)

    async def go() -> None:
        peer = make_peer(args.dsn, args.concurrency)
        res.extra["settings"] = peer.settings()
        try:
            if args.workload in extra:
                await extra[args.workload][1](peer, res, args)
            else:
                await run_workload(peer, res, args)
        finally:
            await _bounded(peer.close(), 30, "close")

    try:
        asyncio.run(go())
    except Exception as exc:  # report any failure in the JSON instead of crashing
        traceback.print_exc(file=sys.stderr)
        res.error = f"{type(exc).__name__}: {exc}"
    timer.cancel()
    emit(res.to_json())
    sys.exit(1 if res.error else 0)
