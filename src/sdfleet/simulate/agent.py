"""One replica of a queue's agent, as simulation processes: receive → prepare → run → finish.

The *receiver* keeps up to ``prefetch`` (at least ``max_batch``) requests received ahead of the
GPU, no more than it starts within ``prefetch_horizon_s`` (the agent's rule), ``receive_max`` per
call, each paying ``receive_s`` and ``prepare_s``. The *runner* picks from
them: the oldest request's batch key, or (model-aware) one of the loaded model's while the oldest
has waited less than ``pass_over_s``; it takes up to ``max_batch`` compatible requests, waits at
most ``max_batch_wait_s`` for more, switches model if needed (LRU cache of ``cache_size``), runs,
and finishes them (``schedule.Schedule``). This is exact mode; aggregate mode serves all of a
queue's replicas as one fluid (``pool.Pool``).

SIGTERM (``drain``): stop receiving, release what was received and not started, let the running
chunk go on for ``drain_s``, then release what is left; ``kill`` (node gone) loses everything
held, which comes back when its lease runs out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from sdfleet.agent.pace import Pace
from sdfleet.simulate.params import AgentParams
from sdfleet.simulate.queue import Cohort, SimQueue
from sdfleet.simulate.schedule import Schedule
from sdfleet.simulate.stats import Counters
from sdfleet.simulate.trace import TaskClass

Proc = Generator[simpy.Event, Any, None]


@dataclass
class AgentContext:
    env: simpy.Environment
    queue: SimQueue
    p: AgentParams
    classes: list[TaskClass]
    run_seconds: Callable[[int, int], float]
    """(class index, batch) → seconds of one runtime call."""
    record: Callable[[int, float, float, float, float], None]
    """(class index, queue wait, end-to-end, requests, finished at)."""
    counters: Counters
    initial_model: str | None
    cache_size: int
    started: list[int] = field(default_factory=lambda: [0])
    """Replicas started so far (which of ``finish_s_samples`` is next)."""


class Replica:
    def __init__(self, ctx: AgentContext) -> None:
        self.ctx, self.env, self.q, self.p = ctx, ctx.env, ctx.queue, ctx.p
        self.buffer: list[Cohort] = []
        self.receiving: list[Cohort] = []
        self.cache: OrderedDict[str | None, None] = OrderedDict()
        self.model: str | None = None
        if ctx.initial_model is not None:
            self._load(ctx.initial_model)
        n = ctx.started[0]
        ctx.started[0] += 1
        samples = self.p.finish_s_samples
        self.finish_s = samples[n] if n < len(samples) else self.p.finish_s
        self.draining = False
        self.done = self.env.event()
        self._wake = self.env.event()
        self._picked: list[Cohort] = []
        """Taken from the buffer, not yet running (while the batch fills)."""
        self._chunk: tuple[Schedule, list[Cohort]] | None = None
        self._runner: simpy.Process | None = None
        self._receiver: simpy.Process | None = None
        self.pace = Pace()
        """GPU seconds per request seen so far (the agent's own moving average)."""

    @property
    def cap(self) -> int:
        return self.p.ahead(self.pace.estimate())

    def start(self) -> None:
        self._receiver = self.env.process(self._receive())
        self._runner = self.env.process(self._run())

    def drain(self) -> None:
        """SIGTERM: the running chunk may go on for ``drain_s``."""
        if self.draining or self.done.triggered:
            return
        self.draining = True
        self.q.release(self.buffer)
        self.buffer = []
        self._signal()
        self.env.process(self._deadline())

    def kill(self) -> None:
        """The node is gone: what this replica holds comes back after its lease."""
        if self.done.triggered:
            return
        held = self.buffer + self.receiving + self._picked + self._settle_chunk()
        self.buffer, self.receiving, self._picked = [], [], []
        self.q.lose(held)
        self.ctx.counters.add(self.q.name, "lost", sum(c.n for c in held))
        for proc in (self._runner, self._receiver):
            if proc is not None and proc.is_alive:
                proc.interrupt("kill")
        self._finish()

    def _deadline(self) -> Proc:
        yield self.env.timeout(self.p.drain_s)
        if self._runner is not None and self._runner.is_alive and (self._chunk or self._picked):
            self._runner.interrupt("drain")

    def _signal(self) -> None:
        ev, self._wake = self._wake, self.env.event()
        ev.succeed()

    def _finish(self) -> None:
        if not self.done.triggered:
            self.done.succeed()

    # -- receive and prepare -------------------------------------------------------------

    def _receive(self) -> Proc:
        poll: simpy.Event | None = None
        try:
            while not self.draining:
                room = self.cap - sum(c.n for c in self.buffer)
                if room <= 0:
                    yield self._wake
                elif not self.q.visible:
                    # One long poll stays in line while the runner works: a busy agent with room
                    # is as early in the queue's line of waiting receivers as when it started
                    # waiting (Redis and SQS answer the longest-waiting poll first), not sent to
                    # the back each time its runner takes a task.
                    if poll is None or poll.triggered:
                        poll = self.q.wait()
                    yield poll | self._wake
                else:
                    yield from self._receive_once(room)
        except simpy.Interrupt:
            return

    def _receive_once(self, room: int) -> Proc:
        self.receiving = self.q.take(min(room, self.p.receive_max))
        n = sum(c.n for c in self.receiving)
        yield self.env.timeout(self.p.receive_s)
        now = self.env.now
        for c in self.receiving:
            c.recv_t = now
        yield self.env.timeout(self.p.prepare_s * n)
        got, self.receiving = self.receiving, []
        if self.draining:
            self.q.release(got)
            return
        self.buffer.extend(got)
        self._signal()

    # -- run and finish ------------------------------------------------------------------

    def _run(self) -> Proc:
        try:
            while True:
                if not self.buffer:
                    if self.draining:
                        break
                    yield self._wake
                    continue
                self._picked = self._pick()
                self._signal()  # room for the receiver
                if self.p.max_batch_wait_s > 0:
                    yield from self._fill(self._picked)
                yield from self._execute(self._picked)
        except simpy.Interrupt as stop:
            self._stopped(str(stop.cause))
        self._finish()

    def _pick(self) -> list[Cohort]:
        head = self.buffer[0]
        key = self.ctx.classes[head.cls].batch_key
        waited = self.env.now - (head.recv_t if head.recv_t is not None else self.env.now)
        if self.p.model_aware and key[0] != self.model and waited < self.p.pass_over_s:
            for c in self.buffer:
                k = self.ctx.classes[c.cls].batch_key
                if k[0] == self.model or (k[0] in self.cache and key[0] not in self.cache):
                    key = k
                    break
        return self._take(key, self.p.max_batch)

    def _take(self, key: tuple[Any, ...], limit: int) -> list[Cohort]:
        out: list[Cohort] = []
        rest: list[Cohort] = []
        for c in self.buffer:
            if limit > 0 and self.ctx.classes[c.cls].batch_key == key:
                part = c.split(limit) if c.n > limit else c
                out.append(part)
                limit -= part.n
                if part is not c:
                    rest.append(c)
            else:
                rest.append(c)
        self.buffer = rest
        return out

    def _fill(self, chunk: list[Cohort]) -> Proc:
        """Dynamic batching: wait up to ``max_batch_wait_s`` for compatible company."""
        key = self.ctx.classes[chunk[0].cls].batch_key
        deadline = self.env.now + self.p.max_batch_wait_s
        while sum(c.n for c in chunk) < self.p.max_batch and not self.draining:
            more = self._take(key, self.p.max_batch - sum(c.n for c in chunk))
            chunk.extend(more)
            if more:
                self._signal()
                continue
            left = deadline - self.env.now
            if left <= 0:
                break
            yield self._wake | self.env.timeout(left)

    def _load(self, model: str) -> float:
        """Make ``model`` current; the seconds it takes (0 when it already is)."""
        if model == self.model:
            return 0.0
        cost = self.p.switch_cached_s if model in self.cache else self.p.model_load_s
        if self.model is not None:
            self.ctx.counters.add(self.q.name, "switches")
        self.cache[model] = None
        self.cache.move_to_end(model)
        while len(self.cache) > self.ctx.cache_size:
            self.cache.popitem(last=False)
        self.model = model
        return cost

    def _execute(self, chunk: list[Cohort]) -> Proc:
        # Queue wait ends when the run starts, not at the receive: a prefetched request still
        # waits in the agent's pool (the real agent's queue_wait + pool_wait + runtime_wait).
        now = self.env.now
        late = [c for c in chunk if self.q.too_late(c, now)]  # waited here past their ttl_s
        if late:
            self.q.expire(late)
            chunk = [c for c in chunk if c not in late]
            if not chunk:
                self._picked = []
                return
        for c in chunk:
            self.ctx.record(c.cls, now - c.t, -1.0, c.n, now)
        first = self.ctx.classes[chunk[0].cls]
        size = sum(c.n for c in chunk)
        switch = self._load(first.model) if first.model is not None else 0.0
        b = min(self.p.max_batch, size)
        last = size - (-(-size // b) - 1) * b
        overhead = self.p.run_overhead_s
        sched = Schedule(
            start=self.env.now + switch,
            size=size,
            batch=b,
            run_full=self.ctx.run_seconds(chunk[0].cls, b) + overhead,
            run_last=self.ctx.run_seconds(chunk[0].cls, last) + overhead,
            finish_s=self.finish_s,
            concurrency=self.p.finish_concurrency,
        )
        self._chunk, self._picked = (sched, chunk), []
        self.pace.observe(sched.run_full / b)
        yield self.env.timeout(sched.end - self.env.now)
        self._chunk = None
        self._complete(sched, chunk, size, sched.end)

    def _complete(self, sched: Schedule, chunk: list[Cohort], upto: int, busy_until: float) -> None:
        """Record and ack the first ``upto`` requests of the chunk."""
        pos = 0
        for c in chunk:
            n = min(c.n, upto - pos)
            if n <= 0:
                break
            end = sched.finished(pos + (n - 1) / 2)
            self.ctx.record(c.cls, -1.0, end - c.t, n, end)
            pos += n
        self.q.ack(pos)
        self.ctx.counters.add(self.q.name, "completed", pos)
        self.ctx.counters.add(self.q.name, "gpu_busy_s", max(0.0, busy_until - sched.start))

    def _stopped(self, cause: str) -> None:
        if cause == "kill":  # kill() has settled everything
            return
        rest = self._picked + self._settle_chunk()
        self._picked = []
        self.ctx.counters.add(self.q.name, "interrupted", sum(c.n for c in rest))
        self.q.release(rest)

    def _settle_chunk(self) -> list[Cohort]:
        """Record the running chunk's calls that have ended; the requests not done."""
        if self._chunk is None:
            return []
        sched, chunk = self._chunk
        self._chunk = None
        done = sched.done_by(self.env.now)
        self._complete(sched, chunk, done, self.env.now)
        return _after(chunk, done)


def _after(chunk: list[Cohort], k: int) -> list[Cohort]:
    """The requests of ``chunk`` after the first ``k``."""
    out: list[Cohort] = []
    for c in chunk:
        if k >= c.n:
            k -= c.n
            continue
        if k > 0:
            c.split(k)
            k = 0
        out.append(c)
    return out
