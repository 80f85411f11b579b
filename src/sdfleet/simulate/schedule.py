"""When each request of a chunk runs and finishes on one GPU: plain arithmetic, no engine.

A chunk is ``size`` compatible requests run as ``ceil(size / batch)`` runtime calls, back to back.
After its call a request is *finished* (encoded, uploaded, recorded, notified, acked):

- serially (``concurrency`` 0, today's agent): the GPU waits for the batch's finishing, one request
  after the other, before the next call;
- by at most ``concurrency`` requests at once while the GPU runs the next call (the staged
  agent): the GPU is held back only when finishing cannot keep up, so a call every
  ``max(run, batch × finish_s / concurrency)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    start: float
    size: int
    batch: int
    run_full: float
    """One runtime call of a full batch, overhead included."""
    run_last: float
    """The last call (a partial batch when ``size`` is not a multiple of ``batch``)."""
    finish_s: float
    concurrency: int

    @property
    def calls(self) -> int:
        return math.ceil(self.size / self.batch)

    def _size(self, j: int) -> int:
        return self.size - j * self.batch if j == self.calls - 1 else self.batch

    def _run(self, j: int) -> float:
        return self.run_last if j == self.calls - 1 else self.run_full

    def cycle(self, j: int) -> float:
        """From the start of call ``j`` to the start of the next."""
        run, b = self._run(j), self._size(j)
        if self.concurrency == 0:
            return run + b * self.finish_s
        return max(run, b * self.finish_s / self.concurrency)

    def call_start(self, j: int) -> float:
        return self.start + j * self.cycle(0) if j < self.calls else self.end

    def run_end(self, j: int) -> float:
        return self.call_start(j) + self._run(j)

    @property
    def end(self) -> float:
        """When the runner is free again (the last call's cycle over)."""
        return self.start + (self.calls - 1) * self.cycle(0) + self.cycle(self.calls - 1)

    def finished(self, pos: float) -> float:
        """When the request at position ``pos`` (0-based, may be a cohort's middle) is finished."""
        j = min(int(pos // self.batch), self.calls - 1)
        if self.concurrency == 0:
            return self.run_end(j) + (pos - j * self.batch + 1) * self.finish_s
        return self.run_end(j) + self.finish_s

    def started(self, pos: float) -> float:
        return self.call_start(min(int(pos // self.batch), self.calls - 1))

    def done_by(self, t: float) -> int:
        """Requests whose runtime call ended by ``t`` (their finishing is never cut short)."""
        done = 0
        for j in range(self.calls):
            if self.run_end(j) > t:
                break
            done += self._size(j)
        return done
