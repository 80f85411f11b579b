"""Karpenter's GPU nodes: batching pending pods, spot first, on-demand fallback, consolidation,
spot interruptions (https://karpenter.sh/docs/concepts/disruption/#interruption).

Pending pods are batched (``batch_idle_s`` without a new one, at most ``batch_max_s``), then one
node per ``gpus_per_node`` pods is launched: spot while the spot pool can be had (``spot_max_nodes``,
``shortages``), else on-demand after ``fallback_delay_s`` if the fallback pool exists. A node is
Ready ``launch_s`` later. An empty node is removed after ``consolidate_after_s``. A spot node is
interrupted after an exponential time (``interruptions_per_node_hour``): Karpenter cordons and
drains it at the notice, whose evicted pods are replaced at once (a new node is launched for
them), and the instance is gone ``notice_s`` later. Billing runs from launch to removal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import simpy

from sdfleet.simulate.params import NodeParams
from sdfleet.simulate.pricing import GpuPrice
from sdfleet.simulate.stats import Counters

Proc = Generator[simpy.Event, Any, None]


class PodLike(Protocol):
    def evict(self) -> None: ...
    def node_gone(self) -> None: ...


@dataclass(eq=False)
class Node:
    id: int
    capacity: str
    gpus: int
    launched_at: float
    ready: simpy.Event
    pods: list[PodLike] = field(default_factory=list)
    image: bool = False
    cordoned: bool = False
    gone_at: float | None = None
    empty_since: float | None = None

    @property
    def free(self) -> int:
        return self.gpus - len(self.pods)


class Cluster:
    def __init__(
        self, env: simpy.Environment, p: NodeParams, price: GpuPrice, counters: Counters, seed: int = 0
    ) -> None:
        self.env, self.p, self.price, self.counters = env, p, price, counters
        self.rng = random.Random(seed)
        self.nodes: list[Node] = []
        """Every node launched (removed ones too, with ``gone_at``)."""
        self._up: dict[int, Node] = {}
        self._open: dict[int, Node] = {}
        """Up, not cordoned, with a free GPU."""
        self.pending: list[tuple[PodLike, simpy.Event]] = []
        self._kick = env.event()
        self._last_pending = 0.0
        if p.enabled:
            env.process(self._provision())

    def live(self, capacity: str | None = None) -> list[Node]:
        return [n for n in self._up.values() if capacity is None or n.capacity == capacity]

    def _refresh(self, node: Node) -> None:
        if node.gone_at is None and not node.cordoned and node.free > 0:
            self._open[node.id] = node
        else:
            self._open.pop(node.id, None)

    def _bind(self, node: Node, pod: PodLike) -> None:
        node.pods.append(pod)
        node.empty_since = None
        self._refresh(node)

    def place(self, pod: PodLike) -> simpy.Event:
        """An event whose value is the node ``pod`` is bound to (it may still be launching)."""
        ev = self.env.event()
        if not self.p.enabled:
            instant = self._launch("on-demand", instant=True)
            self._bind(instant, pod)
            return ev.succeed(instant)
        node = next(iter(self._open.values()), None)
        if node is not None:
            self._bind(node, pod)
            return ev.succeed(node)
        self.pending.append((pod, ev))
        self._last_pending = self.env.now
        if not self._kick.triggered:
            self._kick.succeed()
        return ev

    def unplace(self, pod: PodLike, node: Node | None) -> None:
        self.pending = [(p, e) for p, e in self.pending if p is not pod]
        if node is None:  # bound while its pod was being stopped
            node = next((n for n in self._up.values() if pod in n.pods), None)
        if node is None or pod not in node.pods:
            return
        node.pods.remove(pod)
        self._refresh(node)
        if not node.pods and node.gone_at is None:
            if not self.p.enabled:
                self._remove(node)
            else:
                node.empty_since = self.env.now
                self.env.process(self._consolidate(node))

    # -- provisioning -------------------------------------------------------------------

    def _provision(self) -> Proc:
        while True:
            yield self._kick
            self._kick = self.env.event()
            first = self.env.now
            while True:
                idle_left = self.p.batch_idle_s - (self.env.now - self._last_pending)
                max_left = self.p.batch_max_s - (self.env.now - first)
                if idle_left <= 0 or max_left <= 0:
                    break
                yield self.env.timeout(min(idle_left, max_left))
            yield from self._launch_for_pending()

    def _launch_for_pending(self) -> Proc:
        while self.pending:
            capacity = self._capacity()
            if capacity is None:  # nothing to be had: Karpenter retries
                yield self.env.timeout(max(self.p.batch_max_s, 10.0))
                continue
            if capacity == "on-demand" and self.p.spot:
                self.counters.add("_cluster", "spot_fallbacks")
                yield self.env.timeout(self.p.fallback_delay_s)
                if not self.pending:
                    return
            node = self._launch(capacity)
            while self.pending and node.free > 0:
                pod, ev = self.pending.pop(0)
                self._bind(node, pod)
                ev.succeed(node)

    def _capacity(self) -> str | None:
        if self.p.spot and len(self.live("spot")) < self._spot_limit():
            return "spot"
        return "on-demand" if self.p.on_demand_fallback or not self.p.spot else None

    def _spot_limit(self) -> float:
        now = self.env.now
        limits = [s.max_nodes for s in self.p.shortages if s.start_s <= now < s.end_s]
        if self.p.spot_max_nodes is not None:
            limits.append(self.p.spot_max_nodes)
        return min(limits) if limits else math.inf

    def _launch(self, capacity: str, *, instant: bool = False) -> Node:
        gpus = 1 if instant else self.p.gpus_per_node
        node = Node(len(self.nodes), capacity, gpus, self.env.now, self.env.event(), image=instant)
        self.nodes.append(node)
        self._up[node.id] = node
        self._refresh(node)
        self.counters.add("_cluster", f"launched_{capacity}")
        if instant:
            node.ready.succeed()
        else:
            self.env.process(self._boot(node))
        return node

    def _boot(self, node: Node) -> Proc:
        yield self.env.timeout(self.p.launch_s)
        if node.gone_at is not None:
            return
        node.ready.succeed()
        if node.capacity == "spot" and self.p.interruptions_per_node_hour > 0:
            self.env.process(self._interruption(node))
        if not node.pods:
            node.empty_since = self.env.now
            self.env.process(self._consolidate(node))

    # -- disruption ---------------------------------------------------------------------

    def _interruption(self, node: Node) -> Proc:
        yield self.env.timeout(self.rng.expovariate(self.p.interruptions_per_node_hour / 3600))
        if node.gone_at is not None:
            return
        self.counters.add("_cluster", "interruptions")
        node.cordoned = True
        self._refresh(node)
        for pod in list(node.pods):
            pod.evict()
        yield self.env.timeout(self.p.notice_s)
        if node.gone_at is None:
            for pod in list(node.pods):
                pod.node_gone()
            self._remove(node)

    def _consolidate(self, node: Node) -> Proc:
        yield self.env.timeout(self.p.consolidate_after_s)
        since = node.empty_since
        if (
            since is not None
            and node.gone_at is None
            and self.env.now - since >= self.p.consolidate_after_s - 1e-9
        ):
            self._remove(node)

    def _remove(self, node: Node) -> None:
        node.gone_at = self.env.now
        node.pods.clear()
        self._up.pop(node.id, None)
        self._open.pop(node.id, None)
        self._bill(node, self.env.now)

    def _bill(self, node: Node, until: float) -> None:
        hours = (until - node.launched_at) / 3600 * node.gpus
        rate = self.price.spot_price if node.capacity == "spot" else self.price.on_demand
        self.counters.add("_cluster", f"gpu_hours_{node.capacity}", hours)
        self.counters.add("_cluster", f"cost_{node.capacity}", hours * rate)

    def close(self) -> None:
        """Bill the nodes still up at the end of the simulation."""
        for node in self.live():
            self._bill(node, self.env.now)

    def gpus(self, capacity: str) -> int:
        return sum(n.gpus for n in self.live(capacity))

    def sample(self) -> dict[str, float]:
        return {
            "gpus_spot": float(self.gpus("spot")),
            "gpus_on_demand": float(self.gpus("on-demand")),
            "pods_pending": float(len(self.pending)),
        }
