"""The :class:`Baton` app: registers steps and is the client for enqueueing and control."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from typing import Any, Literal, TypeVar, overload

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from baton import connections, migrations, ops, results, workflows
from baton.coroutines import loop_only
from baton.dag import SUBWORKFLOW_STEP, Workflow, subworkflow_step
from baton.db import (
    ENV_LISTEN_URL,
    ENV_POOLER,
    ENV_READ_URL,
    Queries,
    check_pooler,
    pooled_options,
    validate_schema,
)
from baton.embedded import resolve_dsn
from baton.errors import ConfigurationError, ScheduleError, StepError, UnknownStepError
from baton.events import Events, Hook
from baton.job import Job, JobSpec, check_options, check_sizes, check_tags
from baton.limits import QueueLimit, WindowSpec, list_limits, queue_limit, remove_limit, set_limit
from baton.logs import get_logger
from baton.periodic import Schedule
from baton.pricing import Pricing
from baton.query import Query
from baton.queues import QueueControl, QueueInfo, list_queues, set_control
from baton.step import DEFAULT_MAX_ARGS_BYTES, JobBatch, Step, StepOptions
from baton.unique import JobId, JobIds, Unique, WorkflowId, coerce_unique
from baton.workflows import budgets
from baton.workflows.budgets import Budget
from baton.workflows.resume import workflow_uuid

log = get_logger("baton.app")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Baton:
    """A baton application: its steps, its database and its schema.

    :param dsn: PostgreSQL URL; default ``BATON_DATABASE_URL``, else (in development, with
        the ``embedded`` extra) an embedded server. Resolved on first use, not at import.
    :param schema: the schema holding baton's tables; validated and quoted.
    :param max_args_bytes: the largest JSON a job's arguments may serialize to.
    :param pool_size: the most connections the async pool opens.
    :param connect_timeout: seconds opening the async pool waits for its first connection
        before it gives up with :class:`DatabaseError`.
    :param pricing: per-model prices, to turn recorded token usage into cost.
    :param capture: keep full prompts and responses (``ctx.capture``) for every step.
    :param listen_dsn: URL of the direct connections that need a session of their own:
        each worker's LISTEN and heartbeat, and event subscriptions; default
        ``BATON_LISTEN_URL``, else ``dsn``. Required with ``pooler="transaction"``.
    :param read_dsn: URL read-only inspection (:attr:`query`, ``baton status``) reads from,
        such as a replica; default ``BATON_READ_URL``, else ``dsn``.
    :param pooler: ``"transaction"`` when ``dsn`` (and ``read_dsn``) go through a pooler in
        transaction mode, such as PgBouncer: nothing is prepared on them; default
        ``BATON_POOLER``, else ``None`` (direct). See ``docs/pgbouncer.md``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        schema: str = "baton",
        *,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
        pool_size: int = 10,
        pricing: Pricing | None = None,
        capture: bool = False,
        connect_timeout: float = 30.0,
        listen_dsn: str | None = None,
        read_dsn: str | None = None,
        pooler: Literal["transaction"] | None = None,
    ) -> None:
        self.schema = validate_schema(schema)
        self.sql = Queries(self.schema)
        """The named SQL statements of this app's schema (``app.query`` is the read API)."""
        self.max_args_bytes = max_args_bytes
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.pricing = pricing or Pricing()
        self.capture = capture
        self.steps: dict[str, Step] = {SUBWORKFLOW_STEP: subworkflow_step()}
        self.schedules: dict[str, Schedule] = {}
        """Periodic jobs by name (``@app.step(cron=...)`` and :meth:`schedule`)."""
        self.events = Events(self)
        self.query = Query(self)
        self._dsn = dsn
        self._pool: AsyncConnectionPool | None = None
        self._sync_pool: ConnectionPool | None = None
        self.pooler: str | None = check_pooler(pooler or os.environ.get(ENV_POOLER) or None)
        """``"transaction"``: the database URL goes through a pooler in transaction mode."""
        self._listen_dsn = listen_dsn
        self._read_dsn = read_dsn
        self._read_pool: AsyncConnectionPool | None = None
        self._read_sync_pool: ConnectionPool | None = None

    # -- configuration -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The database URL, resolved (and the embedded server started) on first use."""
        if self._dsn is None:
            self._dsn = resolve_dsn(None)
        return self._dsn

    @dsn.setter
    def dsn(self, value: str) -> None:
        if self._pool is not None or self._sync_pool is not None:
            raise RuntimeError("cannot change the dsn of an open app")
        self._dsn = value

    @property
    def listen_dsn(self) -> str:
        """The URL of the connections that need a session: LISTEN (each worker's notifier
        and event subscriptions) and each worker's heartbeat.

        :raises ConfigurationError: with ``pooler="transaction"`` and no URL of its own
            (a LISTEN behind such a pooler hears nothing).
        """
        url = self._listen_dsn or os.environ.get(ENV_LISTEN_URL)
        if url:
            return url
        if self.pooler == "transaction":
            raise ConfigurationError(
                "pooler='transaction' needs a direct connection for LISTEN: set listen_dsn "
                f"(or {ENV_LISTEN_URL}) to a URL of the server that bypasses the pooler")
        return self.dsn

    @listen_dsn.setter
    def listen_dsn(self, value: str | None) -> None:
        self._listen_dsn = value

    @property
    def read_dsn(self) -> str:
        """The URL read-only inspection (:attr:`query`) reads from: ``read_dsn``, else
        ``BATON_READ_URL``, else :attr:`dsn`."""
        return self._read_dsn or os.environ.get(ENV_READ_URL) or self.dsn

    @read_dsn.setter
    def read_dsn(self, value: str | None) -> None:
        if self._read_pool is not None or self._read_sync_pool is not None:
            raise RuntimeError("cannot change the read_dsn of an open app")
        self._read_dsn = value

    @overload
    def step(self, fn: F, /) -> Step: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        queue: str = "default",
        max_attempts: int = 20,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Callable[[int], float] | None = None,
        name: str | None = None,
        on_dep_cancelled: Callable[..., Any] | None = None,
        on_dep_discarded: Callable[..., Any] | None = None,
        llm: bool = False,
        capture: bool = False,
        executor: Literal["thread", "process"] = "thread",
        unique: Unique | bool | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        args: dict[str, Any] | None = None,
        keep_result: bool = False,
        tags: Sequence[str] = (),
    ) -> Callable[[F], Step]: ...

    def step(
        self,
        fn: F | None = None,
        /,
        *,
        queue: str = "default",
        max_attempts: int = 20,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Callable[[int], float] | None = None,
        name: str | None = None,
        on_dep_cancelled: Callable[..., Any] | None = None,
        on_dep_discarded: Callable[..., Any] | None = None,
        llm: bool = False,
        capture: bool = False,
        executor: Literal["thread", "process"] = "thread",
        unique: Unique | bool | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        args: dict[str, Any] | None = None,
        keep_result: bool = False,
        tags: Sequence[str] = (),
    ) -> Step | Callable[[F], Step]:
        """Register a function (``async def`` or plain ``def``) as a step.

        Use bare (``@app.step``) or with options. ``backoff`` maps a failed attempt number
        to the seconds before the retry (default: exponential with jitter).
        ``on_dep_cancelled`` / ``on_dep_discarded`` are called as ``fn(ctx, reason)`` when a
        workflow dependency failed that way and this step is cancelled because of it.
        ``executor="process"`` runs a plain ``def`` step in a child process that a timeout,
        a cancel or a shutdown kills (see ``docs/queue.md``); the default is a thread.
        ``unique`` keeps at most one job of the step with the same key at a time
        (:class:`~baton.Unique`; ``True`` for its defaults; see ``docs/unique.md``).
        ``cron`` enqueues a job of the step with ``args`` at every tick of the expression,
        read in ``timezone`` (see :meth:`schedule` and ``docs/periodic.md``).
        ``keep_result=True`` keeps what a plain job of the step returns, for
        :meth:`result_of`; ``tags`` label every job of the step (see ``docs/results.md``).
        """
        options = StepOptions(
            queue=queue,
            max_attempts=max_attempts,
            priority=priority,
            timeout=timeout,
            backoff=backoff,
            on_dep_cancelled=on_dep_cancelled,
            on_dep_discarded=on_dep_discarded,
            llm=llm,
            capture=capture,
            executor=executor,
            unique=coerce_unique(unique, name),
            keep_result=keep_result,
            tags=check_tags(tags, step=name),
        )
        # Validate the options once, here, rather than at every new().
        check_options(queue=queue, priority=priority, max_attempts=max_attempts, timeout=timeout,
                      step=name)

        def register(f: F) -> Step:
            step = Step(f, options, name=name, max_args_bytes=self.max_args_bytes)
            if step.name in self.steps:
                raise StepError(f"a step named {step.name!r} is already registered")
            if cron is None and args is not None:
                raise StepError(f"step {step.name!r}: args= are the arguments of a periodic "
                                "job; pass cron= too, or give them to step.new()")
            periodic = None if cron is None else self._new_schedule(
                step.new(**(args or {})), cron=cron, timezone=timezone, name=step.name)
            self.steps[step.name] = step
            if periodic is not None:
                self.schedules[periodic.name] = periodic
            return step

        return register(fn) if fn is not None else register

    @overload
    def llm_step(self, fn: F, /) -> Step: ...

    @overload
    def llm_step(
        self,
        fn: None = None,
        /,
        *,
        queue: str = "llm",
        max_attempts: int = 5,
        timeout: float | None = 300.0,
        **options: Any,
    ) -> Callable[[F], Step]: ...

    def llm_step(
        self,
        fn: F | None = None,
        /,
        *,
        queue: str = "llm",
        max_attempts: int = 5,
        timeout: float | None = 300.0,
        **options: Any,
    ) -> Step | Callable[[F], Step]:
        """Register an LLM step: the ``llm`` queue, five jittered attempts, a timeout, and
        a provider's HTTP 429 turned into a snooze. Takes the options of :meth:`step`."""
        register = self.step(queue=queue, max_attempts=max_attempts, timeout=timeout,
                             llm=True, **options)
        return register(fn) if fn is not None else register

    def schedule(self, job: JobSpec, *, cron: str, timezone: str = "UTC",
                 name: str | None = None) -> Schedule:
        """Enqueue ``job`` at every tick of ``cron`` read in ``timezone``; return the schedule.

        Workers started afterwards define it; the elected leader enqueues each tick once. A
        tick missed while no leader ran is enqueued late, once: only the latest of them
        (see ``docs/periodic.md``).

        :param cron: five fields (minute hour day-of-month month day-of-week), or six with
            seconds first.
        :param timezone: an IANA time zone; the ticks follow its daylight saving time.
        :param name: unique in the app; default the job's step name (name the others when
            one step has several schedules).
        :raises ScheduleError: if the expression, the time zone or the name is invalid, or
            the name is taken.
        """
        schedule = self._new_schedule(job, cron=cron, timezone=timezone, name=name)
        self.schedules[schedule.name] = schedule
        return schedule

    def _new_schedule(self, job: JobSpec, *, cron: str, timezone: str, name: str | None
                      ) -> Schedule:
        name = job.step if name is None else name
        if name in self.schedules:
            raise ScheduleError(name, "a schedule of that name is already registered; pass "
                                      "name=... to schedule a step more than once")
        check_sizes([job], self.max_args_bytes)
        return Schedule(name, job, cron, timezone)

    def get_step(self, name: str) -> Step:
        """Return the registered step called ``name``.

        :raises UnknownStepError: if there is none.
        """
        try:
            return self.steps[name]
        except KeyError:
            raise UnknownStepError(name) from None

    # -- connections ---------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether the async connection pool is open."""
        return self._pool is not None

    @loop_only
    async def open(self) -> None:
        """Open the async connection pool and its first connection (done on first use;
        call it to fail early). Cancellable throughout.

        A failure that cannot heal (no such database or role, failed authentication, a
        malformed URL) is raised at once; one that can (the server is starting, or not
        reachable yet) is retried for up to ``connect_timeout``.

        :raises DatabaseError: if no connection opens.
        """
        if self._pool is None:
            pool = await connections.open_pool(self.dsn, name=f"baton-{self.schema}",
                                               size=self.pool_size, timeout=self.connect_timeout,
                                               options=pooled_options(self.pooler))
            if self._pool is None:
                self._pool = pool
            else:  # another task opened one meanwhile: keep that one
                await pool.close()

    def open_sync(self) -> None:
        """Open the sync connection pool for the ``_sync`` API (done on first use), as
        :meth:`open` does the async one.

        :raises DatabaseError: if no connection opens.
        """
        self._open_sync()

    def _open_sync(self) -> ConnectionPool:
        """Open the sync connection pool, as :meth:`open` does the async one."""
        if self._sync_pool is None:
            pool = connections.open_pool_sync(self.dsn, name=f"baton-{self.schema}-sync",
                                              size=self.pool_size, timeout=self.connect_timeout,
                                              options=pooled_options(self.pooler))
            if self._sync_pool is None:
                self._sync_pool = pool
            else:  # another thread opened one meanwhile
                pool.close()
        return self._sync_pool

    @loop_only
    async def close(self) -> None:
        """Close the app's connection pools."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._read_pool is not None:
            await self._read_pool.close()
            self._read_pool = None
        self.close_sync()

    def close_sync(self) -> None:
        """Close the sync connection pool (for programs that only use the ``_sync`` API)."""
        if self._sync_pool is not None:
            self._sync_pool.close()
            self._sync_pool = None
        if self._read_sync_pool is not None:
            self._read_sync_pool.close()
            self._read_sync_pool = None

    async def __aenter__(self) -> Baton:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def connection(self, *, autocommit: bool = False
                         ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Lend a pooled connection; its transaction commits when the block ends cleanly.

        ``autocommit``: every statement commits on its own (no ``BEGIN``/``COMMIT`` round
        trips); use ``conn.transaction()`` inside the block where several must be atomic.

        :raises DatabaseError: if no connection can be had, or the commit fails
            (:class:`OutcomeUnknownError` if the connection is lost during the commit).
        """
        await self.open()
        assert self._pool is not None
        async with connections.lend(self._pool, autocommit=autocommit, write=True) as conn:
            yield conn

    @contextmanager
    def connection_sync(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """Lend a pooled sync connection; its transaction commits when the block ends.

        ``autocommit`` and errors: as for :meth:`connection`.
        """
        with connections.lend_sync(self._open_sync(), autocommit=autocommit,
                                   write=True) as conn:
            yield conn

    async def _run(
        self, op: ops.Op[T], action: str, conn: psycopg.AsyncConnection[Any] | None,
        *, single: bool = False, write: bool = True,
    ) -> T:
        """Run ``op`` on the caller's connection (in its transaction) or a pooled one.

        ``single``: the operation is one statement, so on a pooled connection it runs in
        autocommit, one round trip instead of two. Otherwise it runs in one transaction,
        also on a caller's connection in autocommit.
        ``write``: the operation writes; when its connection is lost once it may have
        committed, it raises :class:`OutcomeUnknownError`.
        """
        if conn is None:
            await self.open()
            assert self._pool is not None
            async with connections.lend(self._pool, autocommit=single, write=write) as own:
                return await connections.execute(own, op, action, write=write, commits=single)
        if conn.autocommit and not single:
            async with connections.transaction(conn, action, write=write):
                return await connections.execute(conn, op, action, write=write, commits=False)
        return await connections.execute(conn, op, action, write=write,
                                         commits=single and conn.autocommit)

    def _run_sync(
        self, op: ops.Op[T], action: str, conn: psycopg.Connection[Any] | None,
        *, single: bool = False, write: bool = True,
    ) -> T:
        if conn is None:
            with connections.lend_sync(self._open_sync(), autocommit=single,
                                       write=write) as own:
                return connections.execute_sync(own, op, action, write=write, commits=single)
        if conn.autocommit and not single:
            with connections.transaction_sync(conn, action, write=write):
                return connections.execute_sync(conn, op, action, write=write, commits=False)
        return connections.execute_sync(conn, op, action, write=write,
                                        commits=single and conn.autocommit)

    def _distinct_read_dsn(self) -> str | None:
        url = self._read_dsn or os.environ.get(ENV_READ_URL)
        return url if url and url != self._dsn else None

    async def _inspect(self, op: ops.Op[T], action: str) -> T:
        """Run the read-only ``op`` on the :attr:`read_dsn` pool (the app's own pool when
        there is no read URL of its own), in autocommit."""
        url = self._distinct_read_dsn()
        if url is None:
            return await self._run(op, action, None, single=True, write=False)
        if self._read_pool is None:
            pool = await connections.open_pool(
                url, name=f"baton-{self.schema}-read", size=self.pool_size,
                timeout=self.connect_timeout, options=pooled_options(self.pooler))
            if self._read_pool is None:
                self._read_pool = pool
            else:  # another task opened one meanwhile
                await pool.close()
        async with connections.lend(self._read_pool, autocommit=True, write=False) as conn:
            return await connections.execute(conn, op, action, write=False, commits=True)

    def _inspect_sync(self, op: ops.Op[T], action: str) -> T:
        """Run the read-only ``op`` from synchronous code, as :meth:`_inspect` does."""
        url = self._distinct_read_dsn()
        if url is None:
            return self._run_sync(op, action, None, single=True, write=False)
        if self._read_sync_pool is None:
            pool = connections.open_pool_sync(
                url, name=f"baton-{self.schema}-read-sync", size=self.pool_size,
                timeout=self.connect_timeout, options=pooled_options(self.pooler))
            if self._read_sync_pool is None:
                self._read_sync_pool = pool
            else:
                pool.close()
        with connections.lend_sync(self._read_sync_pool, autocommit=True, write=False) as conn:
            return connections.execute_sync(conn, op, action, write=False, commits=True)

    # -- schema --------------------------------------------------------------------------

    def migrate_sync(self) -> list[int]:
        """Apply pending migrations; return the versions applied."""
        return migrations.migrate_up(self.dsn, self.schema, connect_timeout=self.connect_timeout)

    @loop_only
    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.migrate_sync)

    # -- jobs ----------------------------------------------------------------------------

    @loop_only
    async def enqueue(self, job: JobSpec, *, conn: psycopg.AsyncConnection[Any] | None = None,
                      idempotency_key: str | None = None) -> JobId:
        """Insert one job and return its id.

        A unique job (``unique=``) whose key an existing job holds is not inserted: the
        existing job's id is returned, with ``duplicate`` set (see ``docs/unique.md``).

        :param conn: insert in the caller's transaction on this connection (nothing is
            committed here; a rollback enqueues nothing).
        :param idempotency_key: the database keeps at most one job with this key: when one
            exists, nothing is inserted and its id is returned. Retry with the same key
            after an :class:`OutcomeUnknownError` to get one job either way.
        :raises OutcomeUnknownError: if the connection was lost after the insert was sent.
        :raises PayloadTooLargeError: if its args are larger than ``max_args_bytes``.
        """
        check_sizes([job], self.max_args_bytes)
        op = ops.enqueue_one(self.sql, job, idempotency_key=idempotency_key)
        return await self._run(op, "enqueue", conn, single=True)

    @loop_only
    async def enqueue_many(
        self, jobs: Sequence[JobSpec], *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> JobIds:
        """Insert many jobs at once and return their ids in order.

        All or none are inserted. Unique jobs whose key is held (by an existing job or an
        earlier job of the call) are not: their ids are the holder's and their positions
        are in the result's ``duplicates``.
        A :class:`~baton.step.JobBatch` (``step.new_many``) is
        validated as it is sent, while the server inserts the rows before it.

        :param conn: insert in the caller's transaction on this connection.
        """
        self._check_sizes(jobs)
        op = ops.enqueue(self.sql, jobs, commit=conn is None)
        return await self._run(op, "enqueue", conn, single=ops.one_statement(jobs))

    def enqueue_sync(self, job: JobSpec, *, conn: psycopg.Connection[Any] | None = None,
                     idempotency_key: str | None = None) -> JobId:
        """Insert one job from synchronous code and return its id (see :meth:`enqueue`)."""
        check_sizes([job], self.max_args_bytes)
        op = ops.enqueue_one(self.sql, job, idempotency_key=idempotency_key)
        return self._run_sync(op, "enqueue", conn, single=True)

    def enqueue_many_sync(
        self, jobs: Sequence[JobSpec], *, conn: psycopg.Connection[Any] | None = None
    ) -> JobIds:
        """Insert many jobs from synchronous code and return their ids in order."""
        self._check_sizes(jobs)
        op = ops.enqueue(self.sql, jobs, commit=conn is None)
        return self._run_sync(op, "enqueue", conn, single=ops.one_statement(jobs))

    def _check_sizes(self, jobs: Sequence[JobSpec]) -> None:
        # A batch's jobs are built and checked by their step as the rows are sent.
        if not isinstance(jobs, JobBatch):
            check_sizes(jobs, self.max_args_bytes)

    @loop_only
    async def get_job(self, job_id: int) -> Job:
        """Return the job row with ``job_id``.

        :raises JobNotFound: if there is none.
        """
        return await self._run(ops.get_job(self.sql, job_id), "get job", None, single=True,
                               write=False)

    def get_job_sync(self, job_id: int) -> Job:
        """Return the job row with ``job_id`` from synchronous code."""
        return self._run_sync(ops.get_job(self.sql, job_id), "get job", None, write=False)

    @loop_only
    async def cancel(self, job_id: int) -> bool:
        """Cancel a job; a running one is told to stop. ``False`` if it already finished.

        A cancelled workflow step settles at once: its dependents are released to cancel
        themselves (or run, if they ignore cancelled dependencies).
        """
        cancelled, finished = await self._run(
            workflows.cancel_step(self.sql, job_id), "cancel", None
        )
        self._announce(finished)
        return cancelled

    def cancel_sync(self, job_id: int) -> bool:
        """Cancel a job from synchronous code."""
        cancelled, finished = self._run_sync(
            workflows.cancel_step(self.sql, job_id), "cancel", None
        )
        self._announce(finished)
        return cancelled

    @loop_only
    async def cancel_workflow(self, workflow_id: uuid.UUID | str) -> list[str]:
        """Cancel every step of a workflow that has not finished; return their names.

        Each is cancelled as :meth:`cancel` does it (a running one is told to stop), so the
        workflow finishes ``failed`` with one ``workflow_finished``. Steps that finish on
        their own meanwhile keep their outcome; :meth:`resume` runs the cancelled ones again.

        :raises WorkflowNotFound: if there is no such workflow.
        """
        wid = workflow_uuid(workflow_id)
        await self.get_workflow(wid)
        cancelled: list[str] = []
        tried: set[int] = set()
        while steps := [s for s in await self._run(_unfinished_steps(self.sql, wid),
                                                    "read unfinished steps", None,
                                                    single=True, write=False)
                        if s["job_id"] not in tried]:
            for step in steps:  # their dependents may settle meanwhile: read again after
                tried.add(step["job_id"])
                if await self.cancel(step["job_id"]):
                    cancelled.append(step["name"])
        return cancelled

    def cancel_workflow_sync(self, workflow_id: uuid.UUID | str) -> list[str]:
        """Cancel a workflow's unfinished steps from synchronous code (see
        :meth:`cancel_workflow`)."""
        wid = workflow_uuid(workflow_id)
        self.get_workflow_sync(wid)
        cancelled: list[str] = []
        tried: set[int] = set()
        while steps := [s for s in self._run_sync(_unfinished_steps(self.sql, wid),
                                                   "read unfinished steps", None,
                                                   single=True, write=False)
                        if s["job_id"] not in tried]:
            for step in steps:
                tried.add(step["job_id"])
                if self.cancel_sync(step["job_id"]):
                    cancelled.append(step["name"])
        return cancelled

    # -- workflows -----------------------------------------------------------------------

    @loop_only
    async def insert(
        self, workflow: Workflow, *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> WorkflowId:
        """Validate ``workflow`` and insert all of it in one transaction; return its id.

        A unique workflow (``Workflow(unique=...)``) whose key an existing workflow holds
        is not inserted: that workflow's id is returned, with ``duplicate`` set.

        :param conn: insert in the caller's transaction on this connection.
        :raises WorkflowError: (cycles, unknown dependencies, ...) before anything is written.
        """
        check_sizes([node.job for node in workflow.nodes.values()], self.max_args_bytes)
        return await self._run(workflows.insert(self.sql, workflow), "insert workflow",
                               conn)

    def insert_sync(
        self, workflow: Workflow, *, conn: psycopg.Connection[Any] | None = None
    ) -> WorkflowId:
        """Insert a workflow from synchronous code; return its id (see :meth:`insert`)."""
        check_sizes([node.job for node in workflow.nodes.values()], self.max_args_bytes)
        return self._run_sync(workflows.insert(self.sql, workflow), "insert workflow", conn)

    @loop_only
    async def append(self, workflow_id: uuid.UUID, workflow: Workflow) -> list[str]:
        """Add the steps of ``workflow`` to a running workflow; return their names."""
        check_sizes([node.job for node in workflow.nodes.values()], self.max_args_bytes)
        return await self._run(workflows.append(self.sql, workflow_id, workflow),
                               "append to workflow", None)

    def append_sync(self, workflow_id: uuid.UUID, workflow: Workflow) -> list[str]:
        """Add steps to a running workflow from synchronous code (see :meth:`append`)."""
        check_sizes([node.job for node in workflow.nodes.values()], self.max_args_bytes)
        return self._run_sync(workflows.append(self.sql, workflow_id, workflow),
                              "append to workflow", None)

    @loop_only
    async def result(self, workflow_id: uuid.UUID, step: str) -> Any:
        """Return the stored result of one step of a workflow.

        :raises NoSuchStepError: if the workflow has no such step.
        :raises NoResultError: if the step stored no result.
        """
        return await self._run(workflows.result(self.sql, workflow_id, step),
                               "read result", None, write=False)

    def result_sync(self, workflow_id: uuid.UUID, step: str) -> Any:
        """Return one step's stored result from synchronous code (see :meth:`result`)."""
        return self._run_sync(workflows.result(self.sql, workflow_id, step),
                              "read result", None, write=False)

    @loop_only
    async def results(self, workflow_id: uuid.UUID) -> dict[str, Any]:
        """Return every stored result of a workflow, by step name."""
        return await self._run(workflows.results(self.sql, workflow_id), "read results",
                               None, write=False)

    def results_sync(self, workflow_id: uuid.UUID) -> dict[str, Any]:
        """Return every stored result of a workflow from synchronous code."""
        return self._run_sync(workflows.results(self.sql, workflow_id), "read results",
                              None, write=False)

    @loop_only
    async def get_workflow(self, workflow_id: uuid.UUID) -> workflows.WorkflowInfo:
        """Return a workflow's row (state, counts, failed steps).

        :raises WorkflowNotFound: if there is none.
        """
        return await self._run(workflows.get(self.sql, workflow_id), "get workflow", None,
                               write=False)

    def get_workflow_sync(self, workflow_id: uuid.UUID) -> workflows.WorkflowInfo:
        """Return a workflow's row from synchronous code (see :meth:`get_workflow`)."""
        return self._run_sync(workflows.get(self.sql, workflow_id), "get workflow", None,
                              write=False)

    @loop_only
    async def result_of(self, job_id: int) -> Any:
        """Return what a completed job returned: a plain job's kept result (its step
        declared ``keep_result=True``), or a workflow step's stored result.

        :raises JobNotFound: if there is no such job.
        :raises ResultNotReadyError: if the job has not completed.
        :raises ResultNotKeptError: if its step does not keep results.
        """
        return await self._run(results.result_of(self.sql, job_id), "read result", None,
                               single=True, write=False)

    def result_of_sync(self, job_id: int) -> Any:
        """Return a completed job's result from synchronous code (see :meth:`result_of`)."""
        return self._run_sync(results.result_of(self.sql, job_id), "read result", None,
                              single=True, write=False)

    def workflow_from_template(self, data: dict[str, Any] | str) -> Workflow:
        """Compile a workflow from a template (dict or JSON); see :mod:`baton.templates`."""
        from baton.templates import compile_template

        return compile_template(self, data)

    def on(self, event: str, fn: Hook) -> Hook:
        """Call ``fn(event)`` for every ``event`` (``"workflow_step_updated"``,
        ``"workflow_finished"`` or ``"*"``) this process commits; see :class:`Events`."""
        return self.events.on(event, fn)

    def _announce(self, payloads: Sequence[dict[str, Any]]) -> None:
        self.events.publish(payloads)

    @loop_only
    async def retry(self, job_id: int) -> bool:
        """Make a job that is not running available again. ``False`` if it is running.

        A discarded or cancelled workflow step is resumed instead, with the discarded and
        cancelled steps downstream of it (see :meth:`resume`).

        :raises JobNotFound: if there is no such job.
        """
        changed, events = await self._run(workflows.retry_step(self.sql, job_id),
                                          "retry", None)
        self._announce(events)
        return changed

    def retry_sync(self, job_id: int) -> bool:
        """Retry a job from synchronous code (see :meth:`retry`)."""
        changed, events = self._run_sync(workflows.retry_step(self.sql, job_id),
                                         "retry", None)
        self._announce(events)
        return changed

    @loop_only
    async def resume(self, workflow_id: uuid.UUID | str, steps: Sequence[str] | None = None
                     ) -> list[str]:
        """Run the discarded and cancelled steps of a workflow again; return their names.

        Completed steps keep their results and do not run again; running ones are left
        alone. A finished workflow runs again as a new run (its ``run`` grows by one), and
        ends with a ``workflow_finished`` of its own. Nothing is done (and ``[]``
        returned) when no step is discarded or cancelled, as when another resume just
        did it.

        :param steps: resume only these steps and the discarded or cancelled steps
            downstream of them.
        :raises WorkflowNotFound: if there is no such workflow.
        :raises NoSuchStepError: if it has no step of one of ``steps``.
        """
        op = workflows.resume_workflow(self.sql, workflow_id, steps)
        resumed, events = await self._run(op, "resume workflow", None)
        self._announce(events)
        return resumed

    def resume_sync(self, workflow_id: uuid.UUID | str, steps: Sequence[str] | None = None
                    ) -> list[str]:
        """Resume a workflow from synchronous code (see :meth:`resume`)."""
        op = workflows.resume_workflow(self.sql, workflow_id, steps)
        resumed, events = self._run_sync(op, "resume workflow", None)
        self._announce(events)
        return resumed

    @loop_only
    async def set_budget(self, workflow_id: uuid.UUID | str, usd: float | Decimal, *,
                         group: str | None = None) -> Budget:
        """Set what the steps of a workflow (or of its fan-out group or sub-workflow
        ``group``) may spend, in US dollars; return the budget as it now stands.

        Raising a spent budget lets its steps be resumed; one set at or below what they
        spent already stops their steps that have not started, now.

        :raises WorkflowNotFound: if there is no such workflow.
        :raises WorkflowError: if it has no such group, or ``usd`` is not a positive number.
        """
        op = budgets.set_budget(self.sql, workflow_uuid(workflow_id), usd, group)
        budget, events = await self._run(op, "set budget", None)
        self._announce(events)
        return budget

    def set_budget_sync(self, workflow_id: uuid.UUID | str, usd: float | Decimal, *,
                        group: str | None = None) -> Budget:
        """Set a budget from synchronous code (see :meth:`set_budget`)."""
        op = budgets.set_budget(self.sql, workflow_uuid(workflow_id), usd, group)
        budget, events = self._run_sync(op, "set budget", None)
        self._announce(events)
        return budget

    @loop_only
    async def budgets(self, workflow_id: uuid.UUID | str) -> list[Budget]:
        """Return the budgets of a workflow (its own first), with what each scope spent."""
        return await self._run(budgets.budgets(self.sql, workflow_uuid(workflow_id)),
                               "read budgets", None, single=True, write=False)

    def budgets_sync(self, workflow_id: uuid.UUID | str) -> list[Budget]:
        """Return the budgets of a workflow from synchronous code (see :meth:`budgets`)."""
        return self._run_sync(budgets.budgets(self.sql, workflow_uuid(workflow_id)),
                              "read budgets", None, single=True, write=False)

    # -- queues --------------------------------------------------------------------------

    def _queue_op(self, name: str, **change: Any) -> ops.Op[QueueControl]:
        registered = {step.options.queue for step in self.steps.values()}
        return set_control(self.sql, name, registered=registered, **change)

    @loop_only
    async def pause_queue(self, name: str) -> QueueControl:
        """Pause a queue in every worker: none fetches its jobs (running ones finish; new
        ones are still accepted, and wait), now and after a restart, until resumed.

        :raises QueueNotFound: if no job, live worker or step of this app uses the queue.
        """
        return await self._run(self._queue_op(name, paused=True), "pause queue", None,
                               single=True)

    def pause_queue_sync(self, name: str) -> QueueControl:
        """Pause a queue from synchronous code (see :meth:`pause_queue`)."""
        return self._run_sync(self._queue_op(name, paused=True), "pause queue", None,
                              single=True)

    @loop_only
    async def resume_queue(self, name: str) -> QueueControl:
        """Resume a paused queue: its workers fetch its jobs again at once.

        :raises QueueNotFound: as :meth:`pause_queue`.
        """
        return await self._run(self._queue_op(name, paused=False), "resume queue", None,
                               single=True)

    def resume_queue_sync(self, name: str) -> QueueControl:
        """Resume a queue from synchronous code (see :meth:`resume_queue`)."""
        return self._run_sync(self._queue_op(name, paused=False), "resume queue", None,
                              single=True)

    @loop_only
    async def scale_queue(self, name: str, concurrency: int | None) -> QueueControl:
        """Set how many jobs of a queue each worker serving it runs at once, overriding
        the worker's own setting; ``None`` goes back to it. Scaling down interrupts no job:
        slots end as their jobs finish.

        :raises OptionsError: unless ``concurrency`` is ``None`` or from 1 to 10,000.
        :raises QueueNotFound: as :meth:`pause_queue`.
        """
        op = self._queue_op(name, scale=True, concurrency=concurrency)
        return await self._run(op, "scale queue", None, single=True)

    def scale_queue_sync(self, name: str, concurrency: int | None) -> QueueControl:
        """Scale a queue from synchronous code (see :meth:`scale_queue`)."""
        op = self._queue_op(name, scale=True, concurrency=concurrency)
        return self._run_sync(op, "scale queue", None, single=True)

    @loop_only
    async def list_queues(self) -> list[QueueInfo]:
        """Return every queue with its settings, jobs by state and live workers."""
        return await self._run(list_queues(self.sql), "list queues", None, single=True,
                               write=False)

    def list_queues_sync(self) -> list[QueueInfo]:
        """List the queues from synchronous code (see :meth:`list_queues`)."""
        return self._run_sync(list_queues(self.sql), "list queues", None, single=True,
                              write=False)

    # -- queue limits --------------------------------------------------------------------

    @loop_only
    async def limit_queue(
        self, name: str, *, concurrency: int | None = None, rate: WindowSpec | None = None,
        tokens: WindowSpec | None = None, partition_by: str | None = None,
        total_concurrency: int | None = None,
    ) -> QueueLimit:
        """Set the limits of a queue across all workers, replacing any it had; running
        workers obey at once. A limit not given is no limit.

        :param concurrency: the most jobs of the queue executing at once.
        :param rate: the most jobs started in any window: ``(20, 1.0)`` or ``"20/1s"``.
        :param tokens: no job starts while the queue's jobs recorded this many tokens
            (input + output) within the window: ``(100_000, 60.0)`` or ``"100000/1m"``.
        :param partition_by: a key of the jobs' args: every limit applies to each of its
            values on its own (per customer, per provider).
        :param total_concurrency: with ``partition_by``, the most jobs of the whole queue
            executing at once, whatever their partition.
        :raises ConfigurationError: for a bad name or limit, or none at all.
        """
        op = set_limit(self.sql, queue_limit(name, concurrency=concurrency, rate=rate,
                                             tokens=tokens, partition_by=partition_by,
                                             total_concurrency=total_concurrency))
        return await self._run(op, "limit queue", None, single=True)

    def limit_queue_sync(
        self, name: str, *, concurrency: int | None = None, rate: WindowSpec | None = None,
        tokens: WindowSpec | None = None, partition_by: str | None = None,
        total_concurrency: int | None = None,
    ) -> QueueLimit:
        """Set the limits of a queue from synchronous code (see :meth:`limit_queue`)."""
        op = set_limit(self.sql, queue_limit(name, concurrency=concurrency, rate=rate,
                                             tokens=tokens, partition_by=partition_by,
                                             total_concurrency=total_concurrency))
        return self._run_sync(op, "limit queue", None, single=True)

    @loop_only
    async def unlimit_queue(self, name: str) -> bool:
        """Remove every limit of a queue; ``False`` if it had none."""
        return await self._run(remove_limit(self.sql, name), "unlimit queue", None,
                               single=True)

    def unlimit_queue_sync(self, name: str) -> bool:
        """Remove a queue's limits from synchronous code (see :meth:`unlimit_queue`)."""
        return self._run_sync(remove_limit(self.sql, name), "unlimit queue", None, single=True)

    @loop_only
    async def queue_limits(self, names: Sequence[str] | None = None) -> list[QueueLimit]:
        """Return the limits of the queues ``names`` (of every limited queue by default)."""
        return await self._run(list_limits(self.sql, names), "read queue limits", None,
                               single=True, write=False)

    def queue_limits_sync(self, names: Sequence[str] | None = None) -> list[QueueLimit]:
        """Return queue limits from synchronous code (see :meth:`queue_limits`)."""
        return self._run_sync(list_limits(self.sql, names), "read queue limits", None,
                              single=True, write=False)


def _unfinished_steps(q: Queries, workflow_id: uuid.UUID) -> ops.Op[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = yield ops.Stmt(q["workflow_unfinished_steps"],
                                                {"id": workflow_id}, row_factory=dict_row)
    return rows
