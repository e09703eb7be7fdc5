"""Bad input is refused where it is given, with one error naming the step and the argument or
option at fault, and nothing is written; a caller's connection works whatever its row
factory."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row, namedtuple_row

import baton
from baton.job import JobSpec
from baton.ops import COPY_FROM
from baton.testing import running_worker, wait_for_workflow
from baton.worker.settings import WorkerSettings, parse_queues
from tests.apps import basic, flows
from tests.helpers import sql_rows

ECHO = basic.echo.name


def _jobs(dsn: str) -> int:
    return int(sql_rows(dsn, "SELECT count(*) FROM baton.jobs")[0][0])


# -- NUL characters and bytes -------------------------------------------------------------


@pytest.mark.parametrize(("value", "argument"), [
    ("a\x00b", "value"),
    ({"note": ["ok", "bad\x00"]}, "value.note.1"),
    ({"key\x00": 1}, "value"),
])
def test_a_nul_character_is_refused_at_new(value: Any, argument: str) -> None:
    with pytest.raises(baton.ArgsError, match="NUL character") as info:
        basic.echo.new(value=value)
    assert info.value.step == ECHO and info.value.argument == argument
    assert f"step {ECHO!r}" in str(info.value) and argument in str(info.value)


def test_bytes_are_refused_where_the_signature_takes_anything() -> None:
    with pytest.raises(baton.ArgsError, match="is bytes") as info:
        basic.echo.new(value=b"abc")
    assert info.value.argument == "value"
    with pytest.raises(baton.ArgsError, match="is bytes") as nested:
        basic.echo.new(value={"blob": [bytearray(b"\x00\xff")]})
    assert nested.value.argument == "value.blob.0"


async def _takes_bytes(data: bytes) -> None: ...


def test_bytes_a_signature_asks_for_travel_as_utf8_text() -> None:
    step = baton.Baton().step(name="tests.bytes_step")(_takes_bytes)
    assert step.new(data=b"abc").args == {"data": "abc"}
    with pytest.raises(baton.ArgsError, match="NUL character") as info:
        step.new(data=b"a\x00")
    assert info.value.argument == "data"


def test_text_that_only_looks_like_an_escaped_nul_is_kept() -> None:
    # A backslash then "u0000" is six ordinary characters, not a NUL.
    job = basic.echo.new(value="\\u0000")
    assert job.args == {"value": "\\u0000"}


def test_a_bad_item_of_a_batch_is_named_with_its_argument() -> None:
    batch = basic.echo.new_many([{"value": 1}, {"value": {"deep": "x\x00"}}])
    with pytest.raises(baton.ArgsError) as info:
        list(batch)
    assert (info.value.index, info.value.argument) == (1, "value.deep")


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


def test_meta_with_a_nul_character_is_refused() -> None:
    with pytest.raises(baton.OptionsError, match=r"meta\.origin: contains a NUL") as info:
        basic.echo.new(value=1).options(meta={"origin": "web\x00"})
    assert info.value.option == "meta" and info.value.step == ECHO
    with pytest.raises(baton.OptionsError, match="meta"):
        JobSpec(step=ECHO, meta={"n": math.nan})


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


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "option"), [
    ({"priority": True}, "priority"),
    ({"priority": 10}, "priority"),
    ({"priority": 1.0}, "priority"),
    ({"max_attempts": True}, "max_attempts"),
    ({"max_attempts": 2**31}, "max_attempts"),
    ({"timeout": True}, "timeout"),
    ({"timeout": math.inf}, "timeout"),
    ({"timeout": "30"}, "timeout"),
    ({"scheduled_at": "2026-01-01T00:00:00Z"}, "scheduled_at"),
    ({"scheduled_at": datetime(2026, 1, 1)}, "scheduled_at"),  # naive
    ({"queue": "a,b=c"}, "queue"),
    ({"queue": "two words"}, "queue"),
    ({"queue": "tab\there"}, "queue"),
    ({"queue": ""}, "queue"),
    ({"meta": ["not", "a", "dict"]}, "meta"),
])
def test_bad_options_are_refused_at_construction(options: dict[str, Any], option: str) -> None:
    with pytest.raises(baton.OptionsError) as built:
        JobSpec(step=ECHO, **options)
    assert built.value.option == option and built.value.step == ECHO
    assert isinstance(built.value, ValueError)  # what it raised before it had a type
    with pytest.raises(baton.OptionsError) as changed:
        basic.echo.new(value=1).options(**options)
    assert changed.value.option == option


def test_schedule_in_must_be_a_delay() -> None:
    with pytest.raises(baton.OptionsError, match="schedule_in"):
        basic.echo.new(value=1).options(schedule_in="soon")  # type: ignore[arg-type]


def test_queue_names_follow_one_rule_from_step_to_worker() -> None:
    app = baton.Baton()
    with pytest.raises(baton.OptionsError, match="queue"):
        app.step(queue="a,b=c", name="bad.queue")(basic.echo.fn)
    with pytest.raises(ValueError, match="queue name"):
        WorkerSettings(queues={"a b": 1})
    name = "Tenant-1/mail.outbound:high_priority"
    job = basic.echo.new(value=1).options(queue=name)
    assert WorkerSettings(queues=parse_queues(f"{job.queue}=3")).queues == {name: 3}


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
