"""KEDA's scaling rule for a queue, as documented, in plain code (no simulation engine).

Two loops own a ScaledObject's replica count (https://keda.sh/docs/2.17/concepts/scaling-deployments/):

- **KEDA's activation loop**, every ``pollingInterval``: the trigger is *active* when the metric is
  greater than the activation value (always, when ``minReplicaCount`` ≥ 1). Active at 0 replicas →
  scale to ``max(1, minReplicaCount)``; inactive at > 0 replicas with ``minReplicaCount`` 0 →
  scale to 0 once ``cooldownPeriod`` has passed since the trigger was last active.
- **The HPA** (1 ↔ N), every ``--horizontal-pod-autoscaler-sync-period``: KEDA serves the metric
  with an ``AverageValue`` target (the queue length per replica), so
  ``desiredReplicas = ceil(currentReplicas × (metric / currentReplicas) / target) = ceil(metric / target)``,
  unchanged while the ratio is within the tolerance (0.1); then the stabilisation windows (the
  lowest recent recommendation when scaling up, the highest when scaling down), the scaling
  policies (Pods / Percent per period, Max or Min), and ``[max(1, min), max]``
  (https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/).

The simulator and the calibration driver both call ``Autoscaler``, so they scale alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from sdfleet.simulate.params import KedaParams, Policy, Rules

# Kubernetes' defaults when a behaviour names no policy.
DEFAULT_UP = [Policy(type="Percent", value=100, period_s=15), Policy(type="Pods", value=4, period_s=15)]
DEFAULT_DOWN = [Policy(type="Percent", value=100, period_s=15)]


def hpa_desired(metric: float, current: int, target: float, tolerance: float = 0.1) -> int:
    """The HPA formula for an ``AverageValue`` target: ``ceil(metric / target)``, or ``current``
    while ``metric / (target × current)`` is within ``tolerance`` of 1."""
    if current > 0 and abs(metric / (target * current) - 1.0) <= tolerance:
        return current
    return math.ceil(metric / target - 1e-9)


def _changed(events: list[tuple[float, int]], now: float, period_s: float) -> int:
    return sum(change for t, change in events if t > now - period_s)


class Autoscaler:
    """One ScaledObject with its HPA. ``replicas`` is the count it last set."""

    def __init__(self, p: KedaParams, *, min_replicas: int, max_replicas: int, target: float) -> None:
        self.p = p
        self.min, self.max, self.target = min_replicas, max_replicas, target
        self.replicas = min_replicas  # KEDA sets minReplicaCount when the ScaledObject is created
        self.last_active: float | None = None
        self._recommendations: list[tuple[float, int]] = []
        self._up: list[tuple[float, int]] = []
        self._down: list[tuple[float, int]] = []

    @property
    def hpa_min(self) -> int:
        return max(1, self.min)

    def active(self, metric: float) -> bool:
        return self.min >= 1 or metric > self.p.activation

    def poll(self, now: float, metric: float) -> int:
        """KEDA's activation loop (every ``polling_s``): 0 → 1 and, after the cooldown, → 0."""
        if self.active(metric):
            self.last_active = now
            if self.replicas == 0:
                self.replicas = self.hpa_min
        elif self.replicas > 0 and self.min == 0:
            if self.last_active is None or now - self.last_active >= self.p.cooldown_s:
                self.replicas = 0
        return self.replicas

    def sync(self, now: float, metric: float) -> int:
        """One HPA sync (every ``hpa_sync_s``); does nothing at 0 replicas (KEDA's part)."""
        if self.replicas == 0:
            return 0
        desired = hpa_desired(metric, self.replicas, self.target, self.p.tolerance)
        stabilized = self._stabilize(now, desired)
        final = self._limit(now, stabilized)
        if final > self.replicas:
            self._up.append((now, final - self.replicas))
        elif final < self.replicas:
            self._down.append((now, self.replicas - final))
        horizon = max(
            (p.period_s for p in (*self.p.scale_up.policies, *self.p.scale_down.policies)), default=15
        )
        self._up = [e for e in self._up if e[0] > now - max(horizon, 15)]
        self._down = [e for e in self._down if e[0] > now - max(horizon, 15)]
        self.replicas = final
        return final

    def _stabilize(self, now: float, desired: int) -> int:
        up_cut, down_cut = now - self.p.scale_up.stabilization_s, now - self.p.scale_down.stabilization_s
        up_rec = down_rec = desired
        for t, r in self._recommendations:
            if t > up_cut:
                up_rec = min(up_rec, r)
            if t > down_cut:
                down_rec = max(down_rec, r)
        keep = max(self.p.scale_up.stabilization_s, self.p.scale_down.stabilization_s)
        self._recommendations = [(t, r) for t, r in self._recommendations if t > now - keep]
        self._recommendations.append((now, desired))
        return min(max(self.replicas, up_rec), down_rec)

    def _limit(self, now: float, desired: int) -> int:
        current = self.replicas
        if desired > current:
            allowed = max(current, self._rate_limit(now, self.p.scale_up, DEFAULT_UP, up=True))
            return min(desired, min(self.max, allowed))
        if desired < current:
            allowed = min(current, self._rate_limit(now, self.p.scale_down, DEFAULT_DOWN, up=False))
            return max(desired, max(self.hpa_min, allowed))
        return min(max(desired, self.hpa_min), self.max)

    def _rate_limit(self, now: float, rules: Rules, default: list[Policy], *, up: bool) -> int:
        """The most (scale up) or fewest (scale down) replicas the policies allow now."""
        if rules.select == "Disabled":
            return self.replicas
        # "Max" picks the policy allowing the largest change: the highest limit up, the lowest down.
        pick: Callable[[int, int], int] = max if (rules.select == "Max") == up else min
        result: int | None = None
        for policy in rules.policies or default:
            start = (
                self.replicas
                - _changed(self._up, now, policy.period_s)
                + _changed(self._down, now, policy.period_s)
            )
            if policy.type == "Pods":
                proposed = start + policy.value if up else start - policy.value
            elif up:
                proposed = math.ceil(start * (1 + policy.value / 100))
            else:
                proposed = int(start * (1 - policy.value / 100))
            result = proposed if result is None else pick(result, proposed)
        return self.replicas if result is None else result
