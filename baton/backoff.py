"""Retry delays: exponential backoff with jitter, pure and clock-free."""

from __future__ import annotations

import random

MAX_BACKOFF_SECONDS = 24 * 60 * 60.0


def backoff_seconds(
    attempt: int,
    *,
    base: float = 15.0,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> float:
    """Return how long to wait before retrying after failed attempt number ``attempt``.

    The delay is ``base + 2**attempt`` seconds (as in Oban), capped at a day, plus up to
    ``jitter`` of itself at random so that jobs failing together spread out.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    delay = min(base + 2.0 ** min(attempt, 40), MAX_BACKOFF_SECONDS)
    spread = (rng or random).uniform(0.0, jitter) * delay
    return delay + spread
