"""A subscriber's pure decisions: reconnect delays, which errors heal, what is delivered."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import baton
from baton.events import (
    RECONNECT_MAX_SECONDS,
    StepUpdated,
    Subscription,
    WorkflowFinished,
    is_transient,
    reconnect_delay,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WF = uuid.UUID("6f2bb767-df18-4abe-9000-000000000001")


def test_reconnect_delay_doubles_up_to_a_cap_with_jitter() -> None:
    rng = random.Random(3)
    for attempt, ceiling in [(1, 0.05), (2, 0.1), (3, 0.2), (7, 3.2), (8, 5.0), (60, 5.0)]:
        draws = [reconnect_delay(attempt, rng=rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len(set(draws)) > 1  # jittered
    assert reconnect_delay(1000) <= RECONNECT_MAX_SECONDS
    with pytest.raises(ValueError):
        reconnect_delay(0)


def test_lost_connections_and_shutdowns_heal_statement_errors_do_not() -> None:
    assert is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert is_transient(psycopg.errors.AdminShutdown("terminating connection"))
    assert is_transient(psycopg.errors.CannotConnectNow("the database system is starting up"))
    assert is_transient(psycopg.errors.TooManyConnections("too many clients"))
    assert not is_transient(psycopg.errors.UndefinedTable('relation "baton.workflows"'))
    assert not is_transient(psycopg.errors.InsufficientPrivilege("permission denied"))
    assert not is_transient(psycopg.ProgrammingError("no SQLSTATE, not a lost connection"))


def subscription(wanted: uuid.UUID | None) -> Subscription:
    return Subscription(baton.Baton(dsn="postgresql://unused/none").events, wanted)


def step(state: str, attempt: int, name: str = "a", job_id: int = 1) -> StepUpdated:
    return StepUpdated(workflow_id=WF, workflow_label="l", timestamp=T0, step_name=name,
                       worker="w", state=state, job_id=job_id, attempt=attempt,
                       has_result=False)


def finished(workflow_id: uuid.UUID, at: datetime) -> WorkflowFinished:
    return WorkflowFinished(workflow_id=workflow_id, workflow_label="l", timestamp=at,
                            outcome="completed", failed_steps=[])


def offered(sub: Subscription, *events: StepUpdated | WorkflowFinished) -> list[object]:
    for event in events:
        sub._offer(event)
    delivered = list(sub.pending)
    sub.pending.clear()
    return [(e.state, e.attempt) if isinstance(e, StepUpdated) else e.workflow_id
            for e in delivered]


def test_a_finish_is_delivered_once_and_only_for_the_wanted_workflow() -> None:
    other = uuid.uuid4()
    sub = subscription(WF)
    assert offered(sub, finished(other, T0), finished(WF, T0), finished(WF, T0)) == [WF]


def test_live_step_events_that_a_catch_up_already_covered_do_not_step_back() -> None:
    sub = subscription(WF)
    # The catch-up reported "completed"; the transitions just before it arrive after it.
    assert offered(sub, step("completed", 1)) == [("completed", 1)]
    assert offered(sub, step("executing", 1), step("completed", 1)) == []
    # A retry by hand starts a new attempt, which is news.
    assert offered(sub, step("executing", 2)) == [("executing", 2)]
    assert offered(sub, step("retryable", 1), step("executing", 2)) == []
    # Another step keeps its own history.
    assert offered(sub, step("executing", 1, name="b", job_id=2)) == [("executing", 1)]


def test_every_transition_of_a_plain_run_is_delivered() -> None:
    sub = subscription(WF)
    run = [step("executing", 1), step("snoozed", 1), step("executing", 1),
           step("retryable", 1), step("executing", 2), step("discarded", 2)]
    assert offered(sub, *run) == [(e.state, e.attempt) for e in run]


def test_finishes_far_behind_the_mark_are_forgotten() -> None:
    sub = subscription(None)
    sub.mark = T0
    old = [finished(uuid.uuid4(), T0 - timedelta(hours=1)) for _ in range(1024)]
    recent = finished(uuid.uuid4(), T0)
    assert len(offered(sub, *old, recent)) == 1025
    assert set(sub.seen) == {(recent.workflow_id, 1)}
    assert offered(sub, recent) == []
