"""Shared result model, job body and workload runner for the peer benchmarks.

Stdlib only: the oban peer imports this module from a separate Python >= 3.12 venv.
Each peer module subclasses :class:`Peer` and calls :func:`main`. The only thing a
peer prints to stdout is the final JSON line; progress and library logs go to stderr.
``drain`` and ``latency`` run the library's worker in ``--processes`` worker processes
(:mod:`benchmarks.peers.fleet`); the process given ``--workload`` enqueues and measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any, TextIO

from benchmarks.peers import dbstats
from benchmarks.peers.fleet import (
    READY,
    RESULT,
    STARTED,
    Board,
    Fleet,
    WorkerFleet,
    read_command,
    tree_cpu_seconds,
    wait_for_calls,
)

WORKLOADS = ("enqueue_one", "enqueue_batch", "drain", "latency")
DEFAULT_N = {"enqueue_one": 2000, "enqueue_batch": 2000, "drain": 2000, "latency": 1000}
LATENCY_RATE = 200.0  # jobs/s enqueued one at a time to idle workers
IDLE_SETTLE_S = 1.0  # latency: idle time between the workers' start and the first enqueue
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

    def reset(self, target: int, board: Board | None = None) -> None:
        self.target = target
        self.board = board
        self.calls = 0
        self.started: dict[int, float] = {}
        self.done = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.get_ident()
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def hit(self, i: int) -> None:
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process here
        self.calls += 1
        self.started.setdefault(int(i), now)
        if self.board is not None:
            self.board.record(self.calls, now)
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
    async def open(self) -> None:
        """Open connections to a database whose schema is installed (worker processes)."""

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
        """Start the library's worker in this process at ``self.concurrency``."""

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

    def fleet(self, workload: str, processes: int, board_dir: str) -> WorkerFleet:
        """The worker processes for ``drain`` and ``latency``: by default ``processes``
        runs of this peer's module in the worker role."""
        return Fleet(self.system, self.dsn, workload, processes, self.concurrency, board_dir)


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


async def _wait_drained(peer: Peer, timeout: float) -> float | None:
    """Poll the library table until it reports every job finished; the time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await peer.pending() == 0:
            return time.monotonic()
        await asyncio.sleep(0.005)
    return None


def _cpu_per_job(client_s: float, server_s: float | None, n: int, window: float) -> dict[str, Any]:
    """CPU microseconds per job (client, server, total) and the cores each kept busy."""
    out: dict[str, Any] = {"client_us_per_job": round(1e6 * client_s / n, 2)}
    out["client_cores"] = round(client_s / window, 2) if window > 0 else None
    if server_s is not None:
        out["server_us_per_job"] = round(1e6 * server_s / n, 2)
        out["total_us_per_job"] = round(1e6 * (client_s + server_s) / n, 2)
        if window > 0:
            out["server_cores"] = round(server_s / window, 2)
            out["cores"] = round((client_s + server_s) / window, 2)
    out["window_s"] = round(window, 4)
    return out


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


def _mean_rss(board_dir: str) -> float | None:
    """Mean RSS of the processes that run jobs (each board is named by its pid)."""
    pids = [int(e.name) for e in os.scandir(board_dir) if e.name.isdigit()]
    vals = [v for p in pids if (v := _rss_mb(p)) is not None]
    return round(sum(vals) / len(vals), 1) if vals else None


async def _run_drain(peer: Peer, res: Result, args: argparse.Namespace) -> None:
    """Pre-enqueue ``n`` jobs, then time ``--processes`` worker processes draining them."""
    n = args.n
    for ids in chunks(n, args.batch_size):
        await _bounded(peer.enqueue_batch(ids), args.timeout, "pre-enqueue")
    await dbstats.analyze(peer.dsn)  # the statistics a deployed queue's table has
    postmaster = await dbstats.postmaster_pid(peer.dsn)
    with tempfile.TemporaryDirectory(prefix="bench-board-") as board:
        fleet = peer.fleet("drain", args.processes, board)
        try:
            await fleet.start(120)
            before = await dbstats.snapshot(peer.dsn, args.settle)
            rss_start = _mean_rss(board)
            client0 = tree_cpu_seconds(fleet.pids)
            server0 = dbstats.postmaster_cpu_seconds(postmaster)
            t0 = time.monotonic()
            await fleet.go()
            assert fleet.boards is not None
            await wait_for_calls(fleet.boards, n, args.timeout)
            all_started = time.monotonic()
            done = await _wait_drained(peer, 60)
            t1 = done or time.monotonic()
            client1 = tree_cpu_seconds(fleet.pids)
            server1 = dbstats.postmaster_cpu_seconds(postmaster)
            rss_end = _mean_rss(board)
            if done is None:
                res.error = f"{await peer.pending()} jobs unfinished 60 s after all started"
            after = await dbstats.snapshot(peer.dsn, args.settle)
        finally:
            await fleet.stop()
        _, first, last = fleet.boards.read() if fleet.boards else (0, None, None)
    res.seconds = t1 - t0
    res.extra["seconds_until_all_started"] = round(all_started - t0, 4)
    res.extra["started_jobs_per_s"] = round(n / (all_started - t0), 1)
    if first is not None and last is not None:
        res.extra["first_job_after_s"] = round(first - t0, 4)
        if last > first:  # throughput once running: worker start-up excluded
            res.extra["steady_jobs_per_s"] = round((n - 1) / (last - first), 1)
    server_s = None if server0 is None or server1 is None else server1 - server0
    res.extra["cpu"] = _cpu_per_job(client1 - client0, server_s, n, t1 - t0)
    d = dbstats.delta(before, after)
    if args.settle:
        # The lagged counters' window runs on through the settle (idle workers included).
        res.extra["db"] = dbstats.per_job(d, n)
    else:
        res.extra["db"] = {"wal_bytes_per_job": dbstats.per_job(d, n)["wal_bytes_per_job"]}
    res.extra["worker"] = {"rss_mb_start": rss_start, "rss_mb_end": rss_end}
    _fleet_outcome(res, fleet, n)


def _fleet_outcome(res: Result, fleet: WorkerFleet, n: int) -> None:
    calls = sum(int(r.get("calls", 0)) for r in fleet.results)
    res.extra["processes"] = fleet.processes
    res.extra["bodies_run"] = calls
    res.extra["calls_per_process"] = [r.get("calls") for r in fleet.results]
    res.extra["duplicate_runs"] = max(0, calls - n)
    errors = [r["error"] for r in fleet.results if r.get("error")]
    if errors and not res.error:
        res.error = "worker process: " + "; ".join(errors)


async def _run_latency(peer: Peer, res: Result, args: argparse.Namespace) -> None:
    """Enqueue ``n`` jobs one at a time at ``--rate`` to idle worker processes."""
    n = args.n
    enq: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-board-") as board:
        fleet = peer.fleet("latency", args.processes, board)
        try:
            await fleet.start(120)
            await fleet.go()
            await fleet.started(60)
            await asyncio.sleep(IDLE_SETTLE_S)  # let the idle workers settle (LISTEN etc.)
            t0 = time.monotonic()
            for i in range(n):
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                enq[i] = time.monotonic()
                await _bounded(peer.enqueue_one(i), 30, "enqueue")
            assert fleet.boards is not None
            await wait_for_calls(fleet.boards, n, args.timeout)
            res.seconds = time.monotonic() - t0
        finally:
            await fleet.stop()
    started: dict[int, float] = {}
    for r in fleet.results:
        for key, t in r.get("started", {}).items():
            started[int(key)] = min(t, started.get(int(key), t))
    _fleet_outcome(res, fleet, n)
    missing = [i for i in range(n) if i not in started]
    if missing:
        res.error = f"{len(missing)} jobs never started"
        return
    lat = sorted((started[i] - enq[i]) * 1000 for i in range(n))
    res.p50_ms, res.p99_ms, res.max_ms = (
        round(percentile(lat, 50), 3),
        round(percentile(lat, 99), 3),
        round(lat[-1], 3),
    )
    res.extra["latency_from"] = "just before the enqueue call, to the job body's start"
    res.extra["rate_per_s"] = args.rate


def _client_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_workload(peer: Peer, res: Result, args: argparse.Namespace) -> None:
    await _bounded(peer.setup(), 120, "schema setup")
    n, timeout = args.n, args.timeout
    if args.workload in ("enqueue_one", "enqueue_batch"):
        postmaster = await dbstats.postmaster_pid(peer.dsn)
        server0, client0 = dbstats.postmaster_cpu_seconds(postmaster), _client_cpu_s()
        t0 = time.perf_counter()
        if args.workload == "enqueue_one":
            for i in range(n):
                await _bounded(peer.enqueue_one(i), 30, "enqueue")
        else:
            for ids in chunks(n, args.batch_size):
                await _bounded(peer.enqueue_batch(ids), timeout, "batch enqueue")
        res.seconds = time.perf_counter() - t0
        client1, server1 = _client_cpu_s(), dbstats.postmaster_cpu_seconds(postmaster)
        server_s = None if server0 is None or server1 is None else server1 - server0
        res.extra["cpu"] = _cpu_per_job(client1 - client0, server_s, n, res.seconds)
        res.extra["rows_in_table"] = await peer.total()
        if res.extra["rows_in_table"] != n:
            res.error = f"expected {n} rows, found {res.extra['rows_in_table']}"
    elif args.workload == "drain":
        await _run_drain(peer, res, args)
    else:
        await _run_latency(peer, res, args)
    if res.seconds and args.workload != "latency":
        res.jobs_per_s = round(n / res.seconds, 1)
    if res.seconds:
        res.seconds = round(res.seconds, 4)


async def serve_worker(peer: Peer, args: argparse.Namespace) -> None:
    """The worker-process role: open, wait for ``go``, run the library's worker until
    ``stop``, then print what ran."""
    TRACKER.reset(0, Board(args.board))
    await _bounded(peer.open(), 120, "open")
    try:
        emit(READY)
        if await read_command() == "go":
            await _bounded(peer.start_worker(), 60, "worker start")
            emit(STARTED)
            try:
                await read_command()  # "stop", or the end of input
            finally:
                await _bounded(peer.stop_worker(), 60, "worker stop")
    finally:
        await _bounded(peer.close(), 30, "close")
    out: dict[str, Any] = {"pid": os.getpid(), "calls": TRACKER.calls}
    if args.workload == "latency":
        out["started"] = TRACKER.started
    emit(RESULT + json.dumps(out))


def parse_args(
    argv: Sequence[str] | None = None, defaults: dict[str, int] | None = None
) -> argparse.Namespace:
    defaults = {**DEFAULT_N, **(defaults or {})}
    p = argparse.ArgumentParser(description="Run one peer-queue benchmark workload.")
    p.add_argument("--dsn", required=True, help="DSN of a fresh database for this run")
    p.add_argument("--workload", required=True, choices=list(defaults))
    p.add_argument("--n", type=int, default=None, help="number of jobs")
    p.add_argument("--concurrency", type=int, default=10, help="per worker process")
    p.add_argument("--processes", type=int, default=1, help="worker processes (drain, latency)")
    p.add_argument("--rate", type=float, default=LATENCY_RATE, help="latency: jobs/s")
    p.add_argument(
        "--settle",
        type=float,
        default=dbstats.SETTLE_S,
        help="drain: seconds waited for the lagged database counters (0: CPU and WAL only)",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=300.0, help="per phase, seconds")
    p.add_argument("--role", choices=("run", "worker"), default="run", help=argparse.SUPPRESS)
    p.add_argument("--board", help=argparse.SUPPRESS)
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
    if args.role == "worker":
        asyncio.run(serve_worker(make_peer(args.dsn, args.concurrency), args))
        return
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
