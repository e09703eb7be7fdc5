"""Control-flow signals a step raises (or returns) to steer its own job.

They are not errors: a snoozed or cancelled job did nothing wrong.
"""

from __future__ import annotations


class Signal(Exception):
    """Base of the signals a step may raise to end its attempt early."""


class Snooze(Signal):
    """Put the job back for ``seconds``; the attempt is given back and the snooze counted."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("snooze seconds must be >= 0")
        self.seconds = float(seconds)
        super().__init__(f"snoozed for {self.seconds:g}s")


class Cancel(Signal):
    """Cancel the job: it will not run again."""

    def __init__(self, reason: str = "cancelled by step") -> None:
        self.reason = reason
        super().__init__(reason)


class Discard(Signal):
    """Fail the job permanently, whatever attempts remain."""

    def __init__(self, reason: str = "discarded by step") -> None:
        self.reason = reason
        super().__init__(reason)
