"""``sdfleet ensure``: create or update the fleet's bus topology once, then exit.

What a Kubernetes Job (the chart's Helm hook, ``ensureJob``) runs before agents start, so that
neither the API nor the agents need create permissions or ``SDFLEET_ENSURE_TOPOLOGY``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer

from sdfleet.cli_common import ConfigOpt, _fail, _settings, console
from sdfleet.errors import BusUnavailable, SdfleetError
from sdfleet.routing import fleet_topology
from sdfleet.settings import Settings


async def ensure_topology(settings: Settings, *, wait_s: float = 0.0) -> list[str]:
    """Create or update the topics, queues, DLQs and subscriptions of ``settings.fleet``.

    While the engine is unreachable (``BusUnavailable``, e.g. Redis still starting) it retries
    for up to ``wait_s`` seconds. Returns the queue names ensured.
    """
    from sdfleet.bus import open_bus

    topology = fleet_topology(settings.fleet)
    deadline = time.monotonic() + wait_s
    while True:
        bus = open_bus(settings.bus)
        try:
            await bus.ensure(topology)
            return [q.name for q in topology.queues]
        except BusUnavailable:
            if time.monotonic() >= deadline:
                raise
        finally:
            await bus.aclose()
        await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def ensure(
    config: Path | None = ConfigOpt,
    wait: float = typer.Option(60.0, min=0, help="Retry this many seconds while the engine is unreachable."),
) -> None:
    """Create or update the bus topology of the fleet file (topics, queues, DLQs, subscriptions)."""
    settings = _settings(config)
    try:
        queues = asyncio.run(ensure_topology(settings, wait_s=wait))
    except SdfleetError as e:
        _fail(e)
        return
    console.print(f"topology ensured: {len(queues)} queues ({', '.join(queues)})")
