"""The database passes of a worker's periodic services, and how its shutdown ends them.

A query cut off by anyio cancellation is one psycopg tries to cancel on the server; the
wait for that is cancelled again (the scope stays cancelled), so psycopg logs "query
cancellation interrupted (CancelledError): closing connection" and throws the connection
away, and a COMMIT cut off that way has an unknown outcome. So the shutdown does not
cancel a pass under way (maintenance, schedules, limits, reconciling): it lets it end,
up to :data:`GRACE`, and the services' loops start no pass after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio

GRACE = 5.0
"""The longest a pass under way may hold up the worker's shutdown (seconds)."""


class Passes:
    """Shields each periodic pass of one worker from its shutdown, then ends them."""

    def __init__(self) -> None:
        self._running: set[anyio.CancelScope] = set()
        self._deadline: float | None = None
        self._idle: anyio.Event | None = None

    @property
    def closing(self) -> bool:
        """The worker is stopping: a service's loop starts no pass now."""
        return self._deadline is not None

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Run one pass in the block: the worker's cancellation does not reach it (it
        ends by itself, or is cut off once the worker has closed and the grace passed)."""
        with anyio.CancelScope(shield=True) as scope:
            if self._deadline is not None:
                scope.deadline = self._deadline
            self._running.add(scope)
            try:
                yield
            finally:
                self._running.discard(scope)
                if not self._running and self._idle is not None:
                    self._idle.set()

    async def close(self, grace: float = GRACE) -> None:
        """Start no more passes and wait for those under way, cutting off any still
        running after ``grace`` seconds."""
        self._deadline = anyio.current_time() + grace
        for scope in self._running:
            scope.deadline = min(scope.deadline, self._deadline)
        if self._running:
            self._idle = anyio.Event()
            await self._idle.wait()
