"""Live workflow events: typed models, NOTIFY subscription, in-process hooks.

Every step transition is a :class:`StepUpdated`; the end of a workflow's run is one
:class:`WorkflowFinished`, and a resume that starts a run again is a
:class:`WorkflowResumed`. Events are sent with NOTIFY inside the transaction that made the
transition (so they arrive only if it committed), on the channel :func:`channel` names;
payloads over NOTIFY's limit travel by reference to ``event_payloads`` and arrive whole.

NOTIFY is lost while a listener is away, so a :class:`Subscription` that loses its
connection reconnects by itself and catches up from the ``workflows`` table: it listens
first, then reads what finished while it was away, and delivers each ``workflow_finished``
once (de-duplicated by workflow id and run).
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import anyio.abc
import psycopg
from anyio.streams.memory import MemoryObjectSendStream
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import AliasChoices, BaseModel, Field, TypeAdapter, field_validator

from baton.db import channel_name, connect, connect_heals, connection_lost, database_error, describe
from baton.logs import enabled, get_logger

if TYPE_CHECKING:
    from baton.app import Baton

log = get_logger("baton.events")

STEP_UPDATED = "workflow_step_updated"
WORKFLOW_FINISHED = "workflow_finished"
WORKFLOW_RESUMED = "workflow_resumed"
StepEventState = Literal["executing", "snoozed", "completed", "retryable", "discarded",
                         "cancelled"]


def channel(schema: str) -> str:
    """Return the NOTIFY channel carrying the workflow events of ``schema``."""
    return channel_name(schema, "events")


class _Event(BaseModel):
    workflow_id: uuid.UUID
    workflow_label: str
    timestamp: datetime

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


class StepUpdated(_Event):
    """A workflow step changed state."""

    type: Literal["workflow_step_updated"] = "workflow_step_updated"
    step_name: str
    """The step's name inside its workflow."""
    function: str = Field(validation_alias=AliasChoices("function", "worker"))
    """The registered step function it runs (``worker`` in payloads of older versions)."""
    state: StepEventState
    job_id: int
    attempt: int
    has_result: bool
    error: str | None = None


class WorkflowFinished(_Event):
    """The last step of a workflow settled; sent exactly once per run of the workflow."""

    type: Literal["workflow_finished"] = "workflow_finished"
    outcome: Literal["completed", "failed"]
    failed_steps: list[str]
    run: int = 1
    """The run that finished: 1, then one more for each resume of the finished workflow."""
    reason: str | None = None
    """Why steps of it were stopped before they started: ``budget_exceeded``, or ``None``."""
    spent_usd: float | None = None
    """For a workflow with a budget: what the priced usage of its steps cost, in US dollars."""


class WorkflowResumed(_Event):
    """Steps of a workflow were made to run again (``app.resume``); sent once per resume."""

    type: Literal["workflow_resumed"] = "workflow_resumed"
    run: int
    """The run the steps belong to: a new one if the workflow had finished."""
    steps: list[str]
    """The steps resumed, by name."""


AnyEvent = StepUpdated | WorkflowFinished | WorkflowResumed
Event = Annotated[AnyEvent, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)

Hook = Callable[[Any], Any]


def parse_event(data: dict[str, Any] | str) -> AnyEvent:
    """Return the typed event for a payload (dict or JSON text)."""
    if isinstance(data, str):
        return _EVENT.validate_json(data)
    return _EVENT.validate_python(data)


def finished_event(row: dict[str, Any]) -> WorkflowFinished:
    """Return the ``workflow_finished`` event of a finished ``workflows`` row (``id``,
    ``label``, ``state``, ``failed_steps``, ``finished_at``, ``run``): the event its
    settlement sent (``steps_settle``), field for field, for a subscriber that missed it."""
    spent = row.get("spent_usd")
    return WorkflowFinished(workflow_id=row["id"], workflow_label=row["label"],
                            outcome=row["state"], failed_steps=list(row["failed_steps"]),
                            timestamp=row["finished_at"], run=row["run"],
                            reason=row.get("stop_reason"),
                            spent_usd=None if spent is None else float(spent))


FINAL_STEP_STATES = frozenset({"completed", "discarded", "cancelled"})

SUBSCRIBER_APPLICATION_NAME = "baton-events"
"""The ``application_name`` of a subscriber's connection (find it in ``pg_stat_activity``)."""

RECONNECT_FIRST_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 5.0

# Connection (08), resources (53) and shutdown / start-up (57P01-57P03) errors may heal.
_TRANSIENT_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03")


def reconnect_delay(attempt: int, *, rng: random.Random | None = None) -> float:
    """Return how long a subscriber waits before its reconnection attempt ``attempt``.

    The ceiling doubles from 50 ms to 5 s; the delay is drawn from its upper half, so the
    subscribers a server restart dropped together do not all come back at once.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    ceiling = min(RECONNECT_MAX_SECONDS, RECONNECT_FIRST_SECONDS * 2.0 ** min(attempt - 1, 30))
    return ceiling * (rng or random).uniform(0.5, 1.0)


def is_transient(exc: psycopg.Error) -> bool:
    """Whether an error on a subscriber's open connection may heal by reconnecting: the
    connection was lost (the driver has no SQLSTATE for it), or the server was shutting
    down or short of resources. An error a statement got back (a missing table) does not."""
    if exc.sqlstate is None:
        return connection_lost(exc)
    return exc.sqlstate.startswith(_TRANSIENT_SQLSTATES)


class Events:
    """The event surface of an app: ``subscribe`` across processes, ``on`` in-process."""

    def __init__(self, app: Baton) -> None:
        self.app = app
        self.hooks: dict[str, list[Hook]] = {}
        self.counts: Counter[str] = Counter()
        """Events this process committed, by state (``"completed"``, ...), outcome
        (``"workflow_completed"``, ``"workflow_failed"``) and ``"workflow_resumed"``:
        counters for metrics."""
        self.hook_timeout = 5.0
        self.catch_up_margin = 30.0
        """Seconds a subscriber that reconnects reads back before the last moment it knew it
        was listening: a workflow's ``finished_at`` is its settling transaction's start, which
        may commit (and notify) later; a transaction open longer than this may be missed."""
        self.application_name = SUBSCRIBER_APPLICATION_NAME
        """The ``application_name`` of subscribers' connections."""
        self._send: MemoryObjectSendStream[AnyEvent] | None = None

    @property
    def channel(self) -> str:
        """This app's event channel."""
        return channel(self.app.schema)

    def on(self, name: str, fn: Hook) -> Hook:
        """Call ``fn(event)`` (sync or async) for each event ``name`` (or ``"*"``).

        A hook that fails or is slow is logged and never breaks a job. Async hooks run
        inside worker processes; elsewhere only sync hooks are called.
        """
        if name not in (STEP_UPDATED, WORKFLOW_FINISHED, WORKFLOW_RESUMED, "*"):
            raise ValueError(f"unknown event {name!r}: use {STEP_UPDATED!r}, "
                             f"{WORKFLOW_FINISHED!r}, {WORKFLOW_RESUMED!r} or '*'")
        self.hooks.setdefault(name, []).append(fn)
        return fn

    def publish(self, payloads: Iterable[dict[str, Any]]) -> None:
        """Log and hand committed events to the in-process hooks."""
        # Checked once per batch: building each step's log fields for a line that is
        # dropped cost ~6 % of a workflow step's Python time (1 -> 10,000 -> 1 profile).
        info = enabled(log, logging.INFO)
        for payload in payloads:
            kind = payload.get("type")
            if kind == WORKFLOW_FINISHED:
                count, name = f"workflow_{payload.get('outcome')}", "workflow.finished"
            elif kind == WORKFLOW_RESUMED:
                count, name = WORKFLOW_RESUMED, "workflow.resumed"
            else:
                count, name = str(payload.get("state")), "workflow.step_updated"
            self.counts[count] += 1
            failed = count == "workflow_failed"  # whoever finished it: completer or sweep
            if info or failed:
                (log.warning if failed else log.info)(
                    name, **{k: v for k, v in payload.items() if k != "type"})
            if not self.hooks:
                continue  # typed events only for hooks: a batch of steps stays cheap
            event = parse_event(payload)
            if self._send is not None:
                try:
                    self._send.send_nowait(event)
                except anyio.WouldBlock:
                    log.warning("events.hook_backlog_full", dropped=event.type)
            else:
                self._call_sync_hooks(event)

    def _hooks_for(self, event: AnyEvent) -> list[Hook]:
        return [*self.hooks.get(event.type, ()), *self.hooks.get("*", ())]

    def _call_sync_hooks(self, event: AnyEvent) -> None:
        for hook in self._hooks_for(event):
            if inspect.iscoroutinefunction(hook):
                continue
            try:
                hook(event)
            except Exception as exc:
                log.warning("events.hook_failed", hook=getattr(hook, "__name__", "?"),
                            error=f"{type(exc).__name__}: {exc}")

    async def dispatch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                       ) -> None:
        """Run hooks in the background for this process (a worker starts it)."""
        send, receive = anyio.create_memory_object_stream[AnyEvent](10_000)
        self._send = send
        task_status.started()
        try:
            async with receive:
                async for event in receive:
                    for hook in self._hooks_for(event):
                        with anyio.move_on_after(self.hook_timeout) as scope:
                            try:
                                value = hook(event)
                                if inspect.isawaitable(value):
                                    await value
                            except Exception as exc:
                                log.warning("events.hook_failed",
                                            hook=getattr(hook, "__name__", "?"),
                                            error=f"{type(exc).__name__}: {exc}")
                        if scope.cancelled_caught:
                            log.warning("events.hook_timeout", hook=getattr(hook, "__name__", "?"),
                                        timeout=self.hook_timeout)
        finally:
            self._send = None

    @asynccontextmanager
    async def subscribe(
        self, workflow_id: uuid.UUID | str | None = None
    ) -> AsyncIterator[AsyncIterator[AnyEvent]]:
        """Listen for events of every workflow, or of one; yields an async iterator.

        Listening starts before the block is entered, so nothing sent after that is missed.
        A lost connection is reopened by itself (with a jittered, capped backoff), and what
        was missed is read back: each ``workflow_finished`` sent after the block was entered
        arrives once per run; a subscriber of one workflow gets the ``workflow_finished`` of
        its latest run once even if it finished before, and after a reconnect the latest
        state of each of its steps that changed meanwhile. Step and ``workflow_resumed``
        events sent while away are lost, and so is the finish of a run that a resume
        followed while away (the ``workflows`` row holds the latest run's).

        :raises DatabaseError: on entry, if no connection opens within the app's
            ``connect_timeout``; while iterating, for a failure a reconnect cannot heal
            (such as baton's tables being gone).
        """
        wanted = uuid.UUID(str(workflow_id)) if workflow_id is not None else None
        subscription = Subscription(self, wanted)
        await subscription.open()
        try:
            yield subscription.events()
        finally:
            await subscription.close()


Row = dict[str, Any]


class Subscription:
    """One subscriber's connection, and what it delivered so far.

    On every (re)connection it listens first, then reads what it may have missed; whatever
    both the read and a notification bring is delivered once. For a subscriber of every
    workflow, the read covers the workflows finished since ``mark`` (a server time at which
    it was surely still listening) less the app's ``catch_up_margin``; ``seen`` remembers
    what was delivered within that window.
    """

    def __init__(self, events: Events, wanted: uuid.UUID | None) -> None:
        self.app = events.app
        self.channel = events.channel
        self.margin = timedelta(seconds=events.catch_up_margin)
        self.application_name = events.application_name
        self.wanted = wanted
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.closed = False
        self.pending: deque[AnyEvent] = deque()
        self.seen: dict[tuple[uuid.UUID, int], datetime] = {}
        """``workflow_finished`` delivered (or finished before the subscription began):
        (workflow id, run) -> finished_at."""
        self.mark: datetime | None = None
        self.steps: dict[str, tuple[int, int, str]] = {}
        """Subscriber of one workflow: the last state delivered per step (job id, attempt,
        state)."""
        self._prune_at = 1024

    async def open(self) -> None:
        """Connect and listen, retrying what may heal for the app's ``connect_timeout``.

        :raises DatabaseError: if that fails.
        """
        deadline = anyio.current_time() + self.app.connect_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._connect(first=True, timeout=deadline - anyio.current_time())
                return
            except psycopg.Error as exc:
                await self._drop()
                if not is_transient(exc) or anyio.current_time() >= deadline:
                    raise database_error(exc, "subscribing to events") from exc
            await anyio.sleep(reconnect_delay(attempt))

    async def close(self) -> None:
        """Stop: close the connection; the iterator ends."""
        self.closed = True
        await self._drop()

    async def events(self) -> AsyncIterator[AnyEvent]:
        """Yield events as they arrive, reconnecting and catching up when the connection
        is lost."""
        while not self.closed:
            while self.pending:
                yield self.pending.popleft()
            try:
                await self._receive()
            except psycopg.Error as exc:
                if self.closed:
                    return
                await self._recover(exc)

    async def _connect(self, *, first: bool, timeout: float | None = None) -> None:
        """Connect, listen and catch up. The first connect retries for up to ``timeout``
        seconds; a reconnect tries once (its caller retries).

        :raises DatabaseError: if the connect cannot heal (no such database, a refused
            login), or the first one timed out.
        """
        options: dict[str, Any] = {
            "autocommit": True, "application_name": self.application_name,
            # A peer that vanished without a word is noticed within about 25 s.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3}
        if timeout is not None:
            conn = await connect(self.app.listen_dsn, max(timeout, 0.0), **options)
        else:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.app.listen_dsn, connect_timeout=10, **options)
            except psycopg.Error as exc:
                if connect_heals(exc):
                    raise
                raise database_error(exc, "reconnecting to events") from exc
        self.conn = conn
        if first and self.wanted is None:
            # What finished just before listening began was never promised: keep it from a
            # later catch-up (read before LISTEN, so nothing announced after it is in here).
            rows = await self._rows("workflows_finished_since",
                                    {"since": None, "margin": self.margin.total_seconds()})
            self.mark = rows[0]["read_at"]
            self.seen.update(((r["id"], r["run"]), r["finished_at"])
                             for r in rows if r["id"] is not None)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        if self.wanted is not None:
            await self._catch_up_one(self.wanted, steps=not first)
        elif not first:
            await self._catch_up_all()

    async def _rows(self, query: str, params: dict[str, Any]) -> list[Row]:
        assert self.conn is not None
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self.app.sql[query], params)
            return await cur.fetchall()

    async def _catch_up_all(self) -> None:
        assert self.mark is not None
        rows = await self._rows("workflows_finished_since", {
            "since": self.mark - self.margin, "margin": self.margin.total_seconds()})
        self.mark = max(self.mark, rows[0]["read_at"])  # read after LISTEN: listening then
        for row in rows:
            if row["id"] is not None:
                self._offer(finished_event(row))

    async def _catch_up_one(self, workflow_id: uuid.UUID, *, steps: bool) -> None:
        # The finish first: if it is not there yet, the steps read next cannot be older
        # than the live workflow_finished that follows them.
        finished = await self._rows("workflow_finished_get", {"id": workflow_id})
        if steps:
            for row in await self._rows("workflow_steps_latest", {"id": workflow_id}):
                self._offer(StepUpdated(
                    workflow_id=workflow_id, workflow_label=row["label"],
                    step_name=row["name"], function=row["step"], state=row["state"],
                    job_id=row["id"], attempt=row["attempt"], has_result=row["has_result"],
                    error=row["error"], timestamp=row["at"]))
        for row in finished:
            self._offer(finished_event(row))

    async def _receive(self) -> None:
        """Wait for the next notifications and queue their new events."""
        conn = self.conn
        if conn is None:
            raise psycopg.OperationalError("the subscriber's connection is closed")
        notes = [note async for note in conn.notifies(stop_after=1)]
        for note in notes:
            batch = json.loads(note.payload)
            for data in batch if isinstance(batch, list) else [batch]:
                if set(data) == {"ref"}:
                    rows = await self._rows("event_payload_get", {"id": data["ref"]})
                    if not rows:
                        continue
                    data = rows[0]["payload"]
                self._offer(parse_event(data))

    def _offer(self, event: AnyEvent) -> None:
        """Queue ``event`` unless it is not wanted or was delivered already."""
        if self.wanted is not None and event.workflow_id != self.wanted:
            return
        if isinstance(event, WorkflowFinished):
            key = (event.workflow_id, event.run)
            if key in self.seen:
                return
            self.seen[key] = event.timestamp
            if self.mark is not None:
                # Delivered, so the connection was up when it committed, after this time.
                self.mark = max(self.mark, event.timestamp)
                self._prune()
        elif (isinstance(event, StepUpdated) and self.wanted is not None
              and not self._step_is_new(event)):
            return
        self.pending.append(event)

    def _step_is_new(self, event: StepUpdated) -> bool:
        """Whether a step event of the one workflow says more than what was delivered.

        A catch-up reports each step's latest state; the notifications of transitions that
        committed just before it may still arrive after it, and must not take a step back.
        A step's attempts only grow, a final state ends an attempt, and an attempt never
        reports one state twice in a row.
        """
        last = self.steps.get(event.step_name)
        if last is not None and last[0] == event.job_id:
            _, attempt, state = last
            if event.attempt < attempt or (event.attempt == attempt and (
                    state in FINAL_STEP_STATES or event.state == state)):
                return False
        self.steps[event.step_name] = (event.job_id, event.attempt, event.state)
        return True

    def _prune(self) -> None:
        """Forget finishes far behind ``mark``: no catch-up reads back that far."""
        if len(self.seen) <= self._prune_at or self.mark is None:
            return
        floor = self.mark - 2 * self.margin
        self.seen = {k: v for k, v in self.seen.items() if v >= floor}
        self._prune_at = max(1024, 2 * len(self.seen))

    async def _recover(self, exc: psycopg.Error) -> None:
        """Reconnect after ``exc`` and catch up, retrying with backoff until it works.

        :raises DatabaseError: if ``exc``, or a failure while reconnecting, cannot heal.
        """
        if not is_transient(exc):
            raise database_error(exc, "event subscription") from exc
        log.warning("events.disconnected", error=describe(exc),
                    workflow_id=str(self.wanted) if self.wanted else None)
        await self._drop()
        started = anyio.current_time()
        queued = len(self.pending)
        attempt = 0
        while True:
            attempt += 1
            await anyio.sleep(reconnect_delay(attempt))
            try:
                await self._connect(first=False)
            except psycopg.Error as err:
                await self._drop()
                if not is_transient(err):
                    raise database_error(err, "event subscription") from err
                log.debug("events.reconnect_failed", attempt=attempt, error=describe(err))
                continue
            log.info("events.reconnected", attempts=attempt,
                     away=round(anyio.current_time() - started, 3),
                     caught_up=len(self.pending) - queued,
                     workflow_id=str(self.wanted) if self.wanted else None)
            return

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()
