"""How many tasks the receiver may hold ahead of the runtime: ``prefetch``, bounded in time.

A task held in an agent's ready pool is hidden from every other agent for its lease. With
short tasks that costs nothing and keeps the runtime fed; with long ones (a 50 s video job) four
prefetched tasks wait minutes behind the one running while a freshly scaled-out agent finds the
queue empty, and each SIGTERM drain hands them back with one more receive counted, which can take
a task that never ran to ``max_receives`` and the dead-letter queue. So the pool holds at most
what the runtime is expected to start within ``prefetch_horizon_s``, measured, never less than
one call's worth (the runtime must not wait for a receive).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class Pace:
    """Runtime seconds per task as the device sees them.

    A call's device time runs from when it was handed over, or from the end of the call before
    it if that one was still running (a server runtime holds the next job queued while one
    runs), to its end; divided by its tasks. Kept as a moving average; while a call runs longer
    than that, its elapsed time is the better estimate.
    """

    def __init__(self, alpha: float = 0.3, now: Callable[[], float] = time.monotonic) -> None:
        self.alpha = alpha
        self._now = now
        self._calls: deque[int] = deque()
        """Tasks of each call handed to the runtime and not ended, oldest first."""
        self._since: float | None = None
        """When the oldest call's device time began."""
        self.per_task_s: float | None = None
        """Moving average over ended calls; None until one has ended."""

    def started(self, tasks: int) -> None:
        if not self._calls:
            self._since = self._now()
        self._calls.append(max(1, tasks))

    def ended(self) -> None:
        if not self._calls or self._since is None:
            return
        now = self._now()
        self.observe((now - self._since) / self._calls.popleft())
        self._since = now if self._calls else None

    def observe(self, per_task_s: float) -> None:
        """One call's seconds per task, into the moving average (the simulator's replicas, which
        know each call's length, feed it directly)."""
        avg = self.per_task_s
        self.per_task_s = per_task_s if avg is None else avg + self.alpha * (per_task_s - avg)

    def estimate(self) -> float | None:
        """Seconds per task, or None before any call has ended."""
        if self.per_task_s is None:
            return None
        if self._since is None or not self._calls:
            return self.per_task_s
        return max(self.per_task_s, (self._now() - self._since) / self._calls[0])


def ahead_limit(
    prefetch: int, floor: int, horizon_s: float | None, per_task_s: float | None, queued: int = 0
) -> int:
    """Tasks the ready pool may hold: ``prefetch``, but only as many as the runtime starts within
    ``horizon_s`` at ``per_task_s`` each, after the ``queued`` calls already waiting at it (a
    server runtime's next job), and no fewer than ``floor`` (one call's worth; also the limit
    until a speed is known). Never more than ``prefetch``."""
    if horizon_s is None:
        return prefetch
    fits = floor if per_task_s is None else math.floor(horizon_s / max(per_task_s, 1e-9)) - queued
    return min(prefetch, max(floor, fits))
