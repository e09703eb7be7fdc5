"""baton's logging: structured events through the standard :mod:`logging` machinery.

Every module logs through a :class:`Logger` named ``baton.<part>`` (``baton.job``,
``baton.worker``, ...): a dotted event name and fields, handed to
``logging.getLogger(name)`` as one record. baton never configures logging itself, so an
application that configures nothing sees warnings only (Python's last-resort handler), and
one that configures :mod:`logging` controls baton like any other library. A record's
message is a dict of the event and its fields, shaped as structlog's
``ProcessorFormatter`` expects, so structlog users render baton's events as their own;
a plain formatter prints it as ``job.completed job_id=1 queue=default ...``.

:func:`configure_logging` is the command line's set-up (human or JSON lines on stderr).
"""

from __future__ import annotations

import json as _json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import structlog

__all__ = [
    "Event", "Logger", "capture_logs", "configure_logging", "enabled", "formatter", "get_logger",
]

_OUT_OF_MESSAGE = frozenset({"event", "exc_info", "stack_info"})


class Event(dict[str, Any]):
    """A record's message: the event and its fields (a dict), printed as one line."""

    __slots__ = ()

    def __str__(self) -> str:
        parts = [str(self.get("event", ""))]
        for key, value in self.items():
            if key in _OUT_OF_MESSAGE:
                continue
            text = value if isinstance(value, str) and value and " " not in value else None
            parts.append(f"{key}={text if text is not None else repr(value)}")
        return " ".join(parts)


class Logger:
    """Log structured events (``log.info("job.completed", job_id=1)``) to a stdlib logger.

    A call below the logger's effective level returns at once (one ``isEnabledFor``), so
    fields are never formatted for a line that is dropped; hot paths that build their
    fields first check :func:`enabled`.
    """

    __slots__ = ("_context", "_logger")

    def __init__(self, logger: logging.Logger, context: dict[str, Any] | None = None) -> None:
        self._logger = logger
        self._context = context or {}

    @property
    def name(self) -> str:
        return self._logger.name

    def bind(self, **fields: Any) -> Logger:
        """Return a logger that adds ``fields`` to every event."""
        return Logger(self._logger, {**self._context, **fields})

    def is_enabled_for(self, level: int) -> bool:
        """Whether a record at ``level`` would be handled."""
        return self._logger.isEnabledFor(level)

    def debug(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at error with the exception being handled."""
        if self._logger.isEnabledFor(logging.ERROR):
            fields.setdefault("exc_info", True)
            self._emit(logging.ERROR, "error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.CRITICAL):
            self._emit(logging.CRITICAL, "critical", event, fields)

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        message = Event(structlog.contextvars.get_contextvars())
        message.update(self._context)
        message.update(fields)
        message["event"] = event
        self._logger.log(
            level, message,
            exc_info=fields.get("exc_info"), stack_info=bool(fields.get("stack_info")),
            # What structlog.stdlib.ProcessorFormatter reads from a record of its own.
            extra={"_logger": self._logger, "_name": method},
            stacklevel=3,  # the caller of info(), not this module
        )


def get_logger(name: str) -> Logger:
    """Return the logger of ``name`` (``baton.<part>``) over ``logging.getLogger(name)``."""
    return Logger(logging.getLogger(name))


def enabled(logger: Logger, level: int) -> bool:
    """Whether ``logger`` emits ``level``. Hot paths check it once per batch instead of
    building fields for lines that are dropped."""
    return logger.is_enabled_for(level)


# -- tests -------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.entries: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg
        entry = dict(msg) if isinstance(msg, dict) else {"event": record.getMessage()}
        entry["log_level"] = record.levelname.lower()
        self.entries.append(entry)


@contextmanager
def capture_logs(name: str = "baton") -> Iterator[list[dict[str, Any]]]:
    """Collect the events of ``name``'s loggers at every level while the block runs.

    Each entry is the event's fields with ``event`` and ``log_level``, e.g.
    ``{"event": "job.completed", "log_level": "info", "job_id": 1, ...}``. Records still
    reach the application's handlers as usual.
    """
    logger = logging.getLogger(name)
    handler = _Capture()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.entries
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- the command line --------------------------------------------------------------------


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


def _colours() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def formatter(*, json: bool = False, colors: bool | None = None) -> logging.Formatter:
    """Return the formatter of baton's command line: JSON lines, or human lines coloured
    only when ``colors`` (default: stderr is a terminal and ``NO_COLOR`` is unset).

    Records of other libraries (psycopg's, the application's) get the same shape: their
    message becomes the ``event``.
    """
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=partial(_json.dumps, default=str))
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=_colours() if colors is None else colors)
    processors: list[structlog.typing.Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
    ]
    if json:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    return structlog.stdlib.ProcessorFormatter(processors=processors)


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Configure the process's logging as ``baton``'s command line does: one line per
    record on stderr, human (coloured on a terminal) or JSON, for baton's events at
    ``level`` and above and every other library's (psycopg's, the application's) at
    warning and above (or ``level`` if higher).

    This is an application's choice, made once at start: it sets the root logger and
    the ``baton`` logger's level, and routes Python's warnings through logging. A second
    call replaces the first one's handler.

    :raises ValueError: if ``level`` is not a level name.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(_Stderr())
    handler.setFormatter(formatter(json=json))
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)  # Python's warnings too, as py.warnings records
    logging.getLogger("baton").setLevel(numeric)
