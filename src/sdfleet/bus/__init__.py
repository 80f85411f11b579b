"""Bus backends, chosen by URL scheme (``sqlite://``, ``aws://``, ``redis://``)."""

from __future__ import annotations

from sdfleet.bus.base import Bus, Delivery, QueueSpec, QueueStats, Subscription, Topology, dlq_name
from sdfleet.registry import load_backend

_BACKENDS = {
    "sqlite": ("sdfleet.bus.backends.sqlite", "SqliteBus", None),
    "aws": ("sdfleet.bus.backends.aws", "AwsBus", "aws"),
    "redis": ("sdfleet.bus.backends.redis", "RedisBus", "redis"),
    "rediss": ("sdfleet.bus.backends.redis", "RedisBus", "redis"),
}


def open_bus(url: str) -> Bus:
    """Build the bus for ``url``; raises ``ConfigError`` for an unknown scheme or missing extra."""
    bus: Bus = load_backend("bus", _BACKENDS, url)
    return bus


__all__ = ["Bus", "Delivery", "QueueSpec", "QueueStats", "Subscription", "Topology", "dlq_name", "open_bus"]
