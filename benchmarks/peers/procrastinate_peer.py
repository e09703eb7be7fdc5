"""Procrastinate peer: psycopg connector, async no-op task, in-process async worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import procrastinate
from procrastinate.types import JSONDict

from benchmarks.peers.common import Peer, main, noop_job

QUEUE = "bench"


class ProcrastinatePeer(Peer):
    system = "procrastinate"
    package = "procrastinate"
    pending_filter = "WHERE status IN ('todo', 'doing')"

    def __init__(self, dsn: str, concurrency: int) -> None:
        super().__init__(dsn, concurrency)
        connector = procrastinate.PsycopgConnector(
            conninfo=dsn, min_size=1, max_size=concurrency + 4
        )
        self.app = procrastinate.App(connector=connector)
        self.task = self.app.task(name="bench_noop", queue=QUEUE)(noop_job)
        self._worker: asyncio.Task[None] | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "listen_notify": True,
            "fetch_job_polling_interval": 1.0,
            "pool_max_size": self.concurrency + 4,
        }

    async def open(self) -> None:
        await self.app.open_async()

    async def setup(self) -> None:
        await self.open()
        await self.app.schema_manager.apply_schema_async()

    async def enqueue_one(self, i: int) -> None:
        await self.task.defer_async(i=i)

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        payloads: list[JSONDict] = [{"i": i} for i in ids]
        await self.task.batch_defer_async(*payloads)

    async def start_worker(self) -> None:
        self._worker = asyncio.create_task(
            self.app.run_worker_async(
                queues=[QUEUE],
                concurrency=self.concurrency,
                wait=True,
                listen_notify=True,
                fetch_job_polling_interval=1.0,
                install_signal_handlers=False,
                shutdown_graceful_timeout=10.0,
            )
        )
        await asyncio.sleep(0)

    async def stop_worker(self) -> None:
        # Procrastinate's documented way to stop an in-process worker: cancel its task.
        if self._worker is None:
            return
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    async def count(self, where: str) -> int:
        sql = f"SELECT count(*) FROM procrastinate_jobs {where}"
        async with self.app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            cur = await conn.execute(sql)
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        await self.app.close_async()


if __name__ == "__main__":
    main(ProcrastinatePeer.system, ProcrastinatePeer.package, ProcrastinatePeer)
