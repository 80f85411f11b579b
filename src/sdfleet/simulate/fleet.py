"""A queue's worker Deployment: pods that get a node, start, serve, drain on SIGTERM.

A pod is *pending* until Karpenter binds it to a node, *starting* until its node is Ready, the
worker image pulled (fresh nodes only), the container started and the first model loaded (a cold
start), then *ready* (its agent serves), and *terminating* after SIGTERM until its agent has
drained or the grace period ends (then it is killed). Scale-in removes pending pods first, then
starting ones, then the newest ready ones, as a ReplicaSet does; an evicted pod (spot notice) is
replaced at once.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

import simpy

from sdfleet.simulate.cluster import Cluster, Node
from sdfleet.simulate.params import NodeParams
from sdfleet.simulate.stats import Counters, Hist

Proc = Generator[simpy.Event, Any, None]
_RANK = {"pending": 0, "starting": 1, "ready": 2}


class Agent(Protocol):
    """A pod's agent: ``agent.Replica`` (exact mode) or ``pool.Member`` (aggregate mode)."""

    done: simpy.Event

    def start(self) -> None: ...
    def drain(self) -> None: ...
    def kill(self) -> None: ...


class Pod:
    def __init__(self, dep: Deployment) -> None:
        self.dep, self.env = dep, dep.env
        self.created = self.env.now
        self.state = "pending"
        self.node: Node | None = None
        self.replica: Agent | None = None
        self.ready_at: float | None = None
        self.proc = self.env.process(self._life())

    def _life(self) -> Proc:
        p = self.dep.nodes
        try:
            self.node = yield self.dep.cluster.place(self)
            self.state = "starting"
            yield self.node.ready
            pull = 0.0 if self.node.image else p.image_pull_s
            self.node.image = True
            yield self.env.timeout(pull + self.dep.start_s() + self.dep.first_load_s)

            self.replica = self.dep.make_agent()
            self.replica.start()
            self.state, self.ready_at = "ready", self.env.now
            self.dep.started(self)
            yield self.replica.done
        except simpy.Interrupt:
            pass
        self.state = "gone"
        self.dep.cluster.unplace(self, self.node)
        self.dep.gone(self)

    def terminate(self) -> None:
        """SIGTERM (scale-in or eviction)."""
        if self.state in ("pending", "starting"):
            self.state = "terminating"
            if self.proc.is_alive:
                self.proc.interrupt("terminate")
        elif self.state == "ready" and self.replica is not None:
            self.state = "terminating"
            self.replica.drain()
            self.env.process(self._grace(self.replica))

    def _grace(self, replica: Agent) -> Proc:
        yield replica.done | self.env.timeout(self.dep.nodes.termination_grace_s)
        replica.kill()

    def evict(self) -> None:
        self.terminate()
        self.dep.reconcile()

    def node_gone(self) -> None:
        if self.replica is not None:
            self.replica.kill()
        elif self.proc.is_alive:
            self.proc.interrupt("node gone")


class Deployment:
    def __init__(
        self,
        env: simpy.Environment,
        queue: str,
        cluster: Cluster,
        nodes: NodeParams,
        make_agent: Callable[[], Agent],
        first_load_s: float,
        counters: Counters,
    ) -> None:
        self.env, self.queue, self.cluster, self.nodes = env, queue, cluster, nodes
        self.make_agent, self.first_load_s, self.counters = make_agent, first_load_s, counters
        self.pods: list[Pod] = []
        self.desired = 0
        self.peak = 0
        self.cold_start = Hist()
        self._ready_s = 0.0
        self._starts = 0

    def start_s(self) -> float:
        """The next pod's container start (a measured sample while there are any)."""
        self._starts += 1
        samples = self.nodes.pod_start_samples
        return samples[self._starts - 1] if self._starts <= len(samples) else self.nodes.pod_start_s

    def live(self) -> list[Pod]:

        return [p for p in self.pods if p.state in _RANK]

    def ready(self) -> int:
        return sum(1 for p in self.pods if p.state == "ready")

    def scale(self, n: int) -> None:
        if n != self.desired:
            self.desired = n
            self.reconcile()

    def reconcile(self) -> None:
        live = self.live()
        for _ in range(self.desired - len(live)):
            self.pods.append(Pod(self))
        extra = len(live) - self.desired
        if extra > 0:
            for pod in sorted(live, key=lambda p: (_RANK[p.state], -p.created))[:extra]:
                pod.terminate()
        self.peak = max(self.peak, len(self.live()))

    def started(self, pod: Pod) -> None:
        self.counters.add(self.queue, "cold_starts")
        self.cold_start.add(self.env.now - pod.created)

    def gone(self, pod: Pod) -> None:
        if pod.ready_at is not None:
            self._ready_s += self.env.now - pod.ready_at
        self.pods.remove(pod)

    def ready_seconds(self) -> float:
        """Replica-seconds served so far (pods still up counted to now)."""
        return self._ready_s + sum(self.env.now - p.ready_at for p in self.pods if p.ready_at is not None)
