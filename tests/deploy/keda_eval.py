"""KEDA's scalers as KEDA computes them, for rendered triggers: the metric of each trigger, whether
the ScaledObject is active (scale from zero), and the replicas the HPA asks for (the largest over
triggers, ``ceil(metric / target)`` with AverageValue targets).

``redis-streams`` follows KEDA's ``redis_streams_scaler.go``: with a ``consumerGroup`` the scaler
counts ``lagCount`` (XINFO GROUPS lag) when set, else XPENDING, and ignores ``streamLength``;
without one it counts XLEN. ``activationLagCount`` gates activity in every mode. ``metrics-api``
GETs ``url`` and reads the JSON value at ``valueLocation`` (a dotted path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis


@dataclass(frozen=True)
class Reading:
    metric: float
    target: float
    activation: float

    @property
    def active(self) -> bool:
        return self.metric > self.activation

    @property
    def replicas(self) -> int:
        return math.ceil(self.metric / self.target)


def _redis_streams(meta: dict[str, str], client: redis.Redis) -> Reading:
    stream, group = meta["stream"], meta.get("consumerGroup", "")
    activation = float(meta.get("activationLagCount", "0"))
    if not group:
        return Reading(float(client.xlen(stream)), float(meta.get("streamLength", "5")), activation)
    if meta.get("lagCount"):
        groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)}  # type: ignore[union-attr]
        lag = groups[group]["lag"] if group in groups else client.xlen(stream)
        return Reading(float(lag or 0), float(meta["lagCount"]), activation)
    pending = client.xpending(stream, group)["pending"]  # type: ignore[index]
    return Reading(float(pending), float(meta.get("pendingEntriesCount", "5")), activation)


def _metrics_api(meta: dict[str, str], get: Callable[[str], Any]) -> Reading:
    value: Any = get(meta["url"])
    for key in meta["valueLocation"].split("."):
        value = value[key]
    return Reading(float(value), float(meta["targetValue"]), float(meta.get("activationTargetValue", "0")))


def evaluate(
    triggers: list[dict[str, Any]], client: redis.Redis, url_map: Callable[[str], str]
) -> list[Reading]:
    """One reading per trigger; ``url_map`` turns the in-cluster URL into one reachable here."""

    def get(url: str) -> Any:
        response = httpx.get(url_map(url), timeout=5)
        response.raise_for_status()
        return response.json()

    readings = []
    for t in triggers:
        if t["type"] == "redis-streams":
            readings.append(_redis_streams(t["metadata"], client))
        elif t["type"] == "metrics-api":
            readings.append(_metrics_api(t["metadata"], get))
        else:
            raise AssertionError(f"no evaluator for trigger type {t['type']}")
    return readings


def desired(readings: list[Reading]) -> int:
    """Replicas KEDA + the HPA converge to: 0 when no trigger is active, else the largest ask."""
    if not any(r.active for r in readings):
        return 0
    return max(1, *(r.replicas for r in readings))
