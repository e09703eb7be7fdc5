"""Steps the dashboard tests run: gated work, a failing step, a priced LLM call."""

from __future__ import annotations

import threading
from collections import defaultdict
from decimal import Decimal
from typing import Any

import baton
from baton.pricing import ModelPrice, Pricing

PRICING = Pricing(models={"small": ModelPrice(input=Decimal("0.15"), output=Decimal("0.60"))})
app = baton.Baton(pricing=PRICING, capture=True)
GATES: defaultdict[str, threading.Event] = defaultdict(threading.Event)
"""A step called with ``gate=NAME`` waits until ``GATES[NAME]`` is set."""


def reset() -> None:
    for gate in GATES.values():
        gate.set()
    GATES.clear()


@app.step(max_attempts=3)
def work(item: str = "", gate: str | None = None) -> dict[str, Any]:
    """Wait for the gate (if any), then return what it was given."""
    if gate is not None and not GATES[gate].wait(timeout=60):
        raise TimeoutError(f"gate {gate!r} never opened")
    return {"item": item}


@app.step(max_attempts=1)
def explode(reason: str = "boom") -> None:
    """Fail at once, with a traceback."""
    raise RuntimeError(reason)


@app.step(llm=True)
def ask(question: str, ctx: baton.Context) -> str:
    """Record a priced call and capture its prompt and answer."""
    answer = f"{ctx.model} says 42"
    ctx.record_usage(input_tokens=2_000, output_tokens=500)
    ctx.capture(prompt=question, response=answer)
    return answer
