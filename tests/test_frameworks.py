"""Enqueueing from web frameworks in the request's transaction, and the pytest set-up of
docs/testing.md, beyond the examples docs/frameworks.md runs itself.

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
