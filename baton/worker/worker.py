"""The worker process: composes notifier, producers, executor, completer and maintenance."""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import psycopg

from baton import migrations, ops
from baton.db import describe, translate_errors
from baton.errors import DatabaseError
from baton.logs import get_logger
from baton.worker import processes
from baton.worker.completer import Completer
from baton.worker.control import QueueControls
from baton.worker.engine import Engine
from baton.worker.executor import Executor, FetchedJob
from baton.worker.heartbeat import Heartbeat
from baton.worker.limits import Limits
from baton.worker.maintenance import Maintenance
from baton.worker.notifier import Notifier
from baton.worker.passes import Passes
from baton.worker.producer import Producer
from baton.worker.scheduler import Scheduler
from baton.worker.settings import WorkerSettings
from baton.workflows.engine import WorkflowEngine

if TYPE_CHECKING:
    from baton.app import Baton

log = get_logger("baton.worker")

DEFER_SECONDS = 1.0
EXIT_WITH_THREADS = 70
"""The exit status of a worker process that ended past its shutdown grace with plain def
steps still running in threads (``exit_with_threads``)."""


def new_worker_id() -> str:
    """Return a worker id that says where the worker runs: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs the jobs of an app's queues until stopped.

    ``await worker.run()`` returns after :meth:`stop` (or SIGTERM/SIGINT in the CLI): it
    stops fetching, lets running jobs finish within ``shutdown_grace``, then hands the
    unfinished ones back to the queue without burning their attempt. To run one beside
    other code, use it as an async context manager::

        async with Worker(app, WorkerSettings(queues={"default": 10})):
            ...  # jobs run while the block runs; leaving it stops the worker gracefully
    """

    def __init__(
        self, app: Baton, settings: WorkerSettings | None = None, *, worker_id: str | None = None
    ) -> None:
        self.app = app
        self.settings = settings or WorkerSettings()
        self.id = worker_id or new_worker_id()
        self.producers = {
            queue: Producer(self, queue, limit) for queue, limit in self.settings.queues.items()
        }
        self.limiter = anyio.CapacityLimiter(sum(self.settings.queues.values()))
        self.executor = Executor(app, self.limiter)
        self.engine: Engine = WorkflowEngine(app, self.executor)
        self.limits = Limits(self)
        """Limits of this worker's queues across all workers, from ``queue_limits``."""
        self.completer = Completer(
            app,
            self.id,
            flush_interval=self.settings.flush_interval,
            flush_max=self.settings.flush_max,
            max_pending=self.settings.max_pending_outcomes,
            engine=self.engine,
            on_available=self._wake_queues,
            on_written=self.limits.written,
        )
        self.step_names = sorted(app.steps)
        """The steps this worker can run: it fetches no other."""
        self.maintenance = Maintenance(self)
        self.scheduler = Scheduler(self)
        """Defines the app's schedules; enqueues their ticks while this worker leads."""
        self.queue_controls = QueueControls(self)
        """Pause and scale of this worker's queues, from the ``queues`` table."""
        self.passes = Passes()
        """The periodic services' database passes, which the shutdown lets end."""
        self._heartbeat: Heartbeat | None = None
        self.started = anyio.Event()
        self.stopped = anyio.Event()
        self._stop = anyio.Event()
        self._cancel_requested: set[int] = set()
        self._unfinished: list[int] = []
        self._notifier: Notifier | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._peers: dict[str, tuple[str, ...]] = {}
        """By queue, the live workers serving it (this one among them), by id: read with
        each heartbeat, they choose which of them acts at once on an insert's NOTIFY."""

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        """Start the worker in the background; the block runs once it is ready."""
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self.run)
        except BaseException:
            await self._tg.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: Any) -> bool | None:
        """Stop gracefully and wait until the worker has stopped.

        An error raised in the block (a failed assertion, a ``TimeoutError``) stops the
        worker the same way, then comes out as itself, not inside an exception group;
        cancellation still cancels the worker."""
        self.stop()
        assert self._tg is not None
        if isinstance(exc, Exception):
            await self._tg.__aexit__(None, None, None)
            return None
        return await self._tg.__aexit__(exc_type, exc, tb)

    def stop(self) -> None:
        """Ask the worker to shut down gracefully."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run until :meth:`stop`; report started once every service is ready."""
        # Both hold a session of their own (listen_dsn: direct, past any pooler): a beat
        # must not queue behind a busy pool until the worker looks dead. Read before the
        # start: a pooled app without one is refused before it registers.
        listen_dsn = self.app.listen_dsn
        await self._startup()
        self._heartbeat = heartbeat = Heartbeat(
            listen_dsn, self._beat, interval=self.settings.heartbeat_interval,
            blocked_after=self.settings.loop_blocked_after, worker_id=self.id)
        channel = self.app.sql.channel
        self._notifier = Notifier(
            listen_dsn,
            {channel("insert"): self._on_insert, channel("control"): self._on_control},
            on_reconnect=self._wake_all,
        )
        try:
            async with anyio.create_task_group() as services:
                await services.start(self.app.events.dispatch)
                await services.start(self._notifier.run)
                await services.start(self.completer.run)
                services.start_soon(heartbeat.tick)
                heartbeat.start()
                services.start_soon(self._reconcile_every, self.settings.reconcile_interval)
                services.start_soon(self.queue_controls.run, self.settings.heartbeat_interval)
                await services.start(self.maintenance.run)
                await services.start(self.limits.run)  # read before the first fetch
                await services.start(self.scheduler.run)  # once the schedules are defined
                # Read after LISTEN is in place, before the first fetch: a queue paused
                # before the start stays paused, and no change falls between the two.
                await self.queue_controls.load()
                async with anyio.create_task_group() as producers:
                    for producer in self.producers.values():
                        await producers.start(producer.run)
                    log.info("worker.started", worker_id=self.id, queues=self.settings.queues)
                    self.started.set()
                    task_status.started()
                    await self._stop.wait()
                    await self._wind_down()
                await self.passes.close()  # none runs beside the leader's resignation
                await self._finish()
                services.cancel_scope.cancel()
        finally:
            heartbeat.stop()
            with anyio.CancelScope(shield=True):
                await processes.close(self.executor)  # idle children of process steps
            self.stopped.set()
        log.info("worker.stopped", worker_id=self.id)

    async def _startup(self) -> None:
        if not self.app.is_open:
            # Workflow steps each borrow a connection for their gate: size the pool to match.
            self.app.pool_size = max(self.app.pool_size,
                                     min(sum(self.settings.queues.values()) // 2 + 5, 40))
        await self.app.open()
        with translate_errors("worker start"):
            async with self.app.connection() as conn:
                await conn.execute("SELECT 1")
        await anyio.to_thread.run_sync(self._check_schema)
        await self._register()

    def _check_schema(self) -> None:
        with psycopg.connect(self.app.dsn) as conn:
            migrations.check_schema(conn, self.app.schema)

    async def _wind_down(self) -> None:
        log.info("worker.stopping", worker_id=self.id, grace=self.settings.shutdown_grace)
        for producer in self.producers.values():
            producer.stop()
        with anyio.move_on_after(self.settings.shutdown_grace):
            for producer in self.producers.values():
                await producer.wait_idle()
        for producer in self.producers.values():
            producer.cancel_running()
        if not self.executor.in_threads:
            return
        # Async jobs end at once; a thread cannot be stopped. Its job keeps its slot (and
        # stays executing here) until the thread returns, so no other attempt can start.
        held = sorted(self.executor.in_threads)
        if not self.settings.exit_with_threads:
            log.warning("worker.waiting_for_threads", worker_id=self.id, job_ids=held,
                        reason="plain def steps still run past the shutdown grace; a thread "
                               "cannot be stopped")
            return
        # The cancelled async jobs end; a process step's child is killed within TERM_WAIT.
        with anyio.move_on_after(processes.TERM_WAIT + 1.0):
            while any(set(p.running) - set(self.executor.in_threads)
                      for p in self.producers.values()):
                await anyio.sleep(0.01)
        await self._finish(unregister=False)
        held = sorted(self.executor.in_threads)
        log.warning("worker.exiting_with_threads", worker_id=self.id, job_ids=held,
                    reason="plain def steps still run past the shutdown grace; the process "
                           "exits to end them, and their jobs are rescued once this "
                           "worker's heartbeat expires")
        if self._heartbeat is not None:
            self._heartbeat.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_WITH_THREADS)

    async def _finish(self, *, unregister: bool = True) -> None:
        deadline = anyio.current_time() + max(5.0, self.settings.shutdown_grace)
        with anyio.CancelScope(shield=True):
            await self.completer.drain(deadline)
            await self._hand_back()
            for producer in self.producers.values():
                # A claim whose reply was lost just before the stop: its jobs never ran
                # here and go back with their attempt, not through a rescue that burns it.
                try:
                    await producer.reconcile()
                except (psycopg.Error, DatabaseError) as exc:
                    log.warning("worker.reconcile_failed", queue=producer.queue,
                                error=describe(exc))
            await self.maintenance.resign()
            if not unregister:  # its jobs are rescued once its registry row expires
                return
            if self._heartbeat is not None:  # no beat may bring the row back
                await anyio.to_thread.run_sync(self._heartbeat.stop)
            try:
                async with self.app.connection() as conn:
                    await conn.execute(self.app.sql["worker_unregister"], {"id": self.id})
            except psycopg.Error as exc:
                log.warning("worker.unregister_failed", error=describe(exc))

    async def _hand_back(self) -> None:
        if not self._unfinished:
            return
        try:
            async with self.app.connection() as conn:
                cur = await conn.execute(
                    self.app.sql["jobs_hand_back"],
                    {"ids": self._unfinished, "worker_id": self.id},
                )
                rows = await cur.fetchall()
                wake = ops.notify_queues(self.app.sql, [r[1] for r in rows])
                await ops.run_async(conn, wake, "wake queues")
        except (psycopg.Error, DatabaseError) as exc:
            log.warning("worker.hand_back_failed", error=describe(exc), job_ids=self._unfinished)
            return
        for job_id, queue in rows:
            log.info("job.handed_back", job_id=job_id, queue=queue)

    def cancelled(self, job: FetchedJob) -> None:
        """Note a job whose run was cancelled (by request, or at shutdown)."""
        if job.id in self._cancel_requested:
            self._cancel_requested.discard(job.id)
            log.info("job.cancelled", job_id=job.id, queue=job.queue, step=job.step,
                     attempt=job.attempt, reason="cancel requested")
        else:
            self._unfinished.append(job.id)

    # -- registry --------------------------------------------------------------------------

    def _registration(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "queues": json.dumps(self.settings.queues),
            "steps": self.step_names,
            "ttl": self.settings.heartbeat_ttl,
        }

    async def _register(self) -> None:
        async with self.app.connection() as conn:
            await conn.execute(self.app.sql["worker_register"], self._registration())
            cur = await conn.execute(self.app.sql["worker_peers"])
            self._set_peers(await cur.fetchall())

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        """Renew the registry row and read the live workers (on the heartbeat's thread and
        connection)."""
        conn.execute(self.app.sql["worker_register"], self._registration())
        self._set_peers(conn.execute(self.app.sql["worker_peers"]).fetchall())

    def _set_peers(self, rows: list[tuple[str, Any]]) -> None:
        peers: dict[str, list[str]] = {queue: [] for queue in self.settings.queues}
        for worker_id, queues in rows:
            for queue in queues if isinstance(queues, dict) else ():
                if queue in peers:
                    peers[queue].append(worker_id)
        self._peers = {queue: tuple(ids) for queue, ids in peers.items()}  # one assignment

    async def _reconcile_every(self, interval: float) -> None:
        """Hand back, now and then, jobs the table says this worker holds but it does not
        run (a lost claim reply not seen as such); a fetch that fails does it at once."""
        while True:
            await anyio.sleep(interval)
            if self.passes.closing:
                return
            with self.passes.shielded():  # a shutdown does not cut a pass off
                for producer in self.producers.values():
                    if producer.stopping:
                        continue
                    try:
                        await producer.reconcile()
                    except (psycopg.Error, DatabaseError) as exc:
                        log.warning("worker.reconcile_failed", queue=producer.queue,
                                    error=describe(exc))

    # -- notifications ---------------------------------------------------------------------

    def _on_insert(self, queue: str, sender: int) -> None:
        """An insert's NOTIFY: every worker serving the queue gets it. One of them, chosen
        by the sending session's process id, fetches at once; the others once
        ``peer_wake_delay`` later, for any NOTIFYs meanwhile. With 4 processes of 400 slots
        and a job every 5 ms, enqueue -> start went from p50 2.5-3.2 / p99 5.5-8.0 ms, each
        process fetching for every NOTIFY, to 1.9-2.1 / 4.7-5.8 ms (``python -m benchmarks
        --workloads latency --processes 4``, three runs each way)."""
        producer = self.producers.get(queue)
        if producer is None:
            return
        producer.notified()
        peers = self._peers.get(queue, ())
        delay = self.settings.peer_wake_delay
        if len(peers) < 2 or not delay or self.id not in peers \
                or peers[sender % len(peers)] == self.id:
            producer.wake()
        else:
            producer.wake_soon(delay)

    def _on_control(self, payload: str, sender: int) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("worker.bad_control_message", payload=payload[:200])
            return
        if isinstance(message, dict) and message.get("action") == "queue":
            self.queue_controls.on_message(message)
            return
        if isinstance(message, dict) and message.get("action") == "limits":
            self.limits.changed(str(message.get("queue")))
            return
        if message.get("action") != "cancel" or message.get("worker") != self.id:
            return
        job_id = int(message["job_id"])
        self._cancel_requested.add(job_id)  # before cancelling: a waiting job ends at once
        if not any(producer.cancel_job(job_id) for producer in self.producers.values()):
            self._cancel_requested.discard(job_id)

    def _wake_queues(self, queues: set[str]) -> None:
        for queue in queues:
            if (producer := self.producers.get(queue)) is not None:
                producer.notified()
                producer.wake()

    def _wake_all(self) -> None:
        for producer in self.producers.values():
            producer.notified()  # notifications may have been missed
            producer.wake()
        self.queue_controls.refresh_soon()  # a pause or scale may have been announced
