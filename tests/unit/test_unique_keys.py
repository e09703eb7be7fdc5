"""Unique keys and the ids that report duplicates: pure logic, no database."""

from __future__ import annotations

import pickle
import uuid
from datetime import timedelta

import baton
from baton.unique import (
    UNFINISHED_JOB_STATES,
    JobId,
    JobIds,
    Unique,
    WorkflowId,
    job_id,
    job_key,
    workflow_key,
)


def test_a_job_key_is_its_step_queue_and_args_in_any_order() -> None:
    unique = Unique()
    key = job_key(unique, "app.send", "default", {"to": "a", "n": 1})
    assert key == job_key(unique, "app.send", "default", {"n": 1, "to": "a"})
    assert key.startswith("job:") and len(key) == 4 + 64
    assert key != job_key(unique, "app.send", "mail", {"to": "a", "n": 1})
    assert key != job_key(unique, "app.other", "default", {"to": "a", "n": 1})
    assert key != job_key(unique, "app.send", "default", {"to": "a", "n": 2})


def test_chosen_keys_and_the_period_make_the_key() -> None:
    by_user = Unique(keys=["to"])
    assert (job_key(by_user, "s", "q", {"to": "a", "n": 1})
            == job_key(by_user, "s", "q", {"to": "a", "n": 2}))
    none = Unique(keys=[])
    assert job_key(none, "s", "q", {"to": "a"}) == job_key(none, "s", "q", {"to": "b"})
    assert (job_key(Unique(period=60), "s", "q", {}) != job_key(Unique(period=61), "s", "q", {})
            != job_key(Unique(), "s", "q", {}))


def test_a_workflow_key_is_its_label_and_steps_or_its_label() -> None:
    steps = [("a", "app.fetch", {"url": "u"}, []), ("b", "app.parse", {}, ["a"])]
    content = workflow_key(Unique(), "ingest", steps)
    assert content == workflow_key(Unique(), "ingest", list(reversed(steps)))
    assert content != workflow_key(Unique(), "ingest", steps[:1])
    by_label = Unique(by_label=True)
    assert workflow_key(by_label, "ingest", steps) == workflow_key(by_label, "ingest", [])
    assert workflow_key(by_label, "ingest", []) != workflow_key(by_label, "other", [])


def test_options_are_normalized() -> None:
    held = ["scheduled", "executing", "retryable"]
    unique = Unique(keys=["a"], period=timedelta(minutes=1),
                    states=[baton.JobState.AVAILABLE, *held, "completed", "available"])
    assert unique.keys == ("a",) and unique.period == 60.0
    assert unique.states == ("available", *held, "completed")
    assert unique == Unique(keys=("a",), period=60,
                            states=("available", *held, "completed"))
    assert Unique().job_states() == list(UNFINISHED_JOB_STATES)
    assert Unique().workflow_states() == ["running"]
    assert unique.row_fields == ('"unique_period":60.0,"unique_states":["available",'
                                 '"scheduled","executing","retryable","completed"]')
    assert pickle.loads(pickle.dumps(unique)) == unique


def test_ids_report_duplicates_and_stay_ints_and_uuids() -> None:
    new, dup = job_id(5), job_id(5, duplicate=True)
    assert isinstance(dup, int) and dup == new == 5 and dup + 1 == 6
    assert (new.duplicate, dup.duplicate) == (False, True)
    assert repr(new) == "5" and repr(dup) == "JobId(5, duplicate=True)"
    assert str(dup) == f"{dup}" == "%s" % dup == "5"  # noqa: UP031 (every way to print it)
    assert isinstance(new, JobId)
    ids = JobIds([1, 2, 2])
    ids.duplicates = (2,)
    assert ids == [1, 2, 2] and ids.is_duplicate(2) and not ids.is_duplicate(1)
    assert JobIds([1]).duplicates == ()
    raw = uuid.uuid4()
    wf = WorkflowId(raw, duplicate=True)
    assert wf == raw and hash(wf) == hash(raw) and str(wf) == str(raw) and wf.duplicate
    assert not WorkflowId(raw).duplicate
