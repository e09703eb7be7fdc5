"""Steps: user functions registered with an app, their argument models and ``new()``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import UnionType
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    overload,
)

import pydantic
import pydantic_core
from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict, Unpack

from baton.context import Context
from baton.errors import ArgsError, PayloadTooLargeError, StepError, StepNameWarning
from baton.job import JobOptions, JobSpec, copy_text, find_unstorable, json_text
from baton.unique import Unique, check_keys

DEFAULT_MAX_ARGS_BYTES = 1_000_000


@dataclass(frozen=True)
class StepOptions:
    """How jobs of a step run unless a job says otherwise."""

    queue: str = "default"
    max_attempts: int = 20
    priority: int = 0
    timeout: float | None = None
    backoff: Callable[[int], float] | None = None
    on_dep_cancelled: Callable[..., Any] | None = None
    """Called as ``fn(ctx, reason)`` when a dependency was cancelled and this step is not."""
    on_dep_discarded: Callable[..., Any] | None = None
    """Called as ``fn(ctx, reason)`` when a dependency was discarded and this step is not."""
    llm: bool = False
    """An LLM step: a provider's HTTP 429 snoozes the job instead of failing it."""
    capture: bool = False
    """Capture full context (``ctx.capture``) for this step even if the app does not."""
    executor: Literal["thread", "process"] = "thread"
    """Where a plain ``def`` step runs: a worker thread, or a child process that a timeout,
    a cancel or a shutdown can kill (``baton.worker.processes``)."""
    unique: Unique | None = None
    """At most one job of this step with the same key at a time (:class:`~baton.Unique`)."""
    keep_result: bool = False
    """Keep what a plain job of this step returns (``job_results``; ``app.result_of``)."""
    tags: tuple[str, ...] = ()
    """Tags every job of this step starts with (``job.options(tags=...)`` replaces them)."""


_ARGS_CONFIG = ConfigDict(extra="forbid")
_typed_dict: Any = TypedDict  # called with a computed name and fields


def step_name(fn: Callable[..., Any]) -> str:
    """Return the dotted name a step is registered under (``module.qualname``)."""
    return f"{fn.__module__}.{fn.__qualname__}"


class Step:
    """A registered step: call :meth:`new` to build a job for it.

    Calling the step object itself calls the function directly (handy in tests).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        options: StepOptions,
        *,
        name: str | None = None,
        max_args_bytes: int = DEFAULT_MAX_ARGS_BYTES,
    ) -> None:
        if "<locals>" in fn.__qualname__ and name is None:
            raise StepError(
                f"step {fn.__qualname__!r} is defined inside a function; define steps at "
                "module level or pass name=... so workers can find them"
            )
        self.fn = fn
        self.name = name or step_name(fn)
        self._in_main = name is None and fn.__module__ == "__main__"
        """Named after ``__main__``: a worker that imports the module knows it by another
        name (warned about once, at the first job built)."""
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        if options.executor != "thread":
            _check_process_step(fn, self.name, self.is_async, options.executor)
        self.max_args_bytes = max_args_bytes
        self.ctx_param, self.arg_names, adapter, hints = _args_adapter(fn, self.name)
        # Validated args of JSON types need no JSON-mode copy; without floats, no NaN check.
        self._json_native = all(_plain_json(h, _JSON_SCALARS) for h in hints)
        self._float_free = all(_plain_json(h, _JSON_SCALARS_NO_FLOAT) for h in hints)
        # Where validation keeps any value as given, bytes may hide (they would reach the
        # step as text): those arguments are searched for them.
        self._untyped = tuple(n for n, h in zip(self.arg_names, hints, strict=True)
                              if _untyped(h))
        self.args_adapter = adapter
        o = options
        self._spec = JobSpec(self.name, {}, o.queue, o.priority, o.max_attempts, o.timeout,
                             tags=o.tags)
        if o.unique is not None:
            check_keys(o.unique, self.name, self.arg_names)
            self._spec = replace(self._spec, unique=o.unique)
        self._validate = adapter.validator.validate_python
        self._to_python = adapter.serializer.to_python
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Step {self.name} queue={self.options.queue!r}>"

    def new(self, **args: Any) -> JobSpec:
        """Validate ``args`` against the step's signature and return a job to enqueue.

        :raises ArgsError: if the arguments fail validation or are not JSON-serializable.
        :raises PayloadTooLargeError: if their JSON exceeds the app's limit.
        """
        if self._in_main:
            self._warn_in_main()
        data, text = self.dump_args(args)
        return self._spec.with_args(data, text)

    def _warn_in_main(self) -> None:
        self._in_main = False
        warnings.warn(
            f"step {self.name!r} is defined in the script being run (__main__): only a worker "
            "in this process knows it by that name; a `baton worker` process that imports "
            "the module names it after the module and leaves these jobs waiting. Define "
            "steps in an importable module, or name them: "
            f"@app.step(name='myapp.{self.fn.__qualname__}')",
            StepNameWarning, stacklevel=3)

    def new_many(self, args: Iterable[Mapping[str, Any]]) -> JobBatch:
        """Return jobs of this step, one per mapping of arguments, for ``enqueue_many``.

        Each job's arguments are validated when the batch is iterated, and
        ``enqueue_many`` iterates it while the server inserts the rows already sent, so
        validation overlaps the insert. A bad item raises :class:`ArgsError` (its
        ``index`` says which) and ``enqueue_many`` then inserts nothing. The batch is a
        read-only sequence of :class:`JobSpec`; ``list(batch)`` validates it at once.
        """
        if self._in_main:
            self._warn_in_main()
        return JobBatch(self, self._spec, list(args))

    def dump_args(self, args: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """Validate ``args``; return their JSON-safe form and its JSON text."""
        try:
            valid = self._validate(args)
            if self._untyped:
                self._refuse_bytes(valid)
            raw = pydantic_core.to_json(valid, inf_nan_mode="constants")
            data: dict[str, Any] = valid if self._json_native else self._to_python(
                valid, mode="json")
        except pydantic.ValidationError as exc:
            raise ArgsError(self.name, _summarize(exc)) from exc
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            raise ArgsError(self.name, f"not JSON-serializable: {exc}") from exc
        # The text is searched, not the bytes: `in` on bytes costs about 140 ns more a job
        # (a tenth of `new` for a step taking one int, as in the enqueue benchmarks).
        text = raw.decode()
        if not self._float_free and ("NaN" in text or "Infinity" in text):
            # Either a float that JSON cannot hold (refused here) or those letters in a string.
            try:
                text = json_text(valid)
            except ValueError as exc:
                raise ArgsError(self.name, f"not JSON-serializable: {exc}") from exc
            raw = text.encode()
        if "\\u0000" in text:  # a NUL character, or those letters after a backslash
            self._refuse_nul(valid)
        if len(raw) > self.max_args_bytes:
            raise PayloadTooLargeError(self.name, len(raw), self.max_args_bytes)
        return data, text

    def _refuse_bytes(self, valid: dict[str, Any]) -> None:
        for name in self._untyped:
            if name in valid and (found := find_unstorable(valid[name], name)) is not None:
                raise ArgsError(self.name, f"{found[0]}: {found[1]}", argument=found[0])

    def _refuse_nul(self, valid: dict[str, Any]) -> None:
        data = self._to_python(valid, mode="json")  # models and dates as their JSON
        if (found := find_unstorable(data, "")) is not None:
            raise ArgsError(self.name, f"{found[0]}: {found[1]}", argument=found[0])

    def load_args(self, data: dict[str, Any]) -> dict[str, Any]:
        """Validate stored JSON args and return the keyword arguments for the function."""
        try:
            return self._validate(data)  # type: ignore[no-any-return]
        except pydantic.ValidationError as exc:
            raise ArgsError(self.name, _summarize(exc)) from exc

    def bind(self, kwargs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """Return the keyword arguments with the context added where the step wants it."""
        if self.ctx_param is not None:
            return {**kwargs, self.ctx_param: ctx}
        return kwargs


class JobBatch(Sequence[JobSpec]):
    """Jobs of one step with the same options and their own arguments (``step.new_many``),
    validated one by one as they are read."""

    __slots__ = ("_args", "_spec", "_step")

    def __init__(self, step: Step, spec: JobSpec, args: list[Mapping[str, Any]]) -> None:
        self._step = step
        self._spec = spec
        self._args = args

    @property
    def spec(self) -> JobSpec:
        """The job every item is built from: the step and the batch's options."""
        return self._spec

    def __len__(self) -> int:
        return len(self._args)

    @overload
    def __getitem__(self, index: int) -> JobSpec: ...
    @overload
    def __getitem__(self, index: slice) -> JobBatch: ...
    def __getitem__(self, index: int | slice) -> JobSpec | JobBatch:
        if isinstance(index, slice):
            return JobBatch(self._step, self._spec, self._args[index])
        position = range(len(self._args))[index]  # IndexError past either end
        return self._build(position, self._args[position])

    def __iter__(self) -> Iterator[JobSpec]:
        build = self._build
        for position, args in enumerate(self._args):
            yield build(position, args)

    def __repr__(self) -> str:
        return f"<JobBatch {self._spec.step} jobs={len(self._args)}>"

    def copy_lines(self, head: str) -> Iterator[str]:
        """Yield each job's line of COPY text: ``head`` (:meth:`JobSpec.copy_head` of
        :attr:`spec`), then its args' JSON."""
        dump = self._dump
        for position, args in enumerate(self._args):
            yield f"{head}{copy_text(dump(position, args)[1])}\n"

    def _build(self, position: int, args: Mapping[str, Any]) -> JobSpec:
        data, text = self._dump(position, args)
        return self._spec.with_args(data, text)

    def _dump(self, position: int, args: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        try:
            return self._step.dump_args(args)
        except ArgsError as exc:
            exc.index = position
            exc.args = (f"{exc.args[0]} (item {position} of the batch)",)
            raise

    def options(self, **changes: Unpack[JobOptions]) -> JobBatch:
        """Return the batch with options changed for every job, as :meth:`JobSpec.options`."""
        return JobBatch(self._step, self._spec.options(**changes), self._args)


def _check_process_step(fn: Callable[..., Any], name: str, is_async: bool, executor: str
                        ) -> None:
    """Refuse an unknown executor, and a step that ``executor="process"`` cannot run: a
    child process must find the function by its module and qualified name, and it runs
    plain functions only."""
    if executor != "process":
        raise StepError(f"step {name!r}: executor must be 'thread' or 'process', "
                        f"not {executor!r}")
    if is_async:
        raise StepError(
            f"step {name!r} is async and cannot run in a process: executor='process' is for "
            "plain def steps that block; an async step runs on the worker's event loop"
        )
    if "<locals>" in fn.__qualname__:
        raise StepError(
            f"step {name!r} is defined inside a function, so a child process cannot import "
            "it; define it at module level to use executor='process'"
        )


def _summarize(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "args"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _args_adapter(
    fn: Callable[..., Any], name: str
) -> tuple[str | None, tuple[str, ...], TypeAdapter[dict[str, Any]], list[Any]]:
    """Return the context parameter, the argument names, a validator for the arguments and
    their resolved annotations (``Any`` where unresolved).

    The arguments are described as a ``TypedDict`` (defaults filled in by validation):
    validating one is several times cheaper than building a model instance per job.
    """
    signature = inspect.signature(fn)
    try:
        hints = get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to raw annotations
        hints = {}
    ctx_param: str | None = None
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        annotation = hints.get(param.name, param.annotation)
        if annotation is Context or param.name == "ctx":
            ctx_param = param.name
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise StepError(f"step {name!r} may not take *args or **kwargs")
        if param.kind is param.POSITIONAL_ONLY:
            raise StepError(f"step {name!r} may not take positional-only parameters")
        if annotation is inspect.Parameter.empty:
            annotation = Any
        if param.default is inspect.Parameter.empty:
            fields[param.name] = annotation
        else:
            fields[param.name] = NotRequired[Annotated[annotation, Field(default=param.default)]]
    args_type = _typed_dict(f"{name.rsplit('.', 1)[-1]}_args", fields)
    args_type.__module__ = fn.__module__  # where forward references are resolved
    args_type.__pydantic_config__ = _ARGS_CONFIG
    try:
        adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(args_type)
    except pydantic.PydanticUserError as exc:
        raise StepError(f"step {name!r} has arguments pydantic cannot validate: {exc}") from exc
    return ctx_param, tuple(fields), adapter, [hints.get(n, Any) for n in fields]


def _untyped(annotation: Any) -> bool:
    """Whether values validated as ``annotation`` may hold anything as it was given (``Any``,
    ``object``, a bare ``dict`` or ``list``, or a container of those)."""
    if annotation is Any or annotation is object or annotation in (dict, list, tuple, set):
        return True
    origin, params = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _untyped(params[0])
    if origin in (dict, list, tuple, set, frozenset, Union, UnionType) or (
            isinstance(origin, type) and issubclass(origin, Iterable)):
        return any(_untyped(p) for p in params if p is not Ellipsis)
    return False


_JSON_SCALARS = (int, float, str, bool, type(None))
_JSON_SCALARS_NO_FLOAT = (int, str, bool, type(None))


def _plain_json(annotation: Any, scalars: tuple[type, ...]) -> bool:
    """Whether values validated as ``annotation`` are JSON data as they are, built only of
    ``scalars``, lists and string-keyed dicts (no dates, models, sets, ``Any``, ...)."""
    if annotation in scalars:
        return True
    origin, params = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _plain_json(params[0], scalars)
    if origin is dict:
        return len(params) == 2 and params[0] is str and _plain_json(params[1], scalars)
    if origin in (list, Union, UnionType):
        return bool(params) and all(_plain_json(p, scalars) for p in params)
    return False
