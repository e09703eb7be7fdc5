"""Steps the tests of kept results, tags and the job commands run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

import baton

app = baton.Baton()


class Summary(BaseModel):
    words: int
    title: str


@app.step(keep_result=True, tags=["reports"])
async def summarize(text: str) -> Summary:
    return Summary(words=len(text.split()), title=text.split()[0])


@app.step(keep_result=True)
def total(numbers: list[float]) -> float:
    return sum(numbers)


@app.step(keep_result=True)
async def nothing() -> None:
    return None


@app.step
async def forgetful(x: int) -> int:
    return x * 2


@app.step(keep_result=True, max_attempts=1)
async def unkeepable(kind: str) -> Any:
    if kind == "nan":
        return float("nan")
    if kind == "nul":
        return {"text": "a\x00b"}
    return object()


@app.step(max_attempts=2, backoff=lambda attempt: 0.0, tags=["flaky", "team:data"])
async def fails(message: str) -> None:
    raise RuntimeError(message)

