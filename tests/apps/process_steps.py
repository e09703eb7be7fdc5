"""Steps that run in child processes (``executor="process"``), for the process executor's
tests. They report to the test through files, since they share no memory with it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import baton

app = baton.Baton()


class Point(BaseModel):
    x: int
    y: int


def _write(path: Path, text: str) -> None:
    """Write a file whole: a reader polling for it never sees it half written."""
    part = path.with_suffix(path.suffix + ".part")
    part.write_text(text)
    part.replace(path)


@app.step(executor="process")
def describe(point: Point, scale: int = 1) -> dict[str, Any]:
    return {"pid": os.getpid(), "sum": (point.x + point.y) * scale}


@app.step(executor="process")
def combine(ctx: baton.Context) -> dict[str, Any]:
    upstream = ctx.result("describe")
    return {"upstream_pid": upstream["pid"], "doubled": upstream["sum"] * 2,
            "step": ctx.step, "workflow_id": str(ctx.workflow_id)}


@app.step(executor="process", capture=True)
def priced(ctx: baton.Context, fail: bool = False) -> dict[str, Any]:
    ctx.record_usage(model="m-process", input_tokens=10, output_tokens=5)
    ctx.capture(prompt={"q": "what"}, response={"a": os.getpid()})
    if fail:
        raise RuntimeError("failed after the model call")
    return {"answer": 42, "__usage__": {"model": "m-result", "input_tokens": 3}}


@app.step(executor="process", max_attempts=1)
def boom(word: str) -> None:
    raise ValueError(f"boom: {word}")


class Unpicklable(Exception):
    """An exception that cannot cross a pipe: it holds a function made inline."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.handle = lambda: None  # functions defined inline do not pickle


@app.step(executor="process", max_attempts=1)
def boom_unpicklable() -> None:
    raise Unpicklable("cannot travel")


@app.step(executor="process", max_attempts=3)
def steered(how: str, ctx: baton.Context) -> str:
    if how == "snooze" and ctx.snoozes == 0:
        raise baton.Snooze(0.05)
    if how == "cancel":
        return baton.Cancel("returned a cancel")  # type: ignore[return-value]
    if how == "discard":
        raise baton.Discard("raised a discard")
    return f"done after {ctx.snoozes} snoozes"


@app.step(executor="process", max_attempts=2)
def sleeper(folder: str, name: str, seconds: float) -> str:
    """Write ``name.pid``, sleep, then write ``name.done`` (only if not stopped first)."""
    where = Path(folder)
    _write(where / f"{name}.pid", str(os.getpid()))
    time.sleep(seconds)
    _write(where / f"{name}.done", "finished")
    return "slept"


@app.step(executor="process", max_attempts=1)
def exits(code: int) -> None:
    os._exit(code)


@app.step(executor="process", max_attempts=1)
def crashes() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


@app.step(executor="process", queue="single")
def note_pid(folder: str, n: int) -> int:
    _write(Path(folder) / f"{n}.pid", str(os.getpid()))
    return n


@app.step(executor="process", queue="bench")
def noop() -> None:
    return None


@app.step(queue="bench")
def noop_thread() -> None:
    return None


class RateLimited(Exception):
    """Like an HTTP client's 429 error: keyword-only arguments, so it does not unpickle."""

    def __init__(self, message: str, *, response: Any) -> None:
        super().__init__(message)
        self.response = response


class _Response:
    def __init__(self) -> None:
        self.status_code = 429
        self.headers = {"retry-after": "7"}


@app.llm_step(executor="process", name="tests.apps.process_steps.ask")
def ask(prompt: str) -> str:
    raise RateLimited(f"slow down: {prompt}", response=_Response())
