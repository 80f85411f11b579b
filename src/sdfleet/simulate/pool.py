"""Aggregate mode: all ready replicas of a queue served as one fluid, one step per arrival bin.

Every ``dt`` the pool has ``replicas × dt`` seconds of GPU to give. It serves the queue oldest
first; a request costs ``cycle / batch`` of it, where the batch is what the backlog allows
(``ceil(visible of its class / replicas)``, at most ``max_batch``) and the cycle is the runtime
call plus finishing (serial, or ``concurrency`` at a time beside the next call). A request served
after ``used`` seconds of the step starts ``used / replicas`` into it; its queue wait runs from
the end of its arrival bin (so waits are at most ``dt`` short under backlog, exact when idle), its
end-to-end adds the call and the finishing. Model switches on a queue that mixes models are
estimated from the mix served (FIFO: ``calls × (1 − Σ share²)``; model-aware: at most one per
replica and model per ``pass_over_s``) and their time taken from the next step, as is the
loading of the models a new replica serves (beyond the one its pod loaded). A replica
killed with its node loses its share of the requests in service and what it held ahead (``prefetch``,
bounded by ``prefetch_horizon_s``), which come back after their lease.

Exact mode (``agent.Replica``) models each replica's stages; ``tests/unit/test_simulate_engine.py``
compares the two on one trace.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

import simpy

from sdfleet.simulate.params import AgentParams
from sdfleet.simulate.queue import Cohort, SimQueue
from sdfleet.simulate.stats import Counters
from sdfleet.simulate.trace import TaskClass

Proc = Generator[simpy.Event, Any, None]


class Member:
    """One ready replica in the pool: what a pod starts, drains and kills."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.done = pool.env.event()
        self.serving_from = 0.0
        """When it has loaded the models it serves."""
        self.member = False

    def start(self) -> None:
        self.pool.join(self)

    def drain(self) -> None:
        if self.member:
            self.member = False
            self.pool.members.remove(self)
            # what it had received ahead of its GPU is released, to be received again
            self.pool.q.redelivered += min(self.pool.ahead(), self.pool.q.visible)
            self.pool.env.process(self._exit(self.pool.last_call_s))

    def kill(self) -> None:
        if self.done.triggered:
            return
        if self.member:
            self.pool.lose_share()
            self.member = False
            self.pool.members.remove(self)
        self.done.succeed()

    def _exit(self, after: float) -> Proc:
        yield self.pool.env.timeout(after)
        if not self.done.triggered:
            self.done.succeed()


class Pool:
    def __init__(
        self,
        env: simpy.Environment,
        queue: SimQueue,
        p: AgentParams,
        classes: list[TaskClass],
        run_seconds: Callable[[int, int], float],
        record: Callable[[int, float, float, float, float], None],
        counters: Counters,
        dt: float,
        cache_size: int,
        models: set[str | None],
        initial: str | None,
    ) -> None:
        self.env, self.q, self.p, self.classes = env, queue, p, classes
        self.run_seconds, self.record, self.counters = run_seconds, record, counters
        self.dt, self.cache_size = dt, cache_size
        self.models = len(models)
        """Distinct models routed to this queue."""
        self.preloaded = 1 if initial in models else 0
        """The pods load the queue's first model (``model`` or the fleet's default) at start."""
        self.first_switch = initial is not None and initial not in models
        """... which is not one this queue serves: each replica switches away from it once."""
        self.members: list[Member] = []
        self._loading: list[Member] = []
        """Members still loading their models (not serving for the whole step)."""
        self.in_service: list[tuple[float, int, Cohort]] = []
        self._seq = itertools.count()
        self.debt = 0.0
        self.last_call_s = 1.0
        self.per_task_s: float | None = None
        """GPU seconds per request of the last call served (``ahead``)."""
        self.busy = 0.0
        """Share of the last step's GPU time used."""

        self.mix: dict[str | None, float] = {}
        """Recent share of each model among the requests served (a moving average over about a
        minute): consecutive requests on one replica differ with probability 1 − Σ share²."""
        self._served_ahead = (0.0, 0)
        """(middle, requests) of the current arrival bin served already."""
        queue.adjust = self._adjust
        env.process(self._tick())

    def _adjust(self, with_in_flight: bool) -> int:
        self._ack()
        now = self.env.now
        # the current bin's cohorts (put at its start, placed at its middle) are partly still to come
        mid, n = self._served_ahead if self._served_ahead[0] > now else (0.0, 0)
        for d in self.q.by_class:
            if d and d[-1].t > now:
                mid, n = d[-1].t, n + d[-1].n
        unarrived = round(n * min(1.0, max(0.0, (mid + self.dt / 2 - now) / self.dt))) if n else 0
        ahead = 0 if with_in_flight else len(self.members) * self.ahead()
        return unarrived + ahead

    def ahead(self) -> int:
        """Requests each replica holds received ahead of its GPU."""
        return self.p.ahead(self.per_task_s)

    def join(self, member: Member) -> None:
        """A new replica loads the models it will serve (the pod loaded its first already)."""
        self.members.append(member)
        member.member = True
        loads = max(0, min(self.cache_size, self.models) - self.preloaded)
        if self.first_switch and self.models:
            self.counters.add(self.q.name, "switches")
        member.serving_from = self.env.now + self.p.model_load_s * loads
        if loads and self.p.model_load_s > 0:
            self._loading.append(member)

    def _capacity(self) -> tuple[float, int]:
        """GPU-seconds the members can give in this step, and how many serve from its start."""
        now, end = self.env.now, self.env.now + self.dt
        self._loading = [m for m in self._loading if m.serving_from > now and m.member]
        serving = len(self.members) - len(self._loading)
        seconds = serving * self.dt + sum(max(0.0, end - m.serving_from) for m in self._loading)
        return seconds, serving

    def _tick(self) -> Proc:
        # Just after the bin's arrivals are put (at the start of each bin), serve them.
        yield self.env.timeout(self.dt * 1e-6)
        while True:
            self._ack()
            self._served_ahead = (0.0, 0)
            if self.members and self.q.visible:
                self._serve(*self._capacity())

            elif not self.members:
                self.debt = 0.0
            yield self.env.timeout(self.dt)

    def _ack(self) -> None:
        while self.in_service and self.in_service[0][0] <= self.env.now:
            _, _, c = heapq.heappop(self.in_service)
            self.q.ack(c.n)
            self.counters.add(self.q.name, "completed", c.n)

    def _call(self, cls: int, replicas: int) -> tuple[int, float, float]:
        """(batch, runtime call seconds, cycle seconds) for a class at this backlog."""
        batch = max(1, min(self.p.max_batch, math.ceil(self.q.visible_by_class[cls] / replicas)))
        run = self.run_seconds(cls, batch) + self.p.run_overhead_s
        if self.p.finish_concurrency == 0:
            return batch, run, run + batch * self.p.finish_s
        return batch, run, max(run, batch * self.p.finish_s / self.p.finish_concurrency)

    def _finish(self, batch: int) -> float:
        if self.p.finish_concurrency == 0:
            return (batch + 1) / 2 * self.p.finish_s
        return self.p.finish_s

    def _serve(self, seconds: float, serving: int) -> None:
        replicas = max(1, serving)
        now, budget = self.env.now, seconds - self.debt

        used, calls = 0.0, 0.0
        models: Counter[str | None] = Counter()
        calls_cache: dict[int, tuple[int, float, float]] = {}
        while used < budget and self.q.visible:
            head = self.q.oldest()
            assert head is not None
            if head.cls not in calls_cache:
                calls_cache[head.cls] = self._call(head.cls, replicas)
            batch, run, cycle = calls_cache[head.cls]
            per = cycle / batch
            k = min(head.n, max(1, int((budget - used) / per)))
            for g in self.q.take(k):
                # the bin's requests arrive over it: served on arrival while there is room
                start = max(now + (used + g.n * per / 2) / replicas, g.t)
                if self.q.too_late(g, start):  # its ttl_s ran out while it waited in an agent
                    self.q.expire([g])
                    continue
                wait = max(self.p.receive_s, start - g.t)
                e2e = wait + run + self._finish(batch)
                # with prefetch, a busy replica's receiver takes its share of the requests, which
                # then wait for the call it is running (half of one, on average)
                ahead = self.busy if self.p.prefetch else 0.0
                self.record(g.cls, wait, -1.0, g.n * (1 - ahead), start)
                self.record(g.cls, -1.0, e2e, g.n * (1 - ahead), start + run)
                if ahead:
                    self.record(g.cls, wait + cycle / 2, -1.0, g.n * ahead, start + cycle / 2)
                    self.record(g.cls, -1.0, e2e + cycle / 2, g.n * ahead, start + run + cycle / 2)

                heapq.heappush(self.in_service, (start + run + self._finish(batch), next(self._seq), g))
                if g.t > now:
                    self._served_ahead = (g.t, self._served_ahead[1] + g.n)
                used += g.n * per
                calls += g.n / batch
                models[self.classes[g.cls].model] += g.n
            self.last_call_s = cycle
            self.per_task_s = per
        self.counters.add(self.q.name, "gpu_busy_s", used)
        self.busy = min(1.0, used / seconds) if seconds > 0 else 0.0

        self.debt = max(0.0, used - budget) + self._switch_time(models, calls, replicas)

    def _switch_time(self, models: Counter[str | None], calls: float, replicas: int) -> float:
        total = sum(models.values())
        if not total:
            return 0.0
        keep = math.exp(-self.dt / 60.0)
        for m in set(self.mix) | set(models):
            self.mix[m] = self.mix.get(m, 0.0) * keep + (1 - keep) * models.get(m, 0) / total
        norm = sum(self.mix.values())
        live = [v / norm for v in self.mix.values() if v / norm > 1e-3]
        if len(live) < 2:
            return 0.0
        switches = calls * (1 - sum(v * v for v in live))
        if self.p.model_aware:
            bound = replicas * (len(live) - 1) * self.dt / max(self.p.pass_over_s, self.dt)
            switches = min(switches, bound)
        self.counters.add(self.q.name, "switches", switches)
        cost = self.p.switch_cached_s if len(live) <= self.cache_size else self.p.model_load_s
        return switches * cost

    def lose_share(self) -> None:
        """A replica's node is gone: its share of the requests in service, and what it had
        received ahead, come back after their lease."""
        share = 1 / max(1, len(self.members))
        lost: list[Cohort] = []
        keep: list[tuple[float, int, Cohort]] = []
        for end, seq, c in self.in_service:
            k = round(c.n * share)
            if k >= c.n:
                lost.append(c)
                continue
            if k > 0:
                lost.append(c.split(k))
            keep.append((end, seq, c))
        heapq.heapify(keep)
        self.in_service = keep
        lost += self.q.take(self.ahead())
        self.counters.add(self.q.name, "lost", sum(c.n for c in lost))
        self.q.lose(lost)
