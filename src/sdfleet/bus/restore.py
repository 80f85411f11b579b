"""The fleet's topology again when the engine lost it while the fleet runs.

A Redis restarted without persistence (or flushed) comes back empty: no topics, queues or
subscriptions. The API's publish and an agent's receive then find them missing; rather than
answer 404s or exit, they create the topology once more where this process may (``ensure_topology``,
on by default; off where the CDK app or an operator owns it), and otherwise wait for someone to run
``sdfleet ensure``, as through any other outage. What the engine lost (queued tasks, records on the
same Redis) stays lost: a Redis that must keep tasks needs persistence (AOF).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sdfleet.bus.base import Bus, Topology
from sdfleet.errors import BusUnavailable, NotFound, SdfleetError

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 2.0
"""Creating the topology again at most this often per process (every caller finds it missing)."""


class TopologyKeeper:
    """Puts the fleet's topology back (``restore``) when a bus call finds part of it missing."""

    def __init__(self, bus: Bus, topology: Topology, *, allowed: bool) -> None:
        self.bus, self.topology, self.allowed = bus, topology, allowed
        self._lock = asyncio.Lock()
        self._last = float("-inf")
        self.restored = 0
        """Times this process created the topology again."""

    async def restore(self, missing: NotFound) -> None:
        """Create the topology again (once for a burst of callers). Raises ``BusUnavailable``
        when this process may not, or the engine refused: the caller treats it as an outage."""
        if not self.allowed:
            raise BusUnavailable(
                f"{missing.message}; run `sdfleet ensure` (ensure_topology is off here)"
            ) from missing
        async with self._lock:
            if time.monotonic() - self._last < MIN_INTERVAL_S:
                return  # another caller just did
            log.warning(
                "%s: the engine lost the fleet's topology (restarted empty?); creating it again", missing
            )
            try:
                await self.bus.ensure(self.topology)
            except SdfleetError as e:
                raise BusUnavailable(f"{missing.message}, and creating it again failed: {e}") from e
            self._last = time.monotonic()
            self.restored += 1
