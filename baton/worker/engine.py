"""The seam between the queue core and the engine on top of it.

The core (producer, executor, completer) moves jobs; an :class:`Engine` gives them meaning.
The core calls it at its moments, each for a batch and on the connection the core already
holds: when jobs are claimed (:meth:`Engine.claimed`), when one starts
(:meth:`Engine.run`), and when their outcomes are written (:meth:`Engine.written`, whose
:class:`Write` the completer sends in its own transaction). Inserting is the engine's own
call: it drives the inserter in the caller's transaction. The workflow engine
(:class:`baton.workflows.engine.WorkflowEngine`) is the implementation; plain jobs go
through it with nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from baton.ops import Op, Rows, Stmt
from baton.worker.executor import FetchedJob, Outcome

Payload = dict[str, Any]

NO_FINISH_EVENTS: dict[str, Any] = {"event_jobs": [], "event_chunks": [], "event_bodies": []}
"""``jobs_finish`` parameters of a batch that sends no step events."""


@dataclass(slots=True)
class Write:
    """What the engine adds to the write of a batch of outcomes.

    The completer sends, in one round trip when it can: ``ahead`` in a transaction of its
    own (kept even if the rest fails: a step's result), then ``before``, the finish
    statement (with ``finish_params``) and ``after`` in one transaction. ``after``
    statements go out before the finish's rows are read, so each checks the job states the
    finish left rather than being told what it applied. The rows of the last of them go
    to ``conclude``, an operation whose statements are sent before the COMMIT (one that
    reads rows of its own waits for them: a write that needs it pays a round trip more).
    """

    ahead: list[Stmt] = field(default_factory=list)
    before: list[Stmt] = field(default_factory=list)
    finish_params: dict[str, Any] = field(default_factory=lambda: NO_FINISH_EVENTS)
    after: list[Stmt] = field(default_factory=list)
    conclude: Callable[[Rows], Op[Any]] | None = None
    events: Callable[[set[int]], list[Payload]] | None = None
    """The event payloads sent, given the ids of the jobs whose outcome was applied."""

    @property
    def empty(self) -> bool:
        return not (self.ahead or self.before or self.after)


PLAIN = Write()
"""The write of a batch of plain outcomes: the finish statement alone."""


class Engine(Protocol):
    """What the core calls at its moments."""

    async def claimed(self, conn: psycopg.AsyncConnection[Any], jobs: list[FetchedJob]
                      ) -> list[Payload]:
        """Jobs were claimed on ``conn`` (autocommit): load what running them needs.
        Returns event payloads to publish in-process. A database error leaves the jobs
        claimed; :meth:`run` then defers them."""

    async def run(self, job: FetchedJob) -> Outcome:
        """Run one claimed job to its outcome."""

    def written(self, outcomes: Sequence[Outcome]) -> Write:
        """What writing ``outcomes`` must also send (:data:`PLAIN` for plain jobs)."""
