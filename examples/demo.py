"""Demo: a real workflow end to end — fetch, fan out over three models, synthesize, store.

The "models" are a local, deterministic stand-in function (``stand_in_model`` below), so
the demo needs no network and no API key; baton itself has no stand-ins. It runs against
BATON_DATABASE_URL, or an embedded PostgreSQL when that is unset.
"""

from __future__ import annotations

import hashlib
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

import baton
from baton.events import StepUpdated, WorkflowFinished
from baton.pricing import ModelPrice, Pricing
from baton.testing import running_worker

HERE = Path(__file__).resolve().parent
MODELS = ["stand-in/alpha", "stand-in/beta", "stand-in/gamma"]

app = baton.Baton(pricing=Pricing(models={
    m: ModelPrice(input=Decimal("0.50"), output=Decimal("1.50")) for m in MODELS
}))


def stand_in_model(model: str, text: str) -> str:
    """A STAND-IN for an LLM call: deterministic, local, free. Not a real model."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if s.strip()]
    pick = int(hashlib.sha256(model.encode()).hexdigest(), 16) % len(sentences)
    return f"{sentences[pick]}."


@app.step(name="demo.fetch")
async def fetch(path: str) -> dict[str, str]:
    """Fetch the document (a local file, so the demo runs offline)."""
    text = (HERE / path).read_text(encoding="utf-8")
    return {"source": path, "text": text}


@app.step(name="demo.summarize", llm=True)
async def summarize(ctx: baton.Context) -> dict[str, Any]:
    doc = ctx.result("fetch")
    assert ctx.model is not None
    summary = stand_in_model(ctx.model, doc["text"])
    usage = {"model": ctx.model, "input_tokens": len(doc["text"].split()),
             "output_tokens": len(summary.split())}
    return {"summary": summary, "__usage__": usage}


@app.step(name="demo.synthesize")
async def synthesize(ctx: baton.Context) -> dict[str, Any]:
    drafts = ctx.results["summarize"]  # {model: result}
    unique = sorted({d["summary"] for d in drafts.values()})
    return {"summary": " ".join(unique), "models": sorted(drafts)}


@app.step(name="demo.store")
async def store(path: str, ctx: baton.Context) -> str:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(ctx.result("synthesize")["summary"] + "\n", encoding="utf-8")
    return str(target)


def show(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def baton_command() -> str:
    """How to call the ``baton`` command from here (the venv's, when it is not on PATH)."""
    exe = Path(sys.executable).with_name("baton")
    if exe.exists():
        relative = os.path.relpath(exe)
        return relative if not relative.startswith("..") else str(exe)
    return "baton"


async def main() -> None:
    # baton logs through the standard logging module; configuring nothing shows warnings.
    app.migrate_sync()
    wf = baton.Workflow("demo:summarize-document")
    wf.add("fetch", fetch.new(path="document.txt"))
    wf.add_fan_out("summarize", summarize.new(), models=MODELS, deps=["fetch"])
    wf.add("synthesize", synthesize.new(), deps=["summarize"])
    wf.add("store", store.new(path=str(Path(".baton") / "summary.txt")), deps=["synthesize"])
    async with app.events.subscribe(wf.id) as events:
        workflow_id = await app.insert(wf)
        show(f"workflow {workflow_id} inserted: {len(wf.nodes)} steps\n")
        async with running_worker(app, queues={"default": 4}):
            async for event in events:
                if isinstance(event, StepUpdated):
                    show(f"  {event.timestamp:%H:%M:%S.%f}  {event.step_name:<20} "
                         f"{event.state}")
                elif isinstance(event, WorkflowFinished):
                    show(f"\nworkflow {event.outcome}")
                    break
    result = await app.result(workflow_id, "synthesize")
    cost = await app.query.cost(workflow_id)
    show(f"\nsynthesis of {', '.join(result['models'])}:\n  {result['summary']}")
    show(f"stored in {await app.result(workflow_id, 'store')}")
    show(f"cost: {cost.total_cost:.8f} over {cost.total_tokens} tokens")
    show("\nEvery step, from baton.workflow_steps:")
    async with app.connection() as conn:
        cur = await conn.execute(
            "SELECT step_name, state, attempt FROM baton.workflow_steps"
            " WHERE workflow_id = %s ORDER BY job_id", (workflow_id,))
        for step_name, state, attempt in await cur.fetchall():
            show(f"  {step_name:<20} {state:<10} attempt {attempt}")
    await app.close()
    query = ("SELECT step_name, state, attempt, result FROM baton.workflow_steps"
             f" WHERE workflow_id = '{workflow_id}' ORDER BY job_id")
    server = ("BATON_DATABASE_URL" if os.environ.get("BATON_DATABASE_URL") else
              "the development server (it stopped with this script; this starts it again)")
    show(f"\nSee every step yourself: `baton db --psql` opens psql on {server}.\n"
         f"From this folder:\n\n  {baton_command()} db --psql -- -c \"{query}\"\n")


if __name__ == "__main__":
    anyio.run(main)
