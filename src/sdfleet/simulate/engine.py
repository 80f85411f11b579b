"""The simulated fleet: arrivals → routing → queues ← agents, KEDA, Karpenter, on one simpy clock.

``simulate`` builds one ``SimQueue``, ``Deployment`` and ``Autoscaler`` per queue of the fleet
file, feeds the arrivals, samples the time series and runs to the horizon (the last arrival plus
``drain_after_s``). Nothing here sleeps: a day takes as long as its events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any

import simpy

from sdfleet.settings import FleetConfig, QueueConfig
from sdfleet.simulate.agent import AgentContext, Replica
from sdfleet.simulate.cluster import Cluster
from sdfleet.simulate.fleet import Agent, Deployment
from sdfleet.simulate.keda import Autoscaler
from sdfleet.simulate.params import AgentParams, KedaParams, SimParams
from sdfleet.simulate.perf import PerfTable, family_of
from sdfleet.simulate.pool import Member, Pool
from sdfleet.simulate.pricing import GpuPrice
from sdfleet.simulate.queue import Cohort, SimQueue
from sdfleet.simulate.route import Routes, route_classes
from sdfleet.simulate.stats import Counters, Hist, Series, Windows
from sdfleet.simulate.trace import Arrivals, TaskClass

Proc = Generator[simpy.Event, Any, None]


@dataclass
class QueueRun:
    name: str
    queue: SimQueue
    deployment: Deployment
    scaler: Autoscaler
    keda: KedaParams
    agent: AgentParams
    wait: dict[str, Hist]
    """Queue wait by tenant tier."""
    e2e: dict[str, Hist]
    windows: Windows
    """End to end over time."""


@dataclass
class Result:
    fleet: FleetConfig
    params: SimParams
    price: GpuPrice
    classes: list[TaskClass]
    routes: Routes
    arrived: int
    horizon_s: float
    resolution_s: float
    queues: dict[str, QueueRun]
    cluster: Cluster
    counters: Counters
    series: Series
    wall_s: float = 0.0


def run_seconds_for(
    fleet: FleetConfig, q: QueueConfig, params: SimParams, perf: PerfTable, classes: list[TaskClass]
) -> Callable[[int, int], float]:
    """(class, batch) → seconds of one runtime call on this queue's GPU (memoised)."""
    if q.runtime == "synthetic":  # the fleet file says how long it sleeps
        latency = float(fleet.runtimes.get("synthetic", {}).get("latency_s", 0.5))
        return lambda cls, batch: latency
    cache: dict[tuple[int, int], float] = {}

    def seconds(cls: int, batch: int) -> float:
        if (cls, batch) not in cache:
            c = classes[cls]
            family = family_of(c.model or fleet.models.default, params.models)
            cache[cls, batch] = perf.seconds(
                params.nodes.gpu, family, c.width, c.height, c.steps, batch * c.images
            )
        return cache[cls, batch]

    return seconds


class _Sim:
    def __init__(
        self,
        fleet: FleetConfig,
        arrivals: Arrivals,
        params: SimParams,
        perf: PerfTable,
        price: GpuPrice,
        dt: float,
    ) -> None:
        self.env = simpy.Environment()
        self.fleet, self.arrivals, self.params, self.dt = fleet, arrivals, params, dt
        self.counters = Counters()
        self.routes = route_classes(fleet, arrivals.classes)
        self.horizon = arrivals.end + params.drain_after_s
        self.series = Series(params.sample_s or max(1.0, self.horizon / 720))
        self.cluster = Cluster(self.env, params.nodes, price, self.counters, params.seed)
        self.queues = {q.name: self._queue(q, perf) for q in fleet.queues}

    def _queue(self, q: QueueConfig, perf: PerfTable) -> QueueRun:
        kp, ap = self.params.keda_for(q.name), self.params.agent_for(q.name)
        classes = self.arrivals.classes
        seconds = run_seconds_for(self.fleet, q, self.params, perf, classes)
        retry = self.fleet.retry
        sq = SimQueue(self.env, q.name, len(classes), retry.lease_s, retry.max_receives, ttl_s=q.ttl_s)
        scaler = Autoscaler(
            kp,
            min_replicas=kp.min_replicas if kp.min_replicas is not None else q.scaling.min,
            max_replicas=kp.max_replicas if kp.max_replicas is not None else q.scaling.max,
            target=kp.target_backlog if kp.target_backlog is not None else q.scaling.target_backlog,
        )
        initial = q.model or self.fleet.models.default
        wait: dict[str, Hist] = {}
        e2e: dict[str, Hist] = {}
        # latency percentiles per interval: coarser than the samples, so each holds enough requests
        windows = Windows(max(1.0, self.horizon / 120), self.horizon)
        record = self._recorder(wait, e2e, windows)
        cache = ap.cache_size or self.fleet.models.cache_size
        make_agent: Callable[[], Agent]
        if self.dt > 0:
            routed = {classes[i].model for i, qs in enumerate(self.routes.queues) if q.name in qs} - {None}
            pool = Pool(
                self.env,
                sq,
                ap,
                classes,
                seconds,
                record,
                self.counters,
                self.dt,
                cache,
                routed,
                initial,
            )
            make_agent = partial(Member, pool)
        else:
            ctx = AgentContext(self.env, sq, ap, classes, seconds, record, self.counters, initial, cache)
            make_agent = partial(Replica, ctx)
        first_load = ap.model_load_s if initial is not None else 0.0
        dep = Deployment(
            self.env, q.name, self.cluster, self.params.nodes, make_agent, first_load, self.counters
        )
        run = QueueRun(q.name, sq, dep, scaler, kp, ap, wait, e2e, windows)
        dep.scale(scaler.replicas)
        self.env.process(self._keda(run))
        self.env.process(self._hpa(run))
        return run

    def _recorder(
        self, wait: dict[str, Hist], e2e: dict[str, Hist], windows: Windows
    ) -> Callable[[int, float, float, float, float], None]:
        tiers = [c.tier for c in self.arrivals.classes]

        def record(cls: int, w: float, e: float, n: float, at: float) -> None:
            if w >= 0:
                hist = wait.get(tiers[cls])
                if hist is None:
                    hist = wait[tiers[cls]] = Hist()
                hist.add(w, n)
            if e >= 0:
                hist = e2e.get(tiers[cls])
                if hist is None:
                    hist = e2e[tiers[cls]] = Hist()
                hist.add(e, n)
                windows.add(at, e, n)

        return record

    def _keda(self, run: QueueRun) -> Proc:
        while True:
            metric = run.queue.metric(run.keda.scale_on_in_flight)
            run.deployment.scale(run.scaler.poll(self.env.now, metric))
            yield self.env.timeout(run.keda.polling_s)

    def _hpa(self, run: QueueRun) -> Proc:
        while True:
            yield self.env.timeout(run.keda.hpa_sync_s)
            metric = run.queue.metric(run.keda.scale_on_in_flight)
            run.deployment.scale(run.scaler.sync(self.env.now, metric))

    def _arrive(self) -> Proc:
        a = self.arrivals
        t, cls, n = a.t.tolist(), a.cls.tolist(), a.n.tolist()
        routes = self.routes.queues
        early = self.dt / 2  # aggregate mode: a bin's cohort (at its middle) is put at its start
        i = 0
        while i < len(t):
            if t[i] - early > self.env.now:
                yield self.env.timeout(t[i] - early - self.env.now)
            while i < len(t) and t[i] - early <= self.env.now:
                targets = routes[cls[i]]
                for name in targets:
                    self.queues[name].queue.put(Cohort(t[i], n[i], cls[i]))
                    self.counters.add(name, "arrived", n[i])
                if not targets:
                    self.counters.add("_refused", "no_route", n[i])
                i += 1

    def _sample(self) -> Proc:
        while True:
            row = self.cluster.sample()
            for name, run in self.queues.items():
                run.queue.settle()
                row[f"{name}.visible"] = float(run.queue.visible)

                row[f"{name}.in_flight"] = float(run.queue.in_flight)
                row[f"{name}.desired"] = float(run.scaler.replicas)
                row[f"{name}.ready"] = float(run.deployment.ready())
            self.series.sample(self.env.now, row)
            yield self.env.timeout(self.series.step_s)

    def _settled(self) -> bool:
        """Nothing left to do: queues empty, every queue at its minimum, no node waiting to go."""
        for run in self.queues.values():
            run.queue.settle()
            if run.queue.visible or run.queue.in_flight or run.scaler.replicas != run.scaler.min:
                return False
            if any(p.state != "ready" for p in run.deployment.pods):
                return False
        return not self.cluster.pending and all(n.pods for n in self.cluster.live())

    def _watch(self, done: simpy.Event) -> Proc:
        """End the run once the last arrival is in and the fleet has settled (or at the horizon)."""
        yield self.env.timeout(self.arrivals.end)
        while self.env.now < self.horizon and not self._settled():
            yield self.env.timeout(self.series.step_s)
        done.succeed()

    def run(self) -> None:
        done = self.env.event()
        self.env.process(self._arrive())
        self.env.process(self._sample())
        self.env.process(self._watch(done))
        self.env.run(until=done)
        self.horizon = self.env.now
        self.cluster.close()


def simulate(
    fleet: FleetConfig, arrivals: Arrivals, params: SimParams, *, perf: PerfTable, price: GpuPrice, dt: float
) -> Result:
    """Run the fleet on ``arrivals`` (binned ``dt`` wide; 0: exact) to the horizon."""
    began = time.perf_counter()
    sim = _Sim(fleet, arrivals, params, perf, price, dt)
    sim.run()
    return Result(
        fleet=fleet,
        params=params,
        price=price,
        classes=arrivals.classes,
        routes=sim.routes,
        arrived=arrivals.total,
        horizon_s=sim.horizon,
        resolution_s=dt,
        queues=sim.queues,
        cluster=sim.cluster,
        counters=sim.counters,
        series=sim.series,
        wall_s=time.perf_counter() - began,
    )
