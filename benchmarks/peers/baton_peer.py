"""baton peer: the four shared workloads, plus baton-only workflow workloads.

    python -m benchmarks.peers.baton_peer --dsn DSN --workload W [--n N] [--concurrency C]

Shared workloads run through :func:`common.run_workload`, exactly as for the peers.
``chain``, ``fanout`` and ``insert10k`` live in :mod:`benchmarks.peers.baton_workflows`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import anyio.to_thread

import baton
from baton.logs import configure_logging
from baton.migrations import migrate_up
from baton.worker import Worker, WorkerSettings
from benchmarks.peers import baton_workflows
from benchmarks.peers.common import Peer, main, noop_job
from benchmarks.peers.fleet import WorkerFleet

SCHEMA = "baton"
# Connections for the app pool: a worker's producer, completer and heartbeat share it and
# each workflow step holds one for its gate, so it grows with the concurrency.
POOL_MIN = 10


async def bench_noop(i: int) -> None:
    await noop_job(i)


class BatonPeer(Peer):
    system = "baton"
    package = "baton"
    pending_filter = "WHERE state NOT IN ('completed', 'discarded', 'cancelled')"

    def __init__(self, dsn: str, concurrency: int) -> None:
        super().__init__(dsn, concurrency)
        self.pool_size = max(POOL_MIN, min(40, concurrency // 2 + 4))
        self.app = baton.Baton(dsn, schema=SCHEMA, pool_size=self.pool_size)
        self.noop = self.app.step(name="bench.noop")(bench_noop)
        self.worker_settings = WorkerSettings(
            queues={"default": concurrency},
            debounce=float(os.environ.get("BENCH_BATON_DEBOUNCE", "0.002")),
            flush_interval=float(os.environ.get("BENCH_BATON_FLUSH", "0.002")),
        )
        self._worker: Worker | None = None
        self._task: asyncio.Task[None] | None = None

    def settings(self) -> dict[str, Any]:
        s = self.worker_settings
        return {
            "queues": s.queues,
            "pool_size": self.pool_size,
            "debounce": s.debounce,
            "flush_interval": s.flush_interval,
            "flush_max": s.flush_max,
            "poll_interval": s.poll_interval,
            "log_level": "warning",
            "worker_processes": "N x Worker in the worker role"
            if os.environ.get("BENCH_BATON_CLI", "1") == "0"
            else "baton worker --processes N",
        }

    def fleet(self, workload: str, processes: int, board_dir: str) -> WorkerFleet:
        """``baton worker --processes N``, as deployed (``BENCH_BATON_CLI=0``: N runs of
        this module in the worker role, as for the peers)."""
        if os.environ.get("BENCH_BATON_CLI", "1") == "0":
            return super().fleet(workload, processes, board_dir)
        from benchmarks.peers.baton_cli import CliFleet

        return CliFleet(self, workload, processes, board_dir)

    async def open(self) -> None:
        await self.app.open()

    async def setup(self) -> None:
        await anyio.to_thread.run_sync(migrate_up, self.dsn, SCHEMA)
        await self.open()

    async def enqueue_one(self, i: int) -> None:
        await self.app.enqueue(self.noop.new(i=i))

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        await self.app.enqueue_many(self.noop.new_many({"i": i} for i in ids))

    async def start_worker(self) -> None:
        self._worker = Worker(self.app, self.worker_settings)
        self._task = asyncio.create_task(self._worker.run())
        started = asyncio.create_task(self._worker.started.wait())
        await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            started.cancel()
            self._task.result()  # raises the worker's startup error

    async def stop_worker(self) -> None:
        if self._worker is None or self._task is None:
            return
        self._worker.stop()
        await self._task
        self._worker, self._task = None, None

    async def count(self, where: str) -> int:
        async with self.app.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {SCHEMA}.jobs {where}".encode())
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        await self.app.close()


if __name__ == "__main__":
    configure_logging("warning")
    main(BatonPeer.system, BatonPeer.package, BatonPeer, baton_workflows.WORKLOADS)
