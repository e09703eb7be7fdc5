"""Enqueueing from web frameworks in the request's transaction, the pytest set-up of
docs/testing.md, and what that page says of the helpers, beyond the examples the pages
run themselves.

No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, and
those name a dependency local to ``make_api``.
"""

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import psycopg
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

import baton

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- FastAPI ----------------------------------------------------------------------------------


def make_api(jobs: baton.Baton, note: baton.Step) -> FastAPI:
    """An API that enqueues in a transaction a dependency opens, and from a def endpoint."""

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        async with jobs:
            yield

    async def transaction() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with jobs.connection() as conn:  # commits after the endpoint, or rolls back
            yield conn

    api = FastAPI(lifespan=lifespan)
    Conn = Annotated[psycopg.AsyncConnection[Any], Depends(transaction)]

    @api.post("/async")
    async def from_dependency(text: str, conn: Conn) -> dict[str, int]:
        job_id = await jobs.enqueue(note.new(text=text), conn=conn)
        if text == "refuse":
            raise HTTPException(422, "refused")
        return {"job_id": job_id}

    @api.post("/sync")
    def from_thread(text: str) -> dict[str, int]:
        with jobs.connection_sync() as conn:  # one transaction, committed at the block's end
            job_id = jobs.enqueue_sync(note.new(text=text), conn=conn)
            if text == "refuse":
                raise HTTPException(422, "refused")
        return {"job_id": job_id}

    return api


@pytest.fixture
def jobs(dsn: str) -> Iterator[tuple[baton.Baton, baton.Step]]:
    app = baton.Baton(dsn)

    @app.step(name="frameworks.note")
    def note(text: str) -> str:
        return text

    yield app, note
    app.close_sync()


def texts(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT args->>'text' FROM baton.jobs ORDER BY id").fetchall()
    return [row[0] for row in rows]


@pytest.mark.parametrize("endpoint", ["/async", "/sync"])
def test_fastapi_request_that_fails_leaves_no_job(
    jobs: tuple[baton.Baton, baton.Step], dsn: str, endpoint: str
) -> None:
    app, note = jobs
    with TestClient(make_api(app, note)) as client:
        ok = client.post(endpoint, params={"text": "kept"})
        refused = client.post(endpoint, params={"text": "refuse"})
        assert (ok.status_code, refused.status_code) == (200, 422)
        assert texts(dsn) == ["kept"]
    assert app.get_job_sync(ok.json()["job_id"]).state == "available"


# -- Django -----------------------------------------------------------------------------------


def test_django_connection_holds_jobs_to_its_transaction(dsn: str) -> None:
    """ATOMIC_REQUESTS, a savepoint, and every kind of insert on Django's connection
    (tests/apps/django_site.py: Django is configured once per process, so in a child)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.apps.django_site"], cwd=ROOT,
        env={**os.environ, "BATON_DATABASE_URL": dsn, "BATON_ENV": "production"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "django checks passed" in done.stdout


# -- pytest -----------------------------------------------------------------------------------

JOBS_MODULE = """
import baton

app = baton.Baton()
WELCOMED = []


@app.step(name="myproject.jobs.welcome")
async def welcome(email: str) -> None:
    WELCOMED.append(email)
"""

CLEAN_TEST = """
import pytest


@pytest.mark.anyio
async def test_each_test_starts_empty(app) -> None:
    assert await app.query.jobs() == []  # what the test before it enqueued is gone
    from myproject.jobs import WELCOMED

    assert WELCOMED == ["ada@example.com"]
"""


def test_the_pytest_setup_of_the_testing_page(dsn: str, tmp_path: Path) -> None:
    """docs/testing.md's conftest.py and test, run by pytest against a project of their own."""
    page = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    conftest, example = [b for b in BLOCK.findall(page) if "def test_welcome_mail" in b
                         or b.startswith("# conftest.py")]
    (tmp_path / "myproject").mkdir()
    (tmp_path / "myproject" / "__init__.py").write_text("")
    (tmp_path / "myproject" / "jobs.py").write_text(textwrap.dedent(JOBS_MODULE))
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_a_welcome.py").write_text(example)
    (tmp_path / "test_b_clean.py").write_text(textwrap.dedent(CLEAN_TEST))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "error::baton.StepNameWarning", str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "BATON_DATABASE_URL": dsn, "BATON_ENV": "production"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "2 passed" in done.stdout


# -- what docs/testing.md says of the helpers -------------------------------------------------


@pytest.fixture
async def helpers_app(dsn: str) -> AsyncIterator[tuple[baton.Baton, dict[str, baton.Step]]]:
    app = baton.Baton(dsn)
    seen: list[baton.Context] = []

    @app.step(name="helpers.look", max_attempts=2)
    async def look(ctx: baton.Context) -> list[Any]:
        seen.append(ctx)
        return [ctx.job_id, ctx.attempt, ctx.meta, ctx.workflow_id]

    @app.step(name="helpers.slow", timeout=0.1)
    async def slow() -> None:
        await anyio.sleep(30)

    @app.step(name="helpers.signal")
    async def signal(kind: str) -> None:
        raise baton.Snooze(5) if kind == "snooze" else baton.Cancel("no")

    yield app, {"look": look, "slow": slow, "signal": signal}
    await app.close()


async def test_perform_job_outcomes_as_documented(
    helpers_app: tuple[baton.Baton, dict[str, baton.Step]],
) -> None:
    from baton.testing import perform_job

    app, steps = helpers_app
    done = await perform_job(app, steps["look"].new().options(meta={"who": "t"}), attempt=2)
    assert (done.state, done.result) == ("completed", [0, 2, {"who": "t"}, None])
    timed_out = await perform_job(app, steps["slow"].new())
    assert timed_out.state == "retryable" and timed_out.error is not None
    assert timed_out.error["kind"] == "timeout"
    snoozed = await perform_job(app, steps["signal"].new(kind="snooze"))
    assert (snoozed.state, snoozed.snooze, snoozed.delay) == ("scheduled", True, 5)
    assert (await perform_job(app, steps["signal"].new(kind="cancel"))).state == "cancelled"
    unknown = await perform_job(app, baton.JobSpec(step="helpers.nobody"))
    assert unknown.state == "discarded" and unknown.error is not None
    assert unknown.error["kind"] == "invalid"
    async with app.connection() as conn:  # nothing of the jobs was written
        cur = await conn.execute("SELECT count(*) FROM baton.jobs")
        assert await cur.fetchone() == (0,)


async def test_drain_queue_leaves_later_jobs_and_times_out_on_unknown_steps(
    helpers_app: tuple[baton.Baton, dict[str, baton.Step]],
) -> None:
    from baton.testing import assert_enqueued, drain_queue

    app, steps = helpers_app
    now, later = await app.enqueue_many(
        [steps["look"].new(), steps["look"].new().options(schedule_in=3600)])
    await drain_queue(app)
    assert (await app.get_job(now)).state == "completed"
    assert (await app.get_job(later)).state == "scheduled"
    assert assert_enqueued(app, "helpers.look").id == later  # scheduled counts as waiting
    stranger = await app.enqueue(baton.JobSpec(step="elsewhere.step"))
    with pytest.raises(TimeoutError, match="'default' still had 1 jobs available"):
        await drain_queue(app, timeout=0.5)
    assert (await app.get_job(stranger)).state == "available"


async def test_an_error_in_a_running_worker_block_comes_out_as_itself(
    helpers_app: tuple[baton.Baton, dict[str, baton.Step]],
) -> None:
    from baton.testing import running_worker, wait_for_job

    app, steps = helpers_app
    later = await app.enqueue(steps["look"].new().options(schedule_in=3600))
    with pytest.raises(TimeoutError, match="is scheduled"):
        async with running_worker(app):
            await wait_for_job(app, later, "completed", timeout=0.2)
    with pytest.raises(AssertionError, match="in the block"):
        async with running_worker(app) as worker:
            raise AssertionError("in the block")
    assert worker.stopped.is_set()
