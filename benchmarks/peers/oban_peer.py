"""Oban (Python) peer: needs Python >= 3.12, so run_all runs it from benchmarks/.venv-oban."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oban import Job, Oban, worker
from oban.schema import install

from benchmarks.peers.common import Peer, main, noop_job

QUEUE = "bench"


@worker(queue=QUEUE)
class BenchNoop:
    async def process(self, job: Job) -> None:
        await noop_job(int(job.args["i"]))


class ObanPeer(Peer):
    system = "oban"
    package = "oban"
    pending_filter = "WHERE state NOT IN ('completed', 'discarded', 'cancelled')"

    def __init__(self, dsn: str, concurrency: int) -> None:
        super().__init__(dsn, concurrency)
        self._pool: Any = None
        self._client: Oban | None = None
        self._server: Oban | None = None

    def settings(self) -> dict[str, Any]:
        return {"queue_limit": self.concurrency, "pool_max_size": self.concurrency + 4}

    @property
    def client(self) -> Oban:
        assert self._client is not None, "setup() not called"
        return self._client

    async def open(self) -> None:
        self._pool = await Oban.create_pool(self.dsn, min_size=1, max_size=self.concurrency + 4)
        # Client mode (no queues): only inserts, like an application's web process.
        self._client = Oban(pool=self._pool, name="bench-client")

    async def setup(self) -> None:
        await self.open()
        await install(self._pool)

    async def enqueue_one(self, i: int) -> None:
        await self.client.enqueue(BenchNoop.new({"i": i}))  # type: ignore[attr-defined]

    async def enqueue_batch(self, ids: Sequence[int]) -> None:
        await self.client.enqueue_many([BenchNoop.new({"i": i}) for i in ids])  # type: ignore[attr-defined]

    async def start_worker(self) -> None:
        self._server = Oban(pool=self._pool, name="bench-worker", queues={QUEUE: self.concurrency})
        await self._server.start()

    async def stop_worker(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def count(self, where: str) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM oban_jobs {where}".encode())
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()


if __name__ == "__main__":
    main(ObanPeer.system, ObanPeer.package, ObanPeer)
