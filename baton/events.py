"""Live workflow events: typed models, NOTIFY subscription, in-process hooks.

Every step transition is a :class:`StepUpdated`; the end of a workflow is one
:class:`WorkflowFinished`. Events are sent with NOTIFY inside the transaction that made the
transition (so they arrive only if it committed), on the channel :func:`channel` names;
payloads over NOTIFY's limit travel by reference to ``event_payloads`` and arrive whole.
"""

from __future__ import annotations

import inspect
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import anyio.abc
import psycopg
import structlog
from anyio.streams.memory import MemoryObjectSendStream
from psycopg import sql
from pydantic import BaseModel, Field, TypeAdapter, field_validator

from baton.db import channel_name

if TYPE_CHECKING:
    from baton.app import Baton

log = structlog.get_logger("baton.events")

STEP_UPDATED = "workflow_step_updated"
WORKFLOW_FINISHED = "workflow_finished"
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
    worker: str
    state: StepEventState
    job_id: int
    attempt: int
    has_result: bool
    error: str | None = None


class WorkflowFinished(_Event):
    """The last step of a workflow settled; sent exactly once per workflow."""

    type: Literal["workflow_finished"] = "workflow_finished"
    outcome: Literal["completed", "failed"]
    failed_steps: list[str]


Event = Annotated[StepUpdated | WorkflowFinished, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)

Hook = Callable[[Any], Any]


def parse_event(data: dict[str, Any] | str) -> StepUpdated | WorkflowFinished:
    """Return the typed event for a payload (dict or JSON text)."""
    if isinstance(data, str):
        return _EVENT.validate_json(data)
    return _EVENT.validate_python(data)


class Events:
    """The event surface of an app: ``subscribe`` across processes, ``on`` in-process."""

    def __init__(self, app: Baton) -> None:
        self.app = app
        self.hooks: dict[str, list[Hook]] = {}
        self.counts: Counter[str] = Counter()
        """Events this process committed, by state (``"completed"``, ...) and outcome
        (``"workflow_completed"``, ``"workflow_failed"``): counters for metrics."""
        self.hook_timeout = 5.0
        self._send: MemoryObjectSendStream[StepUpdated | WorkflowFinished] | None = None

    @property
    def channel(self) -> str:
        """This app's event channel."""
        return channel(self.app.schema)

    def on(self, name: str, fn: Hook) -> Hook:
        """Call ``fn(event)`` (sync or async) for each event ``name`` (or ``"*"``).

        A hook that fails or is slow is logged and never breaks a job. Async hooks run
        inside worker processes; elsewhere only sync hooks are called.
        """
        if name not in (STEP_UPDATED, WORKFLOW_FINISHED, "*"):
            raise ValueError(f"unknown event {name!r}: use {STEP_UPDATED!r}, "
                             f"{WORKFLOW_FINISHED!r} or '*'")
        self.hooks.setdefault(name, []).append(fn)
        return fn

    def publish(self, payloads: Iterable[dict[str, Any]]) -> None:
        """Log and hand committed events to the in-process hooks."""
        for payload in payloads:
            finished = payload.get("type") == WORKFLOW_FINISHED
            self.counts[f"workflow_{payload.get('outcome')}" if finished
                        else str(payload.get("state"))] += 1
            log.info("workflow.finished" if finished else "workflow.step_updated",
                     **{k: v for k, v in payload.items() if k != "type"})
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

    def _hooks_for(self, event: StepUpdated | WorkflowFinished) -> list[Hook]:
        return [*self.hooks.get(event.type, ()), *self.hooks.get("*", ())]

    def _call_sync_hooks(self, event: StepUpdated | WorkflowFinished) -> None:
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
        send, receive = anyio.create_memory_object_stream[StepUpdated | WorkflowFinished](10_000)
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
    ) -> AsyncIterator[AsyncIterator[StepUpdated | WorkflowFinished]]:
        """Listen for events of every workflow, or of one; yields an async iterator.

        Listening starts before the block is entered, so nothing sent after that is missed.
        """
        wanted = uuid.UUID(str(workflow_id)) if workflow_id is not None else None
        conn = await psycopg.AsyncConnection.connect(self.app.dsn, autocommit=True)
        reader: psycopg.AsyncConnection[Any] | None = None
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))

            async def stream() -> AsyncIterator[StepUpdated | WorkflowFinished]:
                nonlocal reader
                async for note in conn.notifies():
                    batch = json.loads(note.payload)
                    for data in batch if isinstance(batch, list) else [batch]:
                        if set(data) == {"ref"}:
                            if reader is None:
                                reader = await psycopg.AsyncConnection.connect(
                                    self.app.dsn, autocommit=True)
                            cur = await reader.execute(self.app.queries["event_payload_get"],
                                                       {"id": data["ref"]})
                            row = await cur.fetchone()
                            if row is None:
                                continue
                            data = row[0]
                        event = parse_event(data)
                        if wanted is None or event.workflow_id == wanted:
                            yield event

            yield stream()
        finally:
            await conn.close()
            if reader is not None:
                await reader.close()
