"""A node's send budget: a token bucket that keeps the mean rate of its pushes under a cap.

The bucket starts empty and fills at the cap's rate, up to one second's worth or one push,
whichever is larger (a push larger than a second's worth must still be possible). A push is
made only when the bucket holds its bytes, which it then spends: over any run of T seconds
the pushes sent at most rate * T bytes. The node asks before it halves its weight, so a push
the budget refuses is skipped whole and the weights stay exact (node.py counts it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["SendBudget"]


class SendBudget:
    """Bytes a node may still push now, refilled at `mbps` Mbit/s (training thread only).

    `mbps` None: no cap, every push may go. `clock` returns seconds (time.monotonic).
    """

    def __init__(
        self,
        mbps: float | None,
        push_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = None if mbps is None else mbps * 1e6 / 8  # bytes a second
        self._capacity = 0.0 if self._rate is None else max(self._rate, float(push_bytes))
        self._clock = clock
        self._tokens = 0.0
        self._last = clock()

    def allows(self, nbytes: int) -> bool:
        """Whether a push of `nbytes` fits the budget now (it does not spend it)."""
        if self._rate is None:
            return True
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return self._tokens >= nbytes

    def spend(self, nbytes: int) -> None:
        """A push of `nbytes` that allows() let through is being made."""
        if self._rate is not None:
            self._tokens -= nbytes
