"""One queue's semantics, as every sdfleet bus engine gives them (SQS, Redis Streams, SQLite).

Messages are *visible* until an agent receives them, then *in flight* until acked. A message
released (SIGTERM drain) is visible again at once; one whose agent died is visible again when its
lease (visibility timeout) runs out. A receive beyond ``max_receives`` moves it to the dead-letter
queue. Receives take the oldest visible messages first (SQS standard queues are only roughly
FIFO; Redis Streams and SQLite are FIFO).

Messages travel in *cohorts*: ``n`` identical requests of one class that arrived at ``t`` — one
request each in exact mode, one arrival bin in aggregate mode.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import simpy


class Cohort:
    __slots__ = ("cls", "n", "receives", "recv_t", "t")

    def __init__(self, t: float, n: int, cls: int, receives: int = 0) -> None:
        self.t, self.n, self.cls, self.receives = t, n, cls, receives
        self.recv_t: float | None = None

    def split(self, k: int) -> Cohort:
        """Take ``k`` (< n) requests off this cohort as a new one."""
        part = Cohort(self.t, k, self.cls, self.receives)
        part.recv_t = self.recv_t
        self.n -= k
        return part

    def __repr__(self) -> str:
        return f"Cohort(t={self.t:.3f}, n={self.n}, cls={self.cls}, receives={self.receives})"


class SimQueue:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        classes: int,
        lease_s: float,
        max_receives: int,
        ttl_s: float | None = None,
    ) -> None:
        self.env, self.name, self.lease_s, self.max_receives = env, name, lease_s, max_receives
        self.ttl_s = ttl_s
        """The queue's ``ttl_s``: a request not started within it of its arrival is not run."""
        self.expired = 0
        """Requests an agent dropped unrun, their ``ttl_s`` past (on receipt or before their run)."""
        self.by_class: list[deque[Cohort]] = [deque() for _ in range(classes)]
        self.visible_by_class = [0] * classes
        self.visible = 0
        self.in_flight = 0
        self.dead = 0
        self.redelivered = 0
        """Requests received a second time or more (released or lost before being acked)."""
        self._waiters: list[simpy.Event] = []
        self.adjust: Callable[[bool], int] | None = None
        """Aggregate mode: settles the pool's acks due by now and returns what the counts hold that
        a real queue would not (requests of the current bin yet to arrive; with ``False``, also
        those the agents would have received ahead of their GPU)."""

    def metric(self, with_in_flight: bool) -> int:
        """What KEDA's queue scaler reads (aws-sqs-queue: visible, + not-visible with scaleOnInFlight)."""
        correction = self.adjust(with_in_flight) if self.adjust is not None else 0
        return max(0, self.visible + (self.in_flight if with_in_flight else 0) - correction)

    def settle(self) -> None:
        """Bring the counts up to now (aggregate mode acks lazily)."""
        if self.adjust is not None:
            self.adjust(True)

    def put(self, c: Cohort) -> None:

        self.by_class[c.cls].append(c)
        self.visible += c.n
        self.visible_by_class[c.cls] += c.n
        self._wake(c.n)

    def wait(self) -> simpy.Event:
        """Fires once something is visible (at once if it already is)."""
        ev = self.env.event()
        if self.visible:
            ev.succeed()
        else:
            self._waiters.append(ev)
        return ev

    def oldest(self) -> Cohort | None:
        heads = [d[0] for d in self.by_class if d]
        return min(heads, key=lambda c: c.t) if heads else None

    def take(self, k: int) -> list[Cohort]:
        """Receive up to ``k`` requests, oldest first; over-received ones go to the DLQ, and those
        past their ``ttl_s`` are expired (the agent checks on receipt, before preparing them)."""
        out: list[Cohort] = []
        while k > 0 and self.visible > 0:
            dq = min((d for d in self.by_class if d), key=lambda d: d[0].t)
            head = dq[0]
            c = head.split(k) if head.n > k else dq.popleft()
            self.visible -= c.n
            self.visible_by_class[c.cls] -= c.n
            c.receives += 1
            if c.receives > self.max_receives:
                self.dead += c.n
                continue
            if self.too_late(c, self.env.now):
                self.expired += c.n
                continue
            if c.receives > 1:
                self.redelivered += c.n
            self.in_flight += c.n
            k -= c.n
            out.append(c)
        return out

    def ack(self, n: int) -> None:
        self.in_flight -= n

    def too_late(self, c: Cohort, start: float) -> bool:
        """Whether a run of ``c`` starting at ``start`` would be past its ``ttl_s``."""
        return self.ttl_s is not None and start - c.t > self.ttl_s

    def expire(self, cohorts: list[Cohort]) -> None:
        """Received requests dropped unrun before their run (past their ``ttl_s``): acked."""
        n = sum(c.n for c in cohorts)
        self.in_flight -= n
        self.expired += n

    def release(self, cohorts: list[Cohort]) -> None:
        """Visible again now, ahead of newer requests of their class."""
        for c in sorted(cohorts, key=lambda c: c.t, reverse=True):
            self.in_flight -= c.n
            self.visible += c.n
            self.visible_by_class[c.cls] += c.n
            c.recv_t = None
            self.by_class[c.cls].appendleft(c)
        self._wake(sum(c.n for c in cohorts))

    def lose(self, cohorts: list[Cohort]) -> None:
        """Their agent died: visible again when the lease runs out."""
        if cohorts:
            self.env.process(self._expire(cohorts))

    def _expire(self, cohorts: list[Cohort]) -> Any:
        yield self.env.timeout(self.lease_s)
        self.release(cohorts)

    def _wake(self, n: int) -> None:
        """Wake as many waiting receivers as there are new requests (long polls answer one each),
        and one more: a receiver woken at the same instant by something else may not take its turn."""
        n += 1 if n else 0
        while n > 0 and self._waiters:
            ev = self._waiters.pop(0)
            if ev.triggered:
                continue
            ev.succeed()
            # A receiver woken by something else at this instant is not listening now; it finds
            # its poll answered when it looks again. One that gave up waiting (drained, killed)
            # leaves its event behind. Neither counts as one of the receivers woken.
            if ev.callbacks:
                n -= 1
