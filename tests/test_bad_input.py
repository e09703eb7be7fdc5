"""Bad input is refused before anything is written (the rules themselves are in
tests/unit/test_job_input.py), and a caller's connection works whatever its row factory."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row, namedtuple_row

import baton
from baton.job import JobSpec
from baton.ops import COPY_FROM
from baton.testing import running_worker, wait_for_workflow
from tests.apps import basic, flows
from tests.helpers import sql_rows

ECHO = basic.echo.name


def _jobs(dsn: str) -> int:
    return int(sql_rows(dsn, "SELECT count(*) FROM baton.jobs")[0][0])


@pytest.mark.anyio
@pytest.mark.parametrize(("args", "argument", "problem"), [
    ({"value": "x\x00"}, "value", "NUL character"),
    ({"value": [b"raw"]}, "value.0", "is bytes"),
    ({"value": {"when": datetime.now(UTC)}}, "value", "not JSON-serializable"),
])
async def test_a_hand_built_job_is_checked_when_built(
    app: baton.Baton, args: dict[str, Any], argument: str, problem: str,
) -> None:
    with pytest.raises(baton.ArgsError, match=problem) as info:
        await app.enqueue(JobSpec(step=ECHO, args=args))
    assert info.value.step == ECHO and info.value.argument == argument
    assert _jobs(app.dsn) == 0


# -- sizes ---------------------------------------------------------------------------------


async def test_oversized_hand_built_jobs_are_refused_before_anything_is_sent(
    app: baton.Baton,
) -> None:
    huge = JobSpec(step=ECHO, args={"value": "x" * 2_000_000})
    with pytest.raises(baton.PayloadTooLargeError) as info:
        await app.enqueue(huge)
    assert info.value.step == ECHO and info.value.limit == app.max_args_bytes
    with pytest.raises(baton.PayloadTooLargeError) as many:
        await app.enqueue_many([basic.echo.new(value=i) for i in range(COPY_FROM)] + [huge])
    assert many.value.index == COPY_FROM
    with pytest.raises(baton.PayloadTooLargeError):
        app.enqueue_sync(huge)
    # Characters that take several bytes count as bytes.
    with pytest.raises(baton.PayloadTooLargeError):
        await app.enqueue(JobSpec(step=ECHO, args={"value": "é" * 600_000}))
    wf = baton.Workflow("too-big")
    wf.add("small", basic.echo.new(value=1))
    wf.add("big", huge, deps=["small"])
    with pytest.raises(baton.PayloadTooLargeError):
        await app.insert(wf)
    assert _jobs(app.dsn) == 0
    assert sql_rows(app.dsn, "SELECT count(*) FROM baton.workflows") == [(0,)]


# -- a caller's connection -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("row_factory", [dict_row, namedtuple_row])
@pytest.mark.parametrize("autocommit", [False, True])
async def test_the_api_works_on_a_callers_connection_whatever_its_row_factory(
    app: baton.Baton, row_factory: Any, autocommit: bool,
) -> None:
    async with await psycopg.AsyncConnection.connect(
            app.dsn, row_factory=row_factory, autocommit=autocommit) as conn:
        one = await app.enqueue(basic.echo.new(value="one"), conn=conn)
        few = await app.enqueue_many([basic.echo.new(value=i) for i in range(3)], conn=conn)
        many = await app.enqueue_many([basic.echo.new(value=i) for i in range(COPY_FROM)],
                                      conn=conn)
        batch = await app.enqueue_many(basic.echo.new_many({"value": i} for i in range(40)),
                                       conn=conn)
        wf = baton.Workflow("on-a-dict-row-connection")
        wf.add("a", basic.echo.new(value="a"))
        wf.add("b", basic.echo.new(value="b"), deps=["a"])
        workflow_id = await app.insert(wf, conn=conn)
        if not autocommit:
            await conn.commit()
    ids = [one, *few, *many, *batch]
    assert len(set(ids)) == len(ids) == 1 + 3 + COPY_FROM + 40
    assert (await app.get_job(one)).args == {"value": "one"}
    assert (await app.get_job(many[-1])).args == {"value": COPY_FROM - 1}
    assert (await app.get_workflow(workflow_id)).total_steps == 2
    assert _jobs(app.dsn) == len(ids) + 2


def test_the_sync_api_works_on_a_callers_dict_row_connection(dsn: str) -> None:
    app = baton.Baton(dsn)
    try:
        with psycopg.connect(dsn, row_factory=dict_row) as conn:
            one = app.enqueue_sync(basic.echo.new(value="one"), conn=conn)
            many = app.enqueue_many_sync([basic.echo.new(value=i) for i in range(COPY_FROM)],
                                         conn=conn)
            wf = baton.Workflow("sync-dict-row")
            wf.add("a", basic.echo.new(value="a"))
            workflow_id = app.insert_sync(wf, conn=conn)
        assert app.get_job_sync(one).args == {"value": "one"}
        assert app.get_job_sync(many[0]).args == {"value": 0}
        assert sql_rows(dsn, "SELECT count(*) FROM baton.jobs WHERE workflow_id = %s",
                        (workflow_id,)) == [(1,)]
    finally:
        app.close_sync()


async def test_a_workflow_inserted_on_a_dict_row_connection_runs(flows_app: baton.Baton) -> None:
    async with await psycopg.AsyncConnection.connect(flows_app.dsn,
                                                     row_factory=dict_row) as conn:
        wf = baton.Workflow("runs")
        wf.add("a", flows.value.new(v=1))
        wf.add("b", flows.value.new(v=2), deps=["a"])
        workflow_id = await flows_app.insert(wf, conn=conn)
        await conn.commit()
    async with running_worker(flows_app):
        info = await wait_for_workflow(flows_app, workflow_id)
    assert info.state == "completed"
    assert await flows_app.results(workflow_id) == {"a": 1, "b": 2}
