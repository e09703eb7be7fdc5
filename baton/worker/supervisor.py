"""The supervisor of ``baton worker --processes N``: N worker processes kept running.

Each child is a whole ``baton worker`` (a fresh interpreter started with the supervisor's
own command line and ``--processes 1``), so it registers its own heartbeat row, fetches
its own jobs and is rescued like any other worker when it dies. The supervisor itself
never connects to the database and runs no jobs. It:

- starts the children and learns when each is ready (its worker started) through a pipe;
- restarts a child that exits while the supervisor is not stopping, after a backoff that
  doubles while the child of that slot keeps dying young (:data:`BACKOFF` up to
  :data:`MAX_BACKOFF`); a child that exits :data:`MAX_FAILED_STARTS` times in a row
  before it was ready (a bad deploy, an unmigrated schema) makes it give up: the other
  children are stopped gracefully and ``baton worker`` exits with status 2 and a message.
  A child the system will not start (no process or pipe to be had: too many open files
  or processes, no memory, an interpreter removed by a deploy) counts as such a start;
- forwards SIGTERM and SIGINT to the children, which stop gracefully (running jobs get
  their ``--shutdown-grace``), and exits once every child has; a second signal kills them.

The supervisor is a plain loop on one thread: signals and the children's ready pipes wake
one ``select``, and ``SIGCHLD`` tells it to reap. A child dies with its supervisor
(``PR_SET_PDEATHSIG`` on Linux, with SIGTERM so that it, too, stops gracefully).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import anyio

from baton.errors import ConfigurationError, WorkerStartError
from baton.logs import get_logger
from baton.worker.processes import die_with

log = get_logger("baton.supervisor")

ENV_SUPERVISOR_PID = "BATON_SUPERVISOR_PID"
"""Set in a child's environment: the supervisor's pid (the child dies with it)."""
ENV_READY_FD = "BATON_SUPERVISOR_READY_FD"
"""Set in a child's environment: the pipe on which the child says it is ready."""

BACKOFF = 0.5
"""Seconds before the first restart of a slot's child; doubled for each further quick
death of that slot's children."""
MAX_BACKOFF = 30.0
"""The longest wait before a restart."""
STABLE_AFTER = 30.0
"""A child that ran this long after it was ready resets its slot's backoff."""
MAX_FAILED_STARTS = 5
"""After this many children of one slot in a row exit before they are ready, give up."""
EXIT_WITH_THREADS = 70
"""A child's status when it ended past its grace with plain def steps still running
(as the worker's own ``EXIT_WITH_THREADS``); the supervisor exits with it too."""
_POLL = 2.0
"""The longest the loop waits without a signal: a safety net, not the way it learns."""


def parse_processes(text: str | int) -> int:
    """Parse ``--processes``: a whole number from 1, or ``auto`` for one per usable core.

    :raises ConfigurationError: for anything else.
    """
    if isinstance(text, str) and text.strip().lower() == "auto":
        return usable_cores()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigurationError(
            f"--processes: expected a whole number from 1, or 'auto', got {str(text)!r:.40}")
    return count


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command line of one child: the supervisor's own ``baton`` arguments, with
    ``--processes 1`` last (argparse keeps the last value given)."""
    return [sys.executable, "-m", "baton", *argv, "--processes", "1"]


def backoff(quick_deaths: int) -> float:
    """Seconds to wait before restarting a slot whose children died young this many times
    in a row (1 for the first)."""
    return float(min(BACKOFF * 2 ** max(quick_deaths - 1, 0), MAX_BACKOFF))


def _status_text(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-status).name
    return str(status)


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    ready_fd: int | None
    started_at: float
    ready_at: float | None = None


@dataclass
class _Slot:
    index: int
    child: _Child | None = None
    quick_deaths: int = 0
    failed_starts: int = 0
    restart_at: float | None = None
    restarts: int = 0
    statuses: list[int] = field(default_factory=list)
    """The statuses its children ended with while the supervisor was stopping."""


class Supervisor:
    """Runs ``processes`` copies of ``command`` until a signal stops them.

    :param command: the child's command line (see :func:`worker_command`).
    :param env: the children's environment (default: this process's).
    """

    def __init__(self, processes: int, command: Sequence[str], *,
                 env: Mapping[str, str] | None = None) -> None:
        if processes < 1:
            raise ConfigurationError("a supervisor needs at least one process")
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.slots = [_Slot(i) for i in range(processes)]
        self.stopping: signal.Signals | None = None
        self.forced: signal.Signals | None = None
        self.gave_up: WorkerStartError | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r = -1

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Start the children and supervise them until they have all stopped; return the
        exit status (0 when each child stopped cleanly, see docs/processes.md).

        Call it on the main thread (it installs signal handlers, restored on return).

        :raises WorkerStartError: when children keep exiting before they are ready.
        """
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_r = wake_r
        self._selector.register(wake_r, selectors.EVENT_READ)
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, _note)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        try:
            log.info("supervisor.started", pid=os.getpid(), processes=len(self.slots))
            for slot in self.slots:
                self._start(slot)
            self._loop()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for slot in self.slots:  # only on an unexpected error: they stop gracefully
                if slot.child is not None and slot.child.proc.poll() is None:
                    slot.child.proc.terminate()
                if slot.child is not None and slot.child.ready_fd is not None:
                    os.close(slot.child.ready_fd)
            self._selector.close()
            os.close(wake_r)
            os.close(wake_w)
        status = self._status()
        log.info("supervisor.stopped", status=status)
        if self.gave_up is not None:
            raise self.gave_up
        return status

    def _loop(self) -> None:
        while any(slot.child is not None or slot.restart_at is not None for slot in self.slots):
            for key, _ in self._selector.select(self._timeout()):
                if key.fd == self._wake_r:
                    self._on_signals()
                else:
                    self._on_ready(key.data)
            self._reap()
            self._restart_due()

    def _timeout(self) -> float:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if not due:
            return _POLL
        return max(0.0, min(_POLL, min(due) - time.monotonic()))

    def _status(self) -> int:
        if self.forced is not None:
            return 128 + self.forced
        # A child still starting when the signal came may end by it (its handlers were not
        # in place yet): it had no jobs, so that is a clean stop too.
        stopped = {0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM,
                   128 + signal.SIGINT}
        statuses = [status for slot in self.slots for status in slot.statuses]
        if all(status in stopped for status in statuses):
            return 0
        if all(status in stopped or status == EXIT_WITH_THREADS for status in statuses):
            return EXIT_WITH_THREADS
        return 1

    # -- signals ---------------------------------------------------------------------------

    def _on_signals(self) -> None:
        try:
            received = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop(signal.Signals(signum))

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stopping is None:
            self.stopping = sig
            log.info("supervisor.stopping", signal=sig.name,
                     children=[s.child.proc.pid for s in self.slots if s.child is not None])
            self._stop_children(sig)
        elif self.forced is None:
            self.forced = sig
            log.warning("supervisor.forcing", signal=sig.name,
                        reason="a second signal: the children are killed; their running "
                               "jobs are rescued once their heartbeats expire")
            for slot in self.slots:
                if slot.child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.child.proc.kill()

    def _stop_children(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            slot.restart_at = None
            if slot.child is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.child.proc.send_signal(sig)

    # -- children --------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        try:
            proc, ready_r = self._spawn()
        except OSError as exc:
            # The system refused a process or a pipe (too many open files or processes,
            # no memory, the interpreter gone in a deploy): a start that failed, retried
            # after a backoff, rather than the end of every other child.
            self._failed_to_start(slot, exc)
            return
        slot.child = _Child(proc, ready_r, started_at=time.monotonic())
        slot.restart_at = None
        self._selector.register(ready_r, selectors.EVENT_READ, slot)
        if slot.restarts:
            log.info("supervisor.child_restarted", slot=slot.index, pid=proc.pid,
                     restarts=slot.restarts)
        else:
            log.info("supervisor.child_started", slot=slot.index, pid=proc.pid)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], int]:
        """Start one child; return it and the read end of its ready pipe."""
        ready_r, ready_w = os.pipe()
        # Never wait on it: a process the child forked may hold the other end open.
        os.set_blocking(ready_r, False)
        env = {**self.env, ENV_SUPERVISOR_PID: str(os.getpid()), ENV_READY_FD: str(ready_w)}
        try:
            proc = subprocess.Popen(self.command, env=env, pass_fds=(ready_w,),
                                    stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        return proc, ready_r

    def _failed_to_start(self, slot: _Slot, exc: OSError) -> None:
        slot.failed_starts += 1
        slot.quick_deaths += 1
        log.warning("supervisor.child_start_failed", slot=slot.index, error=str(exc),
                    failed_starts=slot.failed_starts)
        if slot.failed_starts >= MAX_FAILED_STARTS:
            self._give_up(slot, None, reason=str(exc))
            return
        self._restart_later(slot, time.monotonic())

    def _on_ready(self, slot: _Slot) -> None:
        child = slot.child
        if child is None or child.ready_fd is None:
            return
        try:
            data = os.read(child.ready_fd, 64)
        except BlockingIOError:
            return
        if data and child.ready_at is None:
            child.ready_at = time.monotonic()
            slot.failed_starts = 0
            log.info("supervisor.child_ready", slot=slot.index, pid=child.proc.pid,
                     seconds=round(child.ready_at - child.started_at, 3))
        if not data:  # the child closed it: it said ready, or it is exiting
            self._close_ready(child)

    def _close_ready(self, child: _Child) -> None:
        if child.ready_fd is not None:
            self._selector.unregister(child.ready_fd)
            os.close(child.ready_fd)
            child.ready_fd = None

    def _reap(self) -> None:
        for slot in self.slots:
            child = slot.child
            if child is None:
                continue
            status = child.proc.poll()
            if status is None:
                continue
            if child.ready_fd is not None:  # it may have said ready just before it ended
                self._on_ready(slot)
                self._close_ready(child)
            slot.child = None
            self._exited(slot, child, status)

    def _exited(self, slot: _Slot, child: _Child, status: int) -> None:
        now = time.monotonic()
        fields = {"slot": slot.index, "pid": child.proc.pid, "status": _status_text(status),
                  "ready": child.ready_at is not None,
                  "seconds": round(now - child.started_at, 3)}
        if self.stopping is not None or self.gave_up is not None:
            slot.statuses.append(status)
            log.info("supervisor.child_exited", **fields)
            return
        log.warning("supervisor.child_exited", **fields, unexpected=True)
        if child.ready_at is None:
            slot.failed_starts += 1
        elif now - child.ready_at >= STABLE_AFTER:
            slot.quick_deaths = 0
        slot.quick_deaths += 1
        if slot.failed_starts >= MAX_FAILED_STARTS:
            self._give_up(slot, status)
            return
        self._restart_later(slot, now)

    def _restart_later(self, slot: _Slot, now: float) -> None:
        delay = backoff(slot.quick_deaths)
        slot.restarts += 1
        slot.restart_at = now + delay
        log.info("supervisor.child_restarting", slot=slot.index, delay=delay,
                 failed_starts=slot.failed_starts)

    def _give_up(self, slot: _Slot, status: int | None, *, reason: str | None = None) -> None:
        """Stop for good: ``status`` is the last child's, or ``None`` when the system
        would not start one (``reason`` says why)."""
        last = (f"the last with status {_status_text(status)}" if status is not None
                else f"the last could not be started: {reason}")
        self.gave_up = WorkerStartError(
            f"worker processes keep exiting before they are ready ({slot.failed_starts} in a "
            f"row, {last}); see their errors above, fix the cause, then start `baton worker` "
            "again", failed_starts=slot.failed_starts, status=status)
        log.error("supervisor.gave_up", slot=slot.index, failed_starts=slot.failed_starts,
                  status=None if status is None else _status_text(status), reason=reason)
        self._stop_children(signal.SIGTERM)

    def _restart_due(self) -> None:
        if self.stopping is not None or self.gave_up is not None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.child is None and slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)


def _note(signum: int, frame: FrameType | None) -> None:
    """A signal handler that does nothing: the wake-up pipe carries the signal's number."""


# -- the child's side ----------------------------------------------------------------------


def under_supervisor() -> Callable[[anyio.Event], Coroutine[Any, Any, None]] | None:
    """In a worker process started by a supervisor: arrange to die with it, and return a
    coroutine function that tells it this worker is ready once ``started`` is set. Return
    ``None`` in any other process.

    The supervisor's variables are removed from the environment, so that processes this
    worker starts do not take them for their own.
    """
    pid = os.environ.pop(ENV_SUPERVISOR_PID, None)
    fd_text = os.environ.pop(ENV_READY_FD, None)
    if pid is None or fd_text is None:
        return None
    ready_fd = int(fd_text)
    os.set_inheritable(ready_fd, False)
    die_with(int(pid), signal.SIGTERM)  # a graceful stop, as for the supervisor's SIGTERM

    async def notify(started: anyio.Event) -> None:
        try:
            await started.wait()
            with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
                os.write(ready_fd, b"r")
        finally:
            with contextlib.suppress(OSError):
                os.close(ready_fd)

    return notify
