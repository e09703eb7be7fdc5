"""baton's worker processes as deployed: one ``baton worker --processes N`` command.

The supervisor starts N children, each a whole ``baton worker`` with its own pool and
heartbeat row. The harness cannot tell them to go, so the queue is paused before they
start (a worker started after a pause fetches nothing), the harness waits until N workers
are registered, and *resuming the queue* opens the window: its NOTIFY reaches every worker
at once. Each child imports this module as its ``--app``; with ``BENCH_BOARD_DIR`` set it
records job starts in a board (:mod:`benchmarks.peers.fleet`) and, at exit, writes what
ran to ``<board dir>/<pid>.json``. The client CPU is the supervisor's and its children's.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import baton
from baton.worker.supervisor import ENV_SUPERVISOR_PID
from benchmarks.peers.baton_peer import SCHEMA, bench_noop
from benchmarks.peers.common import TRACKER
from benchmarks.peers.fleet import ROOT, Board, Boards

if TYPE_CHECKING:
    from benchmarks.peers.baton_peer import BatonPeer

APP_SPEC = "benchmarks.peers.baton_cli:app"
BOARD_ENV = "BENCH_BOARD_DIR"
POOL_ENV = "BENCH_BATON_POOL"
PROCESSES_ENV = "BENCH_BATON_PROCESSES"
QUEUE = "default"

app = baton.Baton(schema=SCHEMA, pool_size=int(os.environ.get(POOL_ENV, "10")))
app.step(name="bench.noop")(bench_noop)


def _dump(directory: str) -> None:
    out = {"pid": os.getpid(), "calls": TRACKER.calls, "started": TRACKER.started}
    Path(directory, f"{os.getpid()}.json").write_text(json.dumps(out))


def _runs_jobs() -> bool:
    """This process is a worker: a supervisor's child, or the only process there is."""
    return ENV_SUPERVISOR_PID in os.environ or os.environ.get(PROCESSES_ENV) == "1"


if (_board_dir := os.environ.get(BOARD_ENV)) and _runs_jobs():
    TRACKER.reset(0, Board(_board_dir))
    atexit.register(_dump, _board_dir)


class CliFleet:
    """The Fleet interface over one ``baton worker --processes N`` command."""

    def __init__(self, peer: BatonPeer, workload: str, processes: int, board_dir: str) -> None:
        self.peer = peer
        self.processes = processes
        self.board_dir = board_dir
        self.workload = workload
        self.proc: asyncio.subprocess.Process | None = None
        self.boards: Boards | None = None
        self.results: list[dict[str, Any]] = []

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    async def start(self, timeout: float) -> None:
        await self.peer.app.pause_queue(QUEUE)
        cmd = [
            sys.executable, "-m", "baton", "worker", "--app", APP_SPEC, "--dsn", self.peer.dsn,
            "--schema", SCHEMA, "--queues", f"{QUEUE}={self.peer.concurrency}",
            "--processes", str(self.processes), "--log-level", "warning",
        ]  # fmt: skip
        env = {
            **os.environ,
            BOARD_ENV: self.board_dir,
            POOL_ENV: str(self.peer.pool_size),
            PROCESSES_ENV: str(self.processes),
        }
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL
        )
        await asyncio.wait_for(self._registered(), timeout)
        self.boards = Boards(self.board_dir)

    async def _registered(self) -> None:
        """Until every child has its board and its row in the worker registry."""
        sql = f"SELECT count(*) FROM {SCHEMA}.worker_registry WHERE expires_at > now()"
        while True:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"baton worker exited ({self.proc.returncode})")
            boards = [e for e in os.scandir(self.board_dir) if e.name.isdigit()]
            if len(boards) >= self.processes:
                async with self.peer.app.connection() as conn:
                    row = await (await conn.execute(sql.encode())).fetchone()
                if row and int(row[0]) >= self.processes:
                    await asyncio.sleep(0.5)  # the producers start after the registration
                    return
            await asyncio.sleep(0.05)

    async def go(self) -> None:
        await self.peer.app.resume_queue(QUEUE)

    async def started(self, timeout: float) -> None:
        """The workers run once registered (their producers obey the resume at once)."""

    async def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        for entry in os.scandir(self.board_dir):
            if entry.name.endswith(".json"):
                self.results.append(json.loads(Path(entry.path).read_text()))
        if len(self.results) < self.processes:
            self.results.append({"error": f"{len(self.results)} of {self.processes} reported"})

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # the children die with it (PR_SET_PDEATHSIG)
            await self.proc.wait()
