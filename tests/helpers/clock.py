"""A clock the tests move by hand, for the sans-I/O sessions' ``now`` arguments."""

from __future__ import annotations


class FakeClock:
    """Monotonic time that only moves when a test calls :meth:`advance`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` and return the new time."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
        return self.now

    def __call__(self) -> float:
        return self.now
