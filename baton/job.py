"""Job models: what a caller builds (:class:`JobSpec`) and what a row holds (:class:`Job`)."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from typing_extensions import TypedDict, Unpack

from baton.errors import ArgsError, OptionsError, PayloadTooLargeError
from baton.unique import Unique, coerce_unique


class JobState(StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    AVAILABLE = "available"
    EXECUTING = "executing"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the job will not run again unless retried by hand."""
        return self in _FINISHED


_FINISHED = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


NULL = "\\N"
"""NULL in COPY's text format."""

_ENCODE = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def encode_json(value: Any) -> str:
    """Encode plain JSON data compactly (NaN and infinities are refused)."""
    return _ENCODE(value)


class JobOptions(TypedDict, total=False):
    """The options :meth:`JobSpec.options` changes (and ``JobBatch.options``, for all)."""

    queue: str | None
    priority: int | None
    max_attempts: int | None
    unique: Unique | bool | None
    timeout: float | None
    scheduled_at: datetime | None
    schedule_in: float | timedelta | None
    meta: dict[str, Any] | None
    tags: Sequence[str] | None


@dataclass(frozen=True)
class JobSpec:
    """A job ready to enqueue: built by ``step.new(**args)``, immutable.

    ``args`` already passed validation against the step's signature and are JSON-safe.
    Build one by hand (``JobSpec(step=name, args={...})``) only for a step that lives in
    another code base: its args are then checked against the step's signature when a
    worker runs it, and here only for what no job may hold (see :func:`args_text`); their
    size is checked when it is enqueued.

    :raises OptionsError: if an option is invalid (see :func:`check_options`).
    :raises ArgsError: if the args are not JSON data PostgreSQL can store.
    """

    step: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 20
    timeout: float | None = None
    scheduled_at: datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    """Labels to find the job by (``jobs.tags``); see :func:`check_tags`."""
    unique: Unique | None = None
    """At most one job with the same key at a time (:class:`~baton.Unique`; ``True`` for its
    defaults); enforced by the database when the job is enqueued on its own."""
    args_json: str = field(default="", repr=False, compare=False)
    """The args as JSON text (computed once, when the job is built)."""

    def __post_init__(self) -> None:
        if not isinstance(self.step, str) or not self.step or "\x00" in self.step:
            raise OptionsError("step", f"must be a step name, not {self.step!r}")
        check_options(queue=self.queue, priority=self.priority, max_attempts=self.max_attempts,
                      timeout=self.timeout, step=self.step)
        if self.scheduled_at is not None and (
                not isinstance(self.scheduled_at, datetime) or self.scheduled_at.tzinfo is None):
            raise OptionsError("scheduled_at", "must be a timezone-aware datetime, not "
                               f"{self.scheduled_at!r}", step=self.step)
        if self.meta or not isinstance(self.meta, dict):
            check_meta(self.step, self.meta)
        if self.tags or type(self.tags) is not tuple:
            object.__setattr__(self, "tags", check_tags(self.tags, step=self.step))
        if self.unique is not None:
            unique = coerce_unique(self.unique, self.step)
            if unique is not None:
                unique.job_states(self.step)  # refuses a workflow's options
            object.__setattr__(self, "unique", unique)
        if not self.args_json:
            object.__setattr__(self, "args_json", args_text(self.step, self.args))

    def with_args(self, args: dict[str, Any], args_json: str) -> JobSpec:
        """Return a copy with other, already validated args (what ``step.new`` builds from
        the step's own spec: its options were checked once, so nothing is checked again).

        The one place that skips dataclass construction: ``step.new()`` takes 2.3 µs this
        way against 6 µs through ``dataclasses.replace``, which runs every option check
        again (``enqueue_batch`` builds 100,000 of them)."""
        clone = object.__new__(JobSpec)
        fields = clone.__dict__
        fields.update(self.__dict__)
        fields["args"] = args
        fields["args_json"] = args_json
        return clone

    def options(self, **changes: Unpack[JobOptions]) -> JobSpec:
        """Return a copy with some options changed (``schedule_in`` is seconds from now;
        an option given as None stays as it is)."""
        if unknown := changes.keys() - JobOptions.__annotations__.keys():
            raise TypeError(f"unknown job options: {', '.join(sorted(unknown))}")
        schedule_in = changes.pop("schedule_in", None)
        if schedule_in is not None:
            try:
                delay = (schedule_in if isinstance(schedule_in, timedelta)
                         else timedelta(seconds=schedule_in))
                changes["scheduled_at"] = datetime.now(UTC) + delay
            except (TypeError, ValueError, OverflowError) as exc:
                raise OptionsError("schedule_in", "must be seconds from now or a timedelta, "
                                   f"not {schedule_in!r}", step=self.step) from exc
        given: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given)

    def row_json(
        self,
        *,
        state: JobState = JobState.AVAILABLE,
        workflow_id: uuid.UUID | None = None,
        workflow_step: str | None = None,
    ) -> str:
        """Return the job's JSON object for the insert statement."""
        at = _ENCODE(self.scheduled_at.isoformat()) if self.scheduled_at else "null"
        return (
            f'{{"state":"{state.value}","queue":{_ENCODE(self.queue)},'
            f'"step":{_ENCODE(self.step)},"args":{self.args_json},'
            f'"meta":{_ENCODE(self.meta) if self.meta else "{}"},'
            f'"max_attempts":{self.max_attempts},"priority":{self.priority},'
            f'"timeout":{_ENCODE(self.timeout)},'
            f'"scheduled_at":{at},'
            f'"workflow_id":{_ENCODE(str(workflow_id)) if workflow_id else "null"},'
            f'"workflow_step":{_ENCODE(workflow_step)},'
            f'"tags":{_ENCODE(self.tags) if self.tags else "[]"}}}'
        )

    def row_params(self) -> dict[str, Any]:
        """Return the job's parameters for the one-job ``job_insert`` statement."""
        return {
            "queue": self.queue, "step": self.step, "args": self.args_json,
            "meta": _ENCODE(self.meta) if self.meta else "{}",
            "max_attempts": self.max_attempts, "priority": self.priority,
            "timeout": self.timeout, "scheduled_at": self.scheduled_at,
            "tags": list(self.tags),
        }

    def copy_row(
        self, state: JobState, now_text: str | None, workflow_id: str = NULL,
        workflow_step: str | None = None,
    ) -> str:
        """Return the job as one line of COPY text, its values in the order of
        :func:`copy_columns` (without ``scheduled_at`` when ``now_text`` is None: the
        column is then left to its default, now()).

        ``now_text`` is the server's transaction time, when an immediate job is scheduled.
        """
        if now_text is None:
            at_text = ""
        else:
            at_text = now_text if self.scheduled_at is None else self.scheduled_at.isoformat()
            at_text += "\t"
        meta = copy_text(_ENCODE(self.meta)) if self.meta else "{}"
        timeout = NULL if self.timeout is None else repr(float(self.timeout))
        step = NULL if workflow_step is None else copy_text(workflow_step)
        return (
            f"{state}\t{copy_text(self.queue)}\t{copy_text(self.step)}\t"
            f"{copy_text(self.args_json)}\t{meta}\t{self.max_attempts}\t{self.priority}\t"
            f"{timeout}\t{at_text}{workflow_id}\t{step}\t{tags_literal(self.tags)}\n"
        )

    def copy_head(self, state: JobState, now_text: str | None) -> tuple[list[str], str]:
        """For a COPY of jobs that differ from this one only in their args (a batch): the
        columns it fills, and the text of each line before its args, which end it.

        The columns are the step, ``scheduled_at`` when ``now_text`` is given (see
        :meth:`copy_row`), the options not at the table's default (:data:`COPY_DEFAULTS`),
        then the args: a batch with default options copies two columns, and the server
        parses and checks less for each row (the benchmark's batch enqueue, 1,000 jobs a
        call, two alternated runs each way: 124,752 and 126,871 jobs/s with every column,
        129,974 and 129,441 with these).
        """
        # The values are copy_row's own text (every tab in a value is escaped there), so
        # a batch and a list write an option alike.
        values = dict(zip(copy_columns(scheduled=now_text is not None),
                          self.copy_row(state, now_text)[:-1].split("\t"), strict=True))
        kept = {"step": values["step"]}
        if now_text is not None:
            kept["scheduled_at"] = values["scheduled_at"]
        kept.update((k, values[k]) for k, default in COPY_DEFAULTS.items()
                    if values[k] != default)
        return [*kept, "args"], "".join(f"{v}\t" for v in kept.values())


_COPY_COLUMNS = (
    "state", "queue", "step", "args", "meta", "max_attempts", "priority", "timeout",
    "scheduled_at", "workflow_id", "workflow_step", "tags",
)


def copy_columns(*, scheduled: bool) -> list[str]:
    """The columns of a :meth:`JobSpec.copy_row` line, in its order; ``scheduled``: with
    ``scheduled_at`` (ids come from the sequence)."""
    return [c for c in _COPY_COLUMNS if scheduled or c != "scheduled_at"]


COPY_DEFAULTS = {
    "state": "available", "queue": "default", "meta": "{}", "max_attempts": "20",
    "priority": "0", "timeout": NULL, "tags": "{}",
}
"""The ``jobs`` table's column defaults (sql/0001_jobs.sql, 0010_results_tags.sql), as COPY
text: :meth:`JobSpec.copy_head` leaves a column at its value here to the table. Neither a
migration nor an operator may change these defaults: a batch would take the new one while
every other insert path sends the value. tests/test_enqueue.py checks them against the
table and that no migration sets a default on ``jobs``."""

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """Escape ``value`` for COPY's text format (backslash, tab, newline, carriage return)."""
    if value.isprintable() and "\\" not in value:  # the common case, two scans in C
        return value
    return value.translate(_COPY_ESCAPES)


QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}", re.ASCII)
QUEUE_RULE = "1 to 128 ASCII letters, digits or the characters _ - . : /"
"""What a queue may be called: names ``baton worker --queues NAME=LIMIT,...`` can list."""

MAX_ATTEMPTS = 2**31 - 1
"""The column is a PostgreSQL ``integer``."""


def check_queue(queue: object) -> str | None:
    """Return why ``queue`` is not a valid queue name, or None if it is."""
    if isinstance(queue, str) and QUEUE_NAME.fullmatch(queue):
        return None
    return f"a queue name is {QUEUE_RULE}, not {queue!r}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(*, queue: str, priority: int, max_attempts: int, timeout: float | None,
                  step: str | None = None) -> None:
    """Raise :class:`OptionsError` unless the job options are in range (``step``: the step
    they are for, named in the error)."""
    if (problem := check_queue(queue)) is not None:
        raise OptionsError("queue", problem, step=step)
    if not _is_int(priority) or not 0 <= priority <= 9:
        raise OptionsError("priority", f"must be an integer from 0 (first) to 9, not "
                           f"{priority!r}", step=step)
    if not _is_int(max_attempts) or not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise OptionsError("max_attempts", f"must be an integer from 1 to {MAX_ATTEMPTS}, "
                           f"not {max_attempts!r}", step=step)
    if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool)
            or not 0 < timeout < math.inf):
        raise OptionsError("timeout", f"must be a positive, finite number of seconds, not "
                           f"{timeout!r}", step=step)


TAG_NAME = re.compile(r"[A-Za-z0-9_.:/=@+-]{1,64}", re.ASCII)
TAG_RULE = "1 to 64 ASCII letters, digits or the characters _ - . : / = @ +"
MAX_TAGS = 16
"""The most tags one job may carry."""


def check_tags(tags: object, *, step: str | None = None) -> tuple[str, ...]:
    """Return ``tags`` as a tuple without repeats (first occurrence kept).

    :raises OptionsError: unless ``tags`` is a sequence (a list) of at most :data:`MAX_TAGS`
        names of :data:`TAG_RULE` (a single string is refused: it is not a list of tags).
    """
    if isinstance(tags, str | bytes) or not isinstance(tags, Sequence):
        raise OptionsError("tags", f"must be a list of tags, not {tags!r:.80}", step=step)
    for tag in tags:
        if not isinstance(tag, str) or not TAG_NAME.fullmatch(tag):
            raise OptionsError("tags", f"a tag is {TAG_RULE}, not {tag!r:.80}", step=step)
    unique = tuple(dict.fromkeys(tags))
    if len(unique) > MAX_TAGS:
        raise OptionsError("tags", f"at most {MAX_TAGS} tags, not {len(unique)}", step=step)
    return unique


def tags_literal(tags: tuple[str, ...]) -> str:
    """Return checked tags as a PostgreSQL array literal (each quoted: a tag may read
    ``NULL``; the rule leaves nothing else to escape, for COPY either)."""
    if not tags:
        return "{}"
    return "{" + ",".join(f'"{tag}"' for tag in tags) + "}"


def check_meta(step: str, meta: object) -> None:
    """Raise :class:`OptionsError` unless ``meta`` is a dict of JSON data PostgreSQL can
    store."""
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise OptionsError("meta", f"must be a dict with string keys, not {meta!r}", step=step)
    try:
        text = encode_json(meta)
    except (TypeError, ValueError) as exc:
        where, problem = find_unstorable(meta, "meta") or ("meta", f"is not JSON data: {exc}")
        raise OptionsError("meta", f"{where}: {problem}", step=step) from exc
    if "\\u0000" in text and (found := find_unstorable(meta, "meta")) is not None:
        raise OptionsError("meta", f"{found[0]}: {found[1]}", step=step)


NUL_PROBLEM = ("contains a NUL character (\\x00): PostgreSQL cannot store it in JSON; "
               "remove it, or encode the value (base64, for example)")
BYTES_PROBLEM = ("is bytes, which JSON cannot hold (it would reach the step as text); "
                 "pass text instead (base64, for example)")


def find_unstorable(value: object, path: str) -> tuple[str, str] | None:
    """Find the first NUL character (in a string or a key) or bytes value inside ``value``
    (through dicts, lists, tuples and sets); return its dotted path under ``path`` and the
    problem."""
    found = _find(value)
    if found is None:
        return None
    parts, problem = found
    return ".".join([path, *reversed(parts)] if path else reversed(parts)) or "args", problem


_LEAVES = frozenset({int, float, bool, type(None)})
# Tuples, not `X | Y`: a union is built anew at every call (600 ns of a small walk).
_SEQUENCES = (list, tuple, set, frozenset)
_BYTES = (bytes, bytearray, memoryview)


def _find(value: object) -> tuple[list[str], str] | None:
    """:func:`find_unstorable` with the path as a list of parts, innermost first (built only
    on the way back from a find: the walk runs at every ``new`` of a step taking ``Any``)."""
    items: Iterable[tuple[object, object]]
    if type(value) is dict:  # the exact types first: isinstance of an ABC is slow
        items = value.items()
    elif type(value) is list:
        items = enumerate(value)
    elif type(value) in _LEAVES:
        return None
    elif isinstance(value, str):
        return ([], NUL_PROBLEM) if "\x00" in value else None
    elif isinstance(value, _BYTES):
        return [], BYTES_PROBLEM
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, _SEQUENCES):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return [], f"has a key {key!r} that {NUL_PROBLEM}"
        if type(item) is str:  # the common leaves are checked here, without a call
            if "\x00" in item:
                return [str(key)], NUL_PROBLEM
        elif type(item) not in _LEAVES and (found := _find(item)) is not None:
            found[0].append(str(key))
            return found
    return None


def args_text(step: str, args: object) -> str:
    """Return a hand-built job's args as JSON text.

    :raises ArgsError: naming the argument at fault, unless ``args`` is a dict of argument
        names to JSON data without NUL characters or bytes.
    """
    if not isinstance(args, dict):
        raise ArgsError(step, f"args must be a dict of argument names to values, not {args!r}")
    for name in args:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ArgsError(step, f"argument name {name!r} is not a parameter name",
                            argument=str(name))
    try:
        text = encode_json(args)
    except (TypeError, ValueError) as exc:
        found = find_unstorable(args, "")
        if found is None:
            name = next((n for n, v in args.items() if not _encodes(v)), None)
            raise ArgsError(step, f"{name or 'args'}: not JSON-serializable: {exc}",
                            argument=name) from exc
        raise ArgsError(step, f"{found[0]}: {found[1]}", argument=found[0]) from exc
    if "\\u0000" in text and (found := find_unstorable(args, "")) is not None:
        raise ArgsError(step, f"{found[0]}: {found[1]}", argument=found[0])
    return text


def _encodes(value: object) -> bool:
    try:
        encode_json(value)
    except (TypeError, ValueError):
        return False
    return True


def check_sizes(jobs: Iterable[JobSpec], limit: int) -> None:
    """Raise :class:`PayloadTooLargeError` for the first of ``jobs`` whose args' JSON is
    larger than ``limit`` bytes (its ``index`` is the job's position in ``jobs``)."""
    for index, job in enumerate(jobs):
        text = job.args_json
        if len(text) * 4 > limit:  # UTF-8 takes at most 4 bytes a character
            size = len(text.encode())
            if size > limit:
                exc = PayloadTooLargeError(job.step, size, limit)
                exc.index = index
                raise exc


def rows_text(rows: list[str]) -> str:
    """Join JSON objects into one JSON array."""
    return "[" + ",".join(rows) + "]"


def json_text(value: Any) -> str:
    """Serialize ``value`` for a jsonb parameter (NaN and infinities rejected; values
    without a JSON form, such as datetimes or models, go through pydantic)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"),
                      default=to_jsonable_python)


class Job(BaseModel):
    """One row of the ``jobs`` table."""

    id: int
    state: JobState
    queue: str
    step: str
    args: dict[str, Any]
    meta: dict[str, Any]
    errors: list[dict[str, Any]]
    attempt: int
    max_attempts: int
    snoozes: int
    priority: int
    timeout: float | None
    workflow_id: uuid.UUID | None
    workflow_step: str | None
    inserted_at: datetime
    scheduled_at: datetime
    attempted_at: datetime | None
    attempted_by: str | None
    finalized_at: datetime | None
    tags: list[str] = []
    unique_key: str | None = None
    """A unique job's key (``docs/unique.md``), None for an ordinary job."""
