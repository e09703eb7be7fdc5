"""Log set-up for the command line: structlog, human or JSON lines, at a chosen level."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import BindableLogger


def enabled(logger: BindableLogger, level: int) -> bool:
    """Whether ``logger`` emits ``level`` (true if it cannot tell). Hot paths check it once
    per batch instead of building fields for lines that are dropped."""
    check = getattr(logger, "is_enabled_for", None)
    return bool(check(level)) if callable(check) else True


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Configure structlog for a baton process (the library itself never configures it)."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
