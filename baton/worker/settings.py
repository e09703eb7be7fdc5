"""Worker settings: one validated model instead of a long constructor."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from baton.job import check_queue


class WorkerSettings(BaseModel):
    """How a worker process runs. Every duration is in seconds."""

    model_config = ConfigDict(frozen=True)

    queues: dict[str, int] = Field(default_factory=lambda: {"default": 10})
    poll_interval: float = Field(default=1.0, gt=0)
    """Fallback fetch interval for missed notifications; not the main wake-up path."""
    debounce: float = Field(default=0.002, ge=0)
    """How long a producer gathers freed slots before fetching again."""
    peer_wake_delay: float = Field(default=0.025, ge=0)
    """An insert's NOTIFY reaches every worker process serving its queue; one of them,
    chosen by the inserting session, fetches at once and the others this much later (one
    fetch for any number of NOTIFYs meanwhile), in case the chosen one is busy, stopped or
    runs other steps. ``0``: every process fetches at once."""
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_ttl: float = Field(default=10.0, gt=0)
    """A worker silent for this long is dead and its jobs are rescued. The heartbeat runs
    on a thread of its own, so a step that blocks the event loop does not silence it."""
    loop_blocked_after: float = Field(default=1.0, gt=0)
    """Report the event loop blocked (``worker.loop_blocked``, naming the step) after this
    long without a tick."""
    reconcile_interval: float = Field(default=10.0, gt=0)
    """How often the worker hands back jobs the table says it holds but it does not run
    (a claim whose reply was lost); a failed fetch does it at once."""
    exit_with_threads: bool = False
    """Past ``shutdown_grace``, end the process when plain def steps still run in threads
    (their jobs are rescued once the heartbeat expires) instead of waiting for them. A thread
    cannot be stopped: the CLI worker exits; an embedded worker waits by default."""
    maintenance_interval: float = Field(default=1.0, gt=0)
    leader_ttl: float = Field(default=10.0, gt=0)
    shutdown_grace: float = Field(default=15.0, ge=0)
    flush_interval: float = Field(default=0.002, ge=0)
    """How long the completer gathers outcomes before writing them in one statement."""
    flush_max: int = Field(default=2000, gt=0)
    max_pending_outcomes: int = Field(default=10_000, gt=0)
    stage_limit: int = Field(default=5000, gt=0)
    rescue_limit: int = Field(default=1000, gt=0)
    prune_after: float | None = Field(default=None, gt=0)
    """Delete finished jobs, and finished workflows with all their rows, older than this;
    ``None`` (the default) keeps them."""
    prune_limit: int = Field(default=10_000, gt=0)
    """The most rows one pass deletes from a table."""
    prune_workflow_limit: int = Field(default=100, gt=0)
    """The most finished workflows one pass deletes (with their jobs and rows)."""
    debug_log_max_age: float | None = Field(default=None, gt=0)
    """Delete captured context older than this, whatever ``prune_after`` says."""
    archive_after: float | None = Field(default=3600.0, gt=0)
    """Move finished plain jobs older than this out of ``jobs`` into ``jobs_archive``
    (partitioned by day), so the table workers use stays small; ``None`` keeps them in
    ``jobs``. With ``prune_after`` set, archive days older than it are dropped whole."""
    archive_limit: int = Field(default=10_000, gt=0)
    """The most jobs one pass moves into the archive."""

    @field_validator("queues")
    @classmethod
    def _check_queues(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("at least one queue is required")
        for name, limit in value.items():
            if (problem := check_queue(name)) is not None:
                raise ValueError(problem)
            if limit < 1:
                raise ValueError(f"queue {name!r} needs a concurrency of at least 1")
        return value


def parse_queues(text: str) -> dict[str, int]:
    """Parse ``"default=10,llm=4"`` (a bare name gets concurrency 10)."""
    queues: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, limit = part.partition("=")
        try:
            queues[name.strip()] = int(limit) if limit else 10
        except ValueError:
            raise ValueError(f"invalid queue spec {part!r}: expected NAME=LIMIT") from None
    if not queues:
        raise ValueError("no queues given: expected e.g. default=10,llm=4")
    return queues
