"""PgQueuer peer: asyncpg driver (PgQueuer's primary one), QueueManager worker in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

from benchmarks.peers.common import Peer, main, noop_job

ENTRYPOINT = "bench_noop"


class PgQueuerPeer(Peer):
    system = "pgqueuer"
    package = "pgqueuer"
    # PgQueuer deletes finished jobs from its queue table (they move to pgqueuer_log).
    pending_filter = ""

    def __init__(self, dsn: str, concurrency: int) -> None:
        super().__init__(dsn, concurrency)
        # QueueManager.run() demands max_concurrent_tasks >= 2 * batch_size, so the
        # concurrency cap C is honoured with dequeue batches of C // 2.
        self.batch_size = max(1, concurrency // 2)
        self.max_tasks = max(concurrency, 2 * self.batch_size)
        self._conn: asyncpg.Connection | None = None
        self._qm: QueueManager | None = None
        self._worker: asyncio.Task[None] | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "driver": "asyncpg",
            "batch_size": self.batch_size,
            "max_concurrent_tasks": self.max_tasks,
        }

    @property
    def queries(self) -> Queries:
        assert self._conn is not None, "setup() not called"
        return Queries(AsyncpgDriver(self._conn))

    async def open(self) -> None:
        self._conn = await asyncpg.connect(self.dsn)

    async def setup(self) -> None:
        await self.open()
        await self.queries.install()

    async def enqueue_one(self, i: int) -> None:
        await self.queries.enqueue(ENTRYPOINT, str(i).encode())

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        k = len(ids)
        await self.queries.enqueue([ENTRYPOINT] * k, [str(i).encode() for i in ids], [0] * k)

    async def start_worker(self) -> None:
        # The QueueManager closes its driver on exit, so it gets its own connection.
        wconn = await asyncpg.connect(self.dsn)
        qm = QueueManager(Queries(AsyncpgDriver(wconn)))

        @qm.entrypoint(ENTRYPOINT)
        async def handle(job: Job) -> None:
            await noop_job(int(job.payload or b"-1"))

        self._qm = qm
        self._worker = asyncio.create_task(
            qm.run(batch_size=self.batch_size, max_concurrent_tasks=self.max_tasks)
        )
        await asyncio.sleep(0)

    async def stop_worker(self) -> None:
        if self._qm is None or self._worker is None:
            return
        self._qm.shutdown.set()
        await self._worker
        self._qm, self._worker = None, None

    async def count(self, where: str) -> int:
        assert self._conn is not None
        return int(await self._conn.fetchval(f"SELECT count(*) FROM pgqueuer {where}"))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


if __name__ == "__main__":
    main(PgQueuerPeer.system, PgQueuerPeer.package, PgQueuerPeer)
