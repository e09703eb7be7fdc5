"""Workflow runs in events: a resumed workflow's next finish is news, a repeat is not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import baton
from baton.events import Subscription, WorkflowFinished, WorkflowResumed, parse_event

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WF = uuid.UUID("6f2bb767-df18-4abe-9000-000000000002")


def finished(run: int, outcome: str = "completed") -> WorkflowFinished:
    return WorkflowFinished(workflow_id=WF, workflow_label="l", timestamp=T0, outcome=outcome,
                            failed_steps=[], run=run)


def test_each_run_finishes_once_for_a_subscriber() -> None:
    for wanted in (WF, None):
        sub = Subscription(baton.Baton(dsn="postgresql://unused/none").events, wanted)
        resumed = WorkflowResumed(workflow_id=WF, workflow_label="l", timestamp=T0, run=2,
                                  steps=["a"])
        for event in (finished(1, "failed"), resumed, finished(1, "failed"), finished(2),
                      finished(2)):
            sub._offer(event)
        assert [(e.type, getattr(e, "run", None)) for e in sub.pending] == [
            ("workflow_finished", 1), ("workflow_resumed", 2), ("workflow_finished", 2)]


def test_resumed_events_parse_and_finishes_default_to_the_first_run() -> None:
    event = parse_event({"type": "workflow_resumed", "workflow_id": str(WF),
                         "workflow_label": "l", "run": 3, "steps": ["a", "b"],
                         "timestamp": T0.isoformat()})
    assert isinstance(event, WorkflowResumed) and (event.run, event.steps) == (3, ["a", "b"])
    old = parse_event({"type": "workflow_finished", "workflow_id": str(WF),
                       "workflow_label": "l", "outcome": "failed", "failed_steps": ["a"],
                       "timestamp": T0.isoformat()})
    assert isinstance(old, WorkflowFinished) and old.run == 1
