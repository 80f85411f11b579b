"""Queue-depth gauges kept fresh in the background, so ``/metrics`` shows the backlog without anyone
calling ``GET /v1/queues`` (which refreshes them too)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sdfleet.api.background import beside
from sdfleet.bus.base import Bus
from sdfleet.errors import SdfleetError
from sdfleet.settings import FleetConfig
from sdfleet.telemetry import Metrics

log = logging.getLogger(__name__)


async def refresh_queue_gauges(bus: Bus, fleet: FleetConfig, metrics: Metrics) -> None:
    """Read every queue's stats from the bus into the queue gauges (one pass)."""
    for q in fleet.queues:
        metrics.set_queue(q.name, await bus.stats(q.name))


async def _refresh_forever(bus: Bus, fleet: FleetConfig, metrics: Metrics, period_s: float) -> None:
    while True:
        try:
            await refresh_queue_gauges(bus, fleet, metrics)
        except SdfleetError as e:  # an outage must not end the refresher: the next pass retries
            log.warning("queue stats not refreshed: %s", e)
        await asyncio.sleep(period_s)


@contextlib.asynccontextmanager
async def queue_stats_refresher(
    bus: Bus, fleet: FleetConfig, metrics: Metrics, period_s: float
) -> AsyncIterator[None]:
    """Refresh the queue gauges every ``period_s`` seconds while inside; 0 turns it off."""
    if period_s <= 0:
        yield
        return
    async with beside(_refresh_forever(bus, fleet, metrics, period_s), "queue-stats"):
        yield
