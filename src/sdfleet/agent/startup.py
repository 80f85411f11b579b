"""An agent's start: its runtime started (a stop may come first), and its pod's deletion cost."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sdfleet.agent.parts import Parts
from sdfleet.errors import ConfigError, Reject
from sdfleet.pod_cost import PodDeletionCost, PodRef

log = logging.getLogger(__name__)


async def start_runtime(parts: Parts, stopping: asyncio.Event) -> bool:
    """Start the runtime; False when a stop came first. A server runtime waits for its server
    (up to ``ready_timeout_s``, minutes): SIGTERM in that time ends the agent at once, with
    nothing received and nothing to drain."""
    start = asyncio.create_task(parts.runtime.start(), name="runtime-start")
    stopped = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            log.info("stopped before the runtime was ready")
    if start.cancelled():
        return False
    try:
        start.result()  # its error, if it failed
    except Reject as e:  # the queue's own model is not there: nothing this agent can serve
        raise ConfigError(f"queue {parts.queue.name}: {e.reason}") from e
    return True


def deletion_cost(parts: Parts) -> PodDeletionCost | None:
    """The pod's deletion cost to keep (``agent.pod_deletion_cost``), None when off or not in a pod."""
    if not parts.settings.pod_deletion_cost:
        return None
    pod = PodRef.in_cluster()
    if pod is None:
        log.warning("agent.pod_deletion_cost: not in a pod (needs POD_NAME and a service account token)")
        return None
    return PodDeletionCost(pod)
