"""Worker processes for the drain and latency workloads: N of them, started and timed alike.

Stdlib only (the oban peer imports it from its own venv). A peer run for ``drain`` or
``latency`` is a coordinator: it installs the schema and enqueues with the library, then
starts ``--processes`` worker processes (``python -m benchmarks.peers.<system>_peer --role
worker``), each running the library's own worker at ``--concurrency``, as a deployment
runs a worker per core. Every system goes through this same path.

The protocol, one line at a time:

- a worker opens its connections (schema untouched), prints ``BENCH-READY`` and waits;
- the coordinator reads the CPU counters, writes ``go`` to every worker, and the window
  opens; each worker then starts the library's worker;
- each job body records its start in the worker's *board*: a 24-byte file in a directory
  the coordinator reads (count, first and last start on ``CLOCK_MONOTONIC``, which every
  process on the machine shares), so the coordinator sees progress without a query;
- once the library's worker runs, the process prints ``BENCH-STARTED``;
- ``stop`` ends a worker; it stops the library's worker, closes, and prints
  ``BENCH-RESULT <json>`` (its calls and, for latency, each job's start time).

CPU figures come from ``/proc``: the client is every worker process and its descendants
(utime + stime, plus what they reaped), the server the postmaster and its children
(:func:`benchmarks.peers.dbstats.postmaster_cpu_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

READY = "BENCH-READY"
STARTED = "BENCH-STARTED"
RESULT = "BENCH-RESULT "
_BOARD = struct.Struct("<qdd")  # calls, first start, last start (time.monotonic)
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ROOT = Path(__file__).resolve().parents[2]


class Board:
    """One worker process's progress, in a small shared file the coordinator reads."""

    def __init__(self, directory: str) -> None:
        path = Path(directory) / str(os.getpid())
        path.write_bytes(b"\0" * _BOARD.size)
        self._file = path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), _BOARD.size)
        self.first = 0.0

    def record(self, calls: int, now: float) -> None:
        if not self.first:
            self.first = now
        _BOARD.pack_into(self._map, 0, calls, self.first, now)


class Boards:
    """Every worker's board, mapped once (each exists once its worker said it is ready)."""

    def __init__(self, directory: str) -> None:
        self._maps: list[mmap.mmap] = []
        for entry in os.scandir(directory):
            if not entry.name.isdigit():
                continue
            with open(entry.path, "rb") as fh:
                self._maps.append(mmap.mmap(fh.fileno(), _BOARD.size, access=mmap.ACCESS_READ))

    def read(self) -> tuple[int, float | None, float | None]:
        """Calls so far over every board, the earliest first start, the latest last."""
        calls, first, last = 0, None, None
        for m in self._maps:
            c, f, la = _BOARD.unpack_from(m, 0)
            calls += c
            if c:
                first = f if first is None else min(first, f)
                last = la if last is None else max(last, la)
        return calls, first, last


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """utime + stime (with reaped children's) of ``roots`` and every live descendant."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(x) for x in fields[11:15])
    wanted = set(roots)
    grew = True
    while grew:  # descendants, whatever the depth
        more = {pid for pid, ppid in parents.items() if ppid in wanted} - wanted
        wanted |= more
        grew = bool(more)
    return sum(ticks.get(pid, 0) for pid in wanted) / _TICKS


class WorkerFleet(Protocol):
    """What the coordinator needs of a system's worker processes."""

    processes: int
    boards: Boards | None
    results: list[dict[str, Any]]

    @property
    def pids(self) -> list[int]: ...
    async def start(self, timeout: float) -> None: ...
    async def go(self) -> None: ...
    async def started(self, timeout: float) -> None: ...
    async def stop(self, timeout: float = 60.0) -> None: ...


class Fleet:
    """N worker processes of one system, started from the coordinator."""

    def __init__(
        self,
        system: str,
        dsn: str,
        workload: str,
        processes: int,
        concurrency: int,
        board_dir: str,
    ) -> None:
        self.cmd = [
            sys.executable, "-m", f"benchmarks.peers.{system}_peer", "--role", "worker",
            "--dsn", dsn, "--workload", workload, "--concurrency", str(concurrency),
            "--board", board_dir,
        ]  # fmt: skip
        self.processes = processes
        self.board_dir = board_dir
        self.procs: list[asyncio.subprocess.Process] = []
        self.results: list[dict[str, Any]] = []
        self.boards: Boards | None = None
        self._lines: dict[int, asyncio.Queue[str | None]] = {}
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(self, timeout: float) -> None:
        """Start every process and wait until each has its connections open."""
        for _ in range(self.processes):
            proc = await asyncio.create_subprocess_exec(
                *self.cmd,
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=2**24,  # the latency result is one long line
            )
            self.procs.append(proc)
            self._lines[proc.pid] = asyncio.Queue()
            self._readers.append(asyncio.create_task(self._read(proc)))
        await asyncio.wait_for(asyncio.gather(*(self._line(p, READY) for p in self.procs)), timeout)
        self.boards = Boards(self.board_dir)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Read the process's stdout for as long as it lives (a full pipe would block it);
        keep the protocol's lines, drop anything else a library prints."""
        assert proc.stdout is not None
        queue = self._lines[proc.pid]
        while raw := await proc.stdout.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("BENCH-"):
                queue.put_nowait(line)
        queue.put_nowait(None)

    async def _line(self, proc: asyncio.subprocess.Process, marker: str) -> str:
        queue = self._lines[proc.pid]
        while True:
            line = await queue.get()
            if line is None:
                queue.put_nowait(None)
                raise RuntimeError(f"worker process {proc.pid} exited ({await proc.wait()})")
            if line.startswith(marker):
                return line[len(marker) :]

    async def _send(self, word: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            with contextlib.suppress(ConnectionError):
                p.stdin.write(word.encode() + b"\n")
                await p.stdin.drain()

    async def go(self) -> None:
        await self._send("go")

    async def started(self, timeout: float) -> None:
        """Wait until every process says the library's worker runs."""
        await asyncio.wait_for(
            asyncio.gather(*(self._line(p, STARTED) for p in self.procs)), timeout
        )

    async def stop(self, timeout: float = 60.0) -> None:
        """Ask every process to stop; collect their results; kill what does not exit."""
        await self._send("stop")
        for p in self.procs:
            try:
                text = await asyncio.wait_for(self._line(p, RESULT), timeout)
                self.results.append(json.loads(text))
                await asyncio.wait_for(p.wait(), timeout)
            except (TimeoutError, RuntimeError, json.JSONDecodeError) as exc:
                self.results.append({"error": f"{type(exc).__name__}: {exc}"})
        await self.kill()

    async def kill(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for task in self._readers:
            task.cancel()


async def wait_for_calls(boards: Boards, n: int, timeout: float) -> None:
    """Read the boards every 5 ms until ``n`` job bodies started."""
    deadline = time.monotonic() + timeout
    while (calls := boards.read()[0]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{calls} of {n} jobs started within {timeout:.0f}s")
        await asyncio.sleep(0.005)


async def read_command() -> str:
    """The next line the coordinator writes to this worker ('' at end of input)."""
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()
