"""Every Python and SQL example in README.md and docs/ runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import baton
from tests.apps import flows

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(python|sql)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SAMPLE_ID = "6f2bb767-df18-4abe-9000-000000000001"


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for n, match in enumerate(BLOCK.finditer(doc.read_text(encoding="utf-8"))):
            if match.group(1) == kind:
                found.append((f"{doc.name}#{n}", match.group(2)))
    return found


def test_docs_have_examples() -> None:
    assert len(blocks("python")) >= 8 and len(blocks("sql")) >= 8


@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=lambda v: v)
def test_python_example_runs(where: str, code: str, dsn: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "BATON_DATABASE_URL": dsn, "BATON_ENV": "production"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"


async def test_sql_examples_run(dsn: str) -> None:
    import psycopg

    from baton.testing import running_worker, wait_for_workflow

    flows.app.dsn = dsn
    try:
        wf = baton.Workflow("ingest", id=SAMPLE_ID)
        wf.add("fetch", flows.fetch.new(url="https://example.com"))
        wf.add("ask", flows.ask_llm.new(prompt="q"), deps=["fetch"])
        await flows.app.insert(wf)
        async with running_worker(flows.app):
            await wait_for_workflow(flows.app, wf.id)
    finally:
        await flows.app.close()
    examples = blocks("sql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for where, query in examples:
            rows = conn.execute(query).fetchall()  # type: ignore[arg-type]
            assert rows is not None, where
        # The third of sql.md's (pages sorted before it may have SQL blocks of their own).
        fetch_result = [query for where, query in examples if where.startswith("sql.md#")][2]
        result = conn.execute(fetch_result).fetchall()  # type: ignore[arg-type]
        assert result[0][0]["url"] == "https://example.com"
