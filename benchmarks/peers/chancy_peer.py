"""Chancy peer: AsyncExecutor queue with eager polling, worker in-process."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from chancy import Chancy, Job, Queue, Worker

from benchmarks.peers.common import Peer, main

QUEUE = "bench"
FUNC = "benchmarks.peers.common.noop_job"


def _stderr_logger() -> logging.Logger:
    # Chancy's default logger is a rich handler on stdout and logs every job at INFO.
    logger = logging.getLogger("bench.chancy")
    logger.handlers[:] = [logging.StreamHandler(sys.stderr)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    return logger


class ChancyPeer(Peer):
    system = "chancy"
    package = "chancy"
    pending_filter = "WHERE state IN ('pending', 'running', 'retrying')"

    def __init__(self, dsn: str, concurrency: int) -> None:
        super().__init__(dsn, concurrency)
        # Optional default plugins (leadership, pruner, recovery, metrics, workflows)
        # are off: they are maintenance, not the enqueue/fetch/complete path measured.
        self.chancy = Chancy(
            dsn,
            log=_stderr_logger(),
            max_connection_pool_size=concurrency + 4,
            no_default_plugins=True,
        )
        self._worker: Worker | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "executor": "AsyncExecutor",
            "queue_concurrency": self.concurrency,
            "eager_polling": True,
            "polling_interval_s": 1,
            "notifications": True,
            "default_plugins": False,
        }

    def _job(self, i: int) -> Job:
        return Job(func=FUNC, queue=QUEUE, kwargs={"i": i})

    async def open(self) -> None:
        await self.chancy.__aenter__()

    async def setup(self) -> None:
        await self.open()
        await self.chancy.migrate()
        await self.chancy.declare(
            Queue(
                QUEUE,
                concurrency=self.concurrency,
                executor=Chancy.Executor.Async,
                polling_interval=1,
                eager_polling=True,
            ),
            upsert=True,
        )

    async def enqueue_one(self, i: int) -> None:
        await self.chancy.push(self._job(i))

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        jobs = [self._job(i) for i in ids]
        async for _refs in self.chancy.push_many(jobs, batch_size=len(jobs)):
            pass

    async def start_worker(self) -> None:
        self._worker = Worker(self.chancy, register_signal_handlers=False, shutdown_timeout=10)
        await self._worker.start()

    async def stop_worker(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None

    async def count(self, where: str) -> int:
        sql = f"SELECT count(*) FROM {self.chancy.prefix}jobs {where}"
        async with self.chancy.pool.connection() as conn:
            cur = await conn.execute(sql.encode())
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        await self.chancy.__aexit__(None, None, None)


if __name__ == "__main__":
    main(ChancyPeer.system, ChancyPeer.package, ChancyPeer)
