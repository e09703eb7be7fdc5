"""Job input rules without a database: NUL characters, bytes, options and queue names are
refused where they are given, with one error naming the step and the argument or option."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import pytest

import baton
from baton.job import JobSpec
from baton.worker.settings import WorkerSettings, parse_queues
from tests.apps import basic

ECHO = basic.echo.name


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


def test_meta_with_a_nul_character_is_refused() -> None:
    with pytest.raises(baton.OptionsError, match=r"meta\.origin: contains a NUL") as info:
        basic.echo.new(value=1).options(meta={"origin": "web\x00"})
    assert info.value.option == "meta" and info.value.step == ECHO
    with pytest.raises(baton.OptionsError, match="meta"):
        JobSpec(step=ECHO, meta={"n": math.nan})


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
