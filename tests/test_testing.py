"""The helpers baton offers for its users' own tests."""

from __future__ import annotations

import pytest

import baton
from baton.job import JobState
from baton.testing import assert_enqueued, drain_queue, perform_job
from tests.apps import basic


async def test_perform_job_runs_through_json(app: baton.Baton) -> None:
    outcome = await perform_job(app, basic.typed.new(count=3, when="2026-01-02T03:04:05Z"))
    assert outcome.state is JobState.COMPLETED
    [(count, when)] = basic.CALLS["typed"]
    assert count == 3 and when.year == 2026  # validated back into typed args
    failed = await perform_job(app, basic.always_fails.new(), attempt=2)
    assert failed.state is JobState.DISCARDED and failed.error is not None


async def test_assert_enqueued_and_drain_queue(app: baton.Baton) -> None:
    await app.enqueue_many([basic.echo.new(value={"n": i}) for i in range(5)])
    try:
        job = assert_enqueued(app, basic.echo.name, value={"n": 3})
        assert job.args == {"value": {"n": 3}} and job.state is JobState.AVAILABLE
        with pytest.raises(AssertionError, match="no waiting job"):
            assert_enqueued(app, basic.echo.name, value={"n": 9})
        await drain_queue(app)
        assert sorted(v["n"] for v in basic.CALLS["echo"]) == [0, 1, 2, 3, 4]
        with pytest.raises(AssertionError):
            assert_enqueued(app, basic.echo.name)
    finally:
        app.close_sync()
