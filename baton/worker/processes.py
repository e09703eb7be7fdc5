"""The process executor: plain ``def`` steps declared ``executor="process"`` run in child
processes that baton can kill.

A thread cannot be stopped, so a thread step runs on past a timeout, a cancel or a shutdown.
A process step runs in a child interpreter instead, and when its attempt must end (the
call is cancelled: a timeout, a cancel request, a shutdown past its grace) the child is
sent SIGTERM, then SIGKILL after :data:`TERM_WAIT`, and reaped before the call raises: once
baton records the attempt as over, its body is no longer running.

Children are fresh interpreters started with ``python -c`` (what multiprocessing's
``spawn`` start method does), never forks of the worker, so its threads, locks and event
loop are not copied. Each executor keeps a pool of the children it started: a call takes an
idle child or starts one and gives it back once the step returned or raised, so a busy
worker holds at most one child per running slot and a child is replaced only when it was
killed or died. A child finds the step's function by module and qualified name (unwrapping
the :class:`~baton.step.Step` that ``@app.step`` leaves there) and imports the module
itself, with the worker's ``sys.path``.

Requests and replies are length-prefixed pickles over the child's stdin and stdout; the
child moves its own standard output to standard error first, so a ``print`` in a step
cannot corrupt them. A child also dies with the worker (``PR_SET_PDEATHSIG`` on Linux)
and exits when its stdin closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import pickle
import signal
import struct
import sys
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from baton.context import Context
from baton.errors import ProcessDiedError, RemoteStepError, StepError
from baton.logs import get_logger
from baton.pricing import Usage
from baton.signals import Cancel, Discard, Signal, Snooze

if TYPE_CHECKING:
    from baton.step import Step
    from baton.worker.executor import Executor

log = get_logger("baton.process")

TERM_WAIT = 2.0
"""Seconds a child has to exit after SIGTERM before it is sent SIGKILL."""

_HEADER = struct.Struct("!Q")
_BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
         "from baton.worker.processes import serve; serve(int(sys.argv[2]))")


# -- what goes through the pipe --------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One call of a step function, as a child receives it."""

    module: str
    qualname: str
    main_path: str | None
    """The file of ``__main__`` when the step is defined there, else ``None``."""
    kwargs: dict[str, Any]
    ctx_param: str | None


@dataclass(slots=True)
class Raised:
    """An exception raised in a child: itself if it survives pickling, else its name,
    message and (for an HTTP error) status, so the worker can raise a stand-in."""

    exc: BaseException | None
    type_name: str
    message: str
    traceback: str
    status_code: int | None = None
    response: Any = None


@dataclass(slots=True)
class Reply:
    """How a call ended in the child: ``returned`` (``value`` is the result), ``snooze``,
    ``cancel`` or ``discard`` (``value`` is the signal's argument), or ``raised``."""

    kind: str
    value: Any = None
    raised: Raised | None = None
    usage: list[Usage] = field(default_factory=list)
    captures: list[dict[str, Any]] = field(default_factory=list)


_STARTED = b"started"


class ChildTraceback(Exception):
    """The traceback text of an exception raised in a step's child process.

    Never raised: it is set as the ``__cause__`` of the exception the worker raises for
    it, so the job's ``errors`` entry shows where in the step it happened.
    """

    def __init__(self, pid: int, text: str) -> None:
        self.pid = pid
        self.text = text
        super().__init__(f"in the step's process (pid {pid}):\n{text.rstrip()}")


# -- the worker's side -------------------------------------------------------------------------


class _Gone(Exception):
    """The child's pipe closed; ``started`` says whether it had taken the request."""

    def __init__(self, started: bool) -> None:
        self.started = started


class Child:
    """One child process and its pipes."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.pid = process.pid
        self.calls = 0
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)

    @classmethod
    async def start(cls) -> Child:
        """Start a child process (shielded: a cancel cannot leave it unowned)."""
        command = [sys.executable, "-u", "-c", _BOOT, json.dumps(sys.path), str(os.getpid())]
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(command, stderr=None, start_new_session=True)
        log.debug("process.started", pid=process.pid)
        return cls(process)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def run(self, payload: bytes) -> Reply:
        """Send one request and return the reply.

        :raises _Gone: if the pipe closes first (the child died).
        """
        self.calls += 1
        started = False
        try:
            await self._stdin.send(payload)
            started = await self._read() == _STARTED
            body = await self._read()
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError,
                anyio.ClosedResourceError, BrokenPipeError, ConnectionResetError):
            raise _Gone(started) from None
        try:
            reply: Reply = pickle.loads(body)
        except Exception as exc:
            raise StepError(f"the reply of a step's process cannot be read in the worker: "
                            f"{type(exc).__name__}: {exc}") from exc
        return reply

    async def _read(self) -> bytes:
        (size,) = _HEADER.unpack(await self._stdout.receive_exactly(_HEADER.size))
        return await self._stdout.receive_exactly(size)

    async def stop(self, *, wait: float = 0.0) -> int:
        """End the child and reap it; return its exit status (minus the signal number).

        Given ``wait`` seconds, the child may exit by itself first (its stdin is closed,
        which ends an idle child's loop); then it is sent SIGTERM, and SIGKILL after
        :data:`TERM_WAIT`. Shielded from cancellation: when this returns, the child is gone.
        """
        with anyio.CancelScope(shield=True):
            if wait and self.alive:
                await self._stdin.aclose()
                with anyio.move_on_after(wait):
                    await self.process.wait()
            for send, grace in ((self.process.terminate, TERM_WAIT),
                                (self.process.kill, None)):
                if not self.alive:
                    break
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    send()
                with anyio.move_on_after(grace):
                    await self.process.wait()
            await self.process.aclose()
        returncode = self.process.returncode
        assert returncode is not None
        return returncode


class ProcessPool:
    """The children of one executor: idle ones waiting for a call, the rest busy."""

    def __init__(self) -> None:
        self.idle: list[Child] = []
        self.started = 0
        """How many children this pool has started (tests and benchmarks read it)."""

    async def take(self) -> tuple[Child, bool]:
        """Return an idle child, or a new one; and whether it is new."""
        while self.idle:
            child = self.idle.pop()
            if child.alive:
                return child, False
            await child.stop()  # died while idle: reap it
        self.started += 1
        return await Child.start(), True

    def give_back(self, child: Child) -> None:
        self.idle.append(child)

    async def aclose(self) -> None:
        """Stop the idle children (closing their stdin: each exits on its own)."""
        idle, self.idle = self.idle, []
        async with anyio.create_task_group() as tg:
            for child in idle:
                tg.start_soon(functools.partial(child.stop, wait=TERM_WAIT))

    def kill_idle(self) -> None:
        """Signal the idle children to exit, without an event loop (a finalizer)."""
        for child in self.idle:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


_pools: weakref.WeakKeyDictionary[Executor, ProcessPool] = weakref.WeakKeyDictionary()


def pool_of(executor: Executor) -> ProcessPool:
    """Return the executor's pool of children, made on first use."""
    pool = _pools.get(executor)
    if pool is None:
        pool = _pools[executor] = ProcessPool()
        weakref.finalize(executor, pool.kill_idle)
    return pool


async def close(executor: Executor) -> None:
    """Stop the executor's idle children (the worker calls this as it stops)."""
    pool = _pools.pop(executor, None)
    if pool is not None:
        await pool.aclose()


async def call(executor: Executor, step: Step, kwargs: dict[str, Any]) -> Any:
    """Run the step's function with ``kwargs`` in a child process and return its result.

    Cancelling the call (a timeout, a cancel request, a shutdown) kills the child and
    returns only once it is reaped. Usage and captures recorded on the step's context in
    the child are added to ``kwargs``'s context, whatever the call's end.

    :raises ProcessDiedError: if the child exits or is killed before the step returns.
    :raises Snooze, Cancel, Discard: if the step raised or returned one.
    :raises Exception: what the step raised (or a :class:`RemoteStepError` standing for
        it), with the child's traceback as its cause.
    """
    ctx = kwargs.get(step.ctx_param) if step.ctx_param is not None else None
    payload = _request(step, kwargs, ctx if isinstance(ctx, Context) else None)
    pool = pool_of(executor)
    child: Child | None = None
    try:
        child, new = await pool.take()
        try:
            reply = await child.run(payload)
        except _Gone as gone:
            if gone.started or new:
                raise
            # An idle child died before it took the request: start one and send it again.
            await child.stop()
            child, new = await pool.take()
            reply = await child.run(payload)
    except _Gone:
        assert child is not None
        returncode = await child.stop(wait=TERM_WAIT)
        log.warning("process.died", step=step.name, pid=child.pid, returncode=returncode)
        raise ProcessDiedError(step.name, child.pid, returncode) from None
    except BaseException:
        if child is not None:
            returncode = await child.stop()
            log.info("process.killed", step=step.name, pid=child.pid, returncode=returncode)
        raise
    pool.give_back(child)
    if isinstance(ctx, Context):
        ctx.usage.extend(reply.usage)
        ctx.captures.extend(reply.captures)
    return _outcome(reply, child.pid)


def _request(step: Step, kwargs: dict[str, Any], ctx: Context | None) -> bytes:
    """Pickle the call of ``step``; the context goes without the app and with empty
    usage and captures (the child's come back in its reply)."""
    fn = step.fn
    main_path = None
    if fn.__module__ == "__main__":
        main_path = getattr(sys.modules["__main__"], "__file__", None)
        if main_path is None:
            raise StepError(f"step {step.name!r} is defined in an interactive session; "
                            "define it in a module file to run it in a process")
    if ctx is not None and step.ctx_param is not None:
        kwargs = {**kwargs, step.ctx_param: dataclasses.replace(
            ctx, app=None, usage=[], captures=[])}
    request = Request(fn.__module__, fn.__qualname__, main_path, kwargs, step.ctx_param)
    try:
        body = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise StepError(f"the arguments of step {step.name!r} cannot be sent to its "
                        f"process: {type(exc).__name__}: {exc}") from exc
    return _HEADER.pack(len(body)) + body


def _outcome(reply: Reply, pid: int) -> Any:
    """Return the child's result, or raise what it raised."""
    if reply.kind == "returned":
        return reply.value
    if reply.kind == "snooze":
        raise Snooze(reply.value)
    if reply.kind == "cancel":
        raise Cancel(reply.value)
    if reply.kind == "discard":
        raise Discard(reply.value)
    raised = reply.raised
    assert raised is not None
    exc = raised.exc
    if not isinstance(exc, Exception):
        exc = RemoteStepError(raised.type_name, raised.message,
                              status_code=raised.status_code, response=raised.response)
    exc.__cause__ = ChildTraceback(pid, raised.traceback)
    raise exc


# -- the child's side ------------------------------------------------------------------------


def serve(parent: int) -> None:
    """Run requests from the worker until it closes the pipe (the child's main loop)."""
    die_with(parent, signal.SIGKILL)
    reader = os.fdopen(os.dup(0), "rb")
    writer = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # a step's prints go to the worker's stderr, not into the pipe
    while True:
        header = reader.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(header)
        body = reader.read(size)
        if len(body) < size:
            return
        _send(writer, _STARTED)
        _send(writer, _reply_bytes(_run(body)))


def die_with(parent: int, sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when ``parent`` (this process's parent)
    dies; exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


def _send(writer: IO[bytes], body: bytes) -> None:
    writer.write(_HEADER.pack(len(body)))
    writer.write(body)
    writer.flush()


_functions: dict[tuple[str, str], Callable[..., Any]] = {}


def _run(body: bytes) -> Reply:
    """Call the requested function and say how it ended."""
    ctx: Context | None = None
    try:
        request: Request = pickle.loads(body)
        fn = _function(request)
        found = request.kwargs.get(request.ctx_param) if request.ctx_param else None
        ctx = found if isinstance(found, Context) else None
        result = fn(**request.kwargs)
        if isinstance(result, Signal):
            raise result
        reply = Reply("returned", result)
    except Snooze as exc:
        reply = Reply("snooze", exc.seconds)
    except (Cancel, Discard) as exc:
        reply = Reply("cancel" if isinstance(exc, Cancel) else "discard", exc.reason)
    except BaseException as exc:
        reply = Reply("raised", raised=_raised(exc))
    if ctx is not None:
        reply.usage, reply.captures = ctx.usage, ctx.captures
    return reply


def _function(request: Request) -> Callable[..., Any]:
    """Find the step's function by module and qualified name."""
    key = (request.module, request.qualname)
    fn = _functions.get(key)
    if fn is None:
        from baton.step import Step

        if request.module == "__main__":
            module = _main_module(request.main_path)
        else:
            module = importlib.import_module(request.module)
        found: Any = module
        for part in request.qualname.split("."):
            found = getattr(found, part)
        fn = _functions[key] = found.fn if isinstance(found, Step) else found
    return fn


def _main_module(path: str | None) -> Any:
    """Load the worker's ``__main__`` file as ``__mp_main__`` (so its
    ``if __name__ == "__main__":`` block does not run) and let pickles find it as
    ``__main__``."""
    module = sys.modules.get("__mp_main__")
    if module is None:
        if path is None:
            raise StepError("the worker's __main__ module has no file to import")
        spec = importlib.util.spec_from_file_location("__mp_main__", path)
        if spec is None or spec.loader is None:
            raise StepError(f"cannot import the worker's __main__ module from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["__mp_main__"] = module
        spec.loader.exec_module(module)
    sys.modules["__main__"] = module
    return module


def _raised(exc: BaseException) -> Raised:
    """Describe ``exc`` for the worker, dropping this module's frames from its traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
    kind = type(exc)
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    raised = Raised(None, f"{kind.__module__}.{kind.__qualname__}", str(exc), text,
                    status if isinstance(status, int) else None)
    if raised.status_code is not None:
        headers = getattr(response, "headers", None) or {}
        retry_after = headers.get("retry-after") if hasattr(headers, "get") else None
        raised.response = _Response(raised.status_code,
                                    {"retry-after": str(retry_after)} if retry_after else {})
    if isinstance(exc, Exception):
        try:
            pickle.loads(pickle.dumps(exc))
            raised.exc = exc
        except Exception:  # not picklable as it is: the worker raises a stand-in
            pass
    return raised


@dataclass(slots=True)
class _Response:
    """What an LLM step's rate limit check reads of an HTTP error's response."""

    status_code: int
    headers: dict[str, str]


def _reply_bytes(reply: Reply) -> bytes:
    """Pickle ``reply``; one whose result or captures cannot be becomes an error."""
    try:
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        what = "result" if reply.kind == "returned" else "exception or captures"
        error = StepError(f"the step's {what} cannot be sent back from its process: "
                          f"{type(exc).__name__}: {exc}")
        fallback = Reply("raised", raised=_raised(error), usage=reply.usage)
        return pickle.dumps(fallback, protocol=pickle.HIGHEST_PROTOCOL)
