"""Unique jobs and workflows: the :class:`Unique` options, the keys built from them, and
the ids an insert returns (which say whether an existing job or workflow won).

Pure: nothing here touches the database. The database enforces uniqueness: a job or
workflow row carries its key (``unique_key``) and the states in which the key holds
(``unique_states``), and a partial unique index over ``unique_key WHERE state =
ANY(unique_states)`` lets one row at a time hold a key while it is in one of its states
(migration 0011). A row that leaves those states leaves the index: nothing clears the key,
so finishing a job costs nothing more.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

from pydantic_core import to_jsonable_python

from baton.errors import OptionsError

JOB_STATES = ("pending", "scheduled", "available", "executing", "retryable", "completed",
              "discarded", "cancelled")
"""Every job state (as :class:`baton.JobState` has them)."""

UNFINISHED_JOB_STATES = ("pending", "scheduled", "available", "executing", "retryable")
HELD_JOB_STATES = ("scheduled", "available", "executing", "retryable")
"""The states a unique job's ``states`` must include. The index only refuses a key at
insert; a job that left its states and entered them again (a snooze, a retry) while another
held its key would fail the worker's write. Once out of these, a job only ever finishes."""
"""The states in which a unique job's key holds unless ``Unique(states=...)`` says otherwise:
those of a job that may still run."""

WORKFLOW_STATES = ("running", "completed", "failed")
"""Every workflow state."""

UNFINISHED_WORKFLOW_STATES = ("running",)
"""The states in which a unique workflow's key holds by default."""


@dataclass(frozen=True)
class Unique:
    """At most one job (or workflow) with the same key at a time.

    A job's key is its step, its queue and its arguments (or the arguments named in
    ``keys``); a workflow's is its label and, unless ``by_label``, every one of its steps
    (name, function, arguments, dependencies). An insert whose key is held by an existing
    row inserts nothing and returns that row's id, flagged as a duplicate.

    :param keys: the argument names the key is built from; ``None`` (default) for all of
        them, ``()`` for none (one job of the step, per queue, at a time). Jobs only.
    :param by_label: a workflow's key is its label alone. Workflows only.
    :param period: seconds: the key holds within one period of that length (periods are
        counted from the Unix epoch on the server's clock, so ``period=3600`` means "once
        per clock hour", not "once per any 60 minutes"); ``None`` (default) for ever.
    :param states: the states in which a row holds its key. Default: a job's unfinished
        states (pending, scheduled, available, executing, retryable), a workflow's
        ``running``; a job that finishes (or a workflow) frees its key. Add ``completed``
        (and others) to keep the key while finished rows exist.
    :raises OptionsError: if an option is invalid.
    """

    keys: Sequence[str] | None = None
    by_label: bool = False
    period: float | timedelta | None = None
    states: Sequence[str] | None = None

    def __post_init__(self) -> None:
        keys: Any = self.keys
        if keys is not None:
            if isinstance(keys, str) or not isinstance(keys, Iterable):
                raise OptionsError("unique", f"keys must be a list of argument names, not "
                                   f"{keys!r}")
            keys = tuple(keys)
            bad = [k for k in keys if not isinstance(k, str) or not k]
            if bad:
                raise OptionsError("unique", f"keys must be argument names, not {bad[0]!r}")
            if len(set(keys)) != len(keys):
                raise OptionsError("unique", f"keys names an argument twice: {list(keys)}")
            object.__setattr__(self, "keys", keys)
        if not isinstance(self.by_label, bool):
            raise OptionsError("unique", f"by_label must be True or False, not "
                               f"{self.by_label!r}")
        if self.by_label and self.keys is not None:
            raise OptionsError("unique", "by_label (a workflow's key is its label) and keys "
                               "(a job's arguments) cannot be combined")
        period: Any = self.period
        if isinstance(period, timedelta):
            period = period.total_seconds()
        if period is not None:
            if (not isinstance(period, int | float) or isinstance(period, bool)
                    or not 0 < period < math.inf):
                raise OptionsError("unique", f"period must be a positive, finite number of "
                                   f"seconds (or None for ever), not {self.period!r}")
            object.__setattr__(self, "period", float(period))
        states: Any = self.states
        if states is not None:
            if isinstance(states, str) or not isinstance(states, Iterable):
                raise OptionsError("unique", f"states must be a list of states, not "
                                   f"{states!r}")
            states = tuple(str(getattr(s, "value", s)) for s in states)
            known = set(JOB_STATES) | set(WORKFLOW_STATES)
            unknown = [s for s in states if s not in known]
            if unknown or not states:
                raise OptionsError("unique", f"states must name at least one job state "
                                   f"({', '.join(JOB_STATES)}) or workflow state "
                                   f"({', '.join(WORKFLOW_STATES)}); got {list(states)}")
            object.__setattr__(self, "states", tuple(dict.fromkeys(states)))

    @cached_property
    def row_fields(self) -> str:
        """The key's period and a job's states as JSON object members, for the insert
        (made once per options object, not per job)."""
        return (f'"unique_period":{json.dumps(self.period)},'
                f'"unique_states":{json.dumps(self.job_states(), separators=(",", ":"))}')

    def job_states(self, step: str | None = None) -> list[str]:
        """The job states in which a job holds its key.

        :raises OptionsError: if the options are a workflow's (``by_label``, workflow
            states).
        """
        if self.by_label:
            raise OptionsError("unique", "by_label is for workflows; a job's key is built "
                               "from its arguments (keys=...)", step=step)
        if self.states is None:
            return list(UNFINISHED_JOB_STATES)
        if wrong := [s for s in self.states if s not in JOB_STATES]:
            raise OptionsError("unique", f"{wrong[0]!r} is not a job state; a job's states "
                               f"are {', '.join(JOB_STATES)}", step=step)
        if missing := [s for s in HELD_JOB_STATES if s not in self.states]:
            raise OptionsError(
                "unique", f"states must include {', '.join(HELD_JOB_STATES)} (missing "
                f"{', '.join(missing)}): a job goes back and forth between them (a snooze, a "
                "retry), and one that came back while another took its key could not be "
                "written", step=step)
        return list(self.states)

    def workflow_states(self) -> list[str]:
        """The workflow states in which a workflow holds its key.

        :raises OptionsError: if the options are a job's (``keys``, job states).
        """
        if self.keys is not None:
            raise OptionsError("unique", "keys names a step's arguments; a workflow's key is "
                               "its label (by_label=True) or its label and all its steps")
        if self.states is None:
            return list(UNFINISHED_WORKFLOW_STATES)
        if wrong := [s for s in self.states if s not in WORKFLOW_STATES]:
            raise OptionsError("unique", f"{wrong[0]!r} is not a workflow state; a "
                               f"workflow's states are {', '.join(WORKFLOW_STATES)}")
        if "running" not in self.states:
            raise OptionsError("unique", "a workflow's states must include running: one that "
                               "finished into its states while another took its key could "
                               "not be written")
        return list(self.states)


def coerce_unique(value: object, step: str | None = None) -> Unique | None:
    """Return ``value`` as :class:`Unique` options: ``True`` for the defaults, ``None`` or
    ``False`` for none.

    :raises OptionsError: for anything else.
    """
    if value is None or value is False:
        return None
    if value is True:
        return Unique()
    if isinstance(value, Unique):
        return value
    raise OptionsError("unique", f"must be baton.Unique(...), True or None, not {value!r}",
                       step=step)


def check_keys(unique: Unique, step: str, arg_names: Iterable[str]) -> None:
    """Raise :class:`OptionsError` unless every name in ``unique.keys`` is an argument of
    the step (and the options are a job's)."""
    unique.job_states(step)
    if unique.keys is not None:
        known = set(arg_names)
        if missing := [k for k in unique.keys if k not in known]:
            raise OptionsError("unique", f"keys name arguments the step does not take: "
                               f"{', '.join(missing)} (it takes "
                               f"{', '.join(sorted(known)) or 'none'})", step=step)


_KEY_TEXT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False, default=to_jsonable_python).encode
"""Canonical JSON of a key's parts (one encoder made once: ``json.dumps`` with options
makes a new one at every call, a third of a key's cost)."""


def _digest(parts: object) -> str:
    return hashlib.sha256(_KEY_TEXT(parts).encode()).hexdigest()


def job_key(unique: Unique, step: str, queue: str, args: Mapping[str, Any]) -> str:
    """Return the key of a job (without its period, which the server adds at insert).

    A digest, so that large arguments make a small key (an index entry has a size limit).

    :raises OptionsError: if ``keys`` names an argument the job does not have.
    """
    if unique.keys is None:
        chosen: Mapping[str, Any] = args
    else:
        if missing := [k for k in unique.keys if k not in args]:
            raise OptionsError("unique", f"keys name arguments the job does not have: "
                               f"{', '.join(missing)}", step=step)
        chosen = {k: args[k] for k in unique.keys}
    return "job:" + _digest([step, queue, chosen, unique.period])


def workflow_key(unique: Unique, label: str, steps: Iterable[tuple[str, str, Any, Any]]
                 ) -> str:
    """Return the key of a workflow: its label and, unless ``by_label``, its ``steps``
    (name, function, arguments, dependencies of each)."""
    content = None if unique.by_label else sorted(steps, key=lambda s: s[0])
    return "workflow:" + _digest([label, content, unique.period])


class JobId(int):
    """A job's id, as ``enqueue`` returns it: an ``int`` that also says whether the job is
    new or an existing job that holds the same unique key (``duplicate``)."""

    duplicate: bool = False
    """True when nothing was inserted: this is the id of the existing job that holds the
    key."""

    def __repr__(self) -> str:
        return f"JobId({int(self)}, duplicate=True)" if self.duplicate else int.__repr__(self)

    def __str__(self) -> str:  # the number: an int's str() would fall back on __repr__
        return int.__repr__(self)


def job_id(value: int, duplicate: bool = False) -> JobId:
    """Return ``value`` as a :class:`JobId`."""
    made = JobId(value)
    if duplicate:
        made.duplicate = True
    return made


class JobIds(list[int]):
    """The ids ``enqueue_many`` returns, in order, and which of them are duplicates."""

    duplicates: tuple[int, ...] = ()
    """The positions of the unique jobs that were not inserted because an existing job (or
    an earlier job of the same call) holds their key; their ids are that job's."""

    def is_duplicate(self, position: int) -> bool:
        """Whether the job at ``position`` was not inserted (see :attr:`duplicates`)."""
        return position in self.duplicates


class WorkflowId(uuid.UUID):
    """A workflow's id, as ``insert`` returns it: a UUID that also says whether the workflow
    is new or an existing one holding the same unique key (``duplicate``)."""

    __slots__ = ("duplicate",)
    duplicate: bool
    """True when nothing was inserted: this is the id of the existing workflow that holds
    the key."""

    def __init__(self, value: uuid.UUID, duplicate: bool = False) -> None:
        super().__init__(int=value.int)
        object.__setattr__(self, "duplicate", duplicate)

    def __repr__(self) -> str:
        return f"WorkflowId('{self}', duplicate={self.duplicate})"
