"""Steps: user functions registered with an app, their argument models and ``new()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict

from baton.context import Context
from baton.errors import ArgsError, PayloadTooLargeError, StepError
from baton.job import JobSpec, encode_json

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


class _ArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


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
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.max_args_bytes = max_args_bytes
        self.ctx_param, self.args_model = _args_model(fn, self.name)
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
        data, text = self.dump_args(args)
        options = self.options
        return JobSpec(self.name, data, options.queue, options.priority, options.max_attempts,
                       options.timeout, None, {}, text)

    def dump_args(self, args: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Validate ``args``; return their JSON-safe form and its JSON text."""
        try:
            model = self.args_model.model_validate(args)
            data: dict[str, Any] = model.model_dump(mode="json")
            text = encode_json(data)
        except pydantic.ValidationError as exc:
            raise ArgsError(self.name, _summarize(exc)) from exc
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            raise ArgsError(self.name, f"not JSON-serializable: {exc}") from exc
        if len(text) > self.max_args_bytes or len(text.encode()) > self.max_args_bytes:
            raise PayloadTooLargeError(self.name, len(text.encode()), self.max_args_bytes)
        return data, text

    def load_args(self, data: dict[str, Any]) -> dict[str, Any]:
        """Validate stored JSON args and return the keyword arguments for the function."""
        try:
            model = self.args_model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise ArgsError(self.name, _summarize(exc)) from exc
        return {field: getattr(model, field) for field in type(model).model_fields}

    def bind(self, kwargs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """Return the keyword arguments with the context added where the step wants it."""
        if self.ctx_param is not None:
            return {**kwargs, self.ctx_param: ctx}
        return kwargs


def _summarize(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "args"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _args_model(fn: Callable[..., Any], name: str) -> tuple[str | None, type[BaseModel]]:
    signature = inspect.signature(fn)
    try:
        hints = get_type_hints(fn)
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
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, default)
    model: type[BaseModel] = pydantic.create_model(
        f"{name.rsplit('.', 1)[-1]}_args", __base__=_ArgsBase, **fields
    )
    return ctx_param, model
