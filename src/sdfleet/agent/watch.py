"""Watches beside a task's stages: its delivery's lease heartbeat, and cancels of running tasks.

A cancel is written by the API into the task's record; the agent reads the records of the tasks
that have been running for ``check_s`` or more, every ``check_s``, so a cancelled task is
interrupted within about two ``check_s`` whatever the lease is, and a task shorter than that costs
no read at all. The same read tells a task another agent took over (this agent's lease on it
lapsed, say while its event loop stalled): that run is interrupted too, so two agents run one task
at once for about ``check_s`` past the stall, not to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.records import elsewhere
from sdfleet.errors import SdfleetError
from sdfleet.tasks import TaskRecord, TaskState

log = logging.getLogger(__name__)


class Lease:
    """Extends a delivery's lease every ``period`` seconds until it is settled."""

    def __init__(self, handle: DeliveryHandle, lease_s: float, period: float) -> None:
        self.handle, self.lease_s, self.period = handle, lease_s, period
        self._task = asyncio.create_task(self._beat(), name=f"lease-{handle.delivery.message_id}")

    async def _beat(self) -> None:
        while not self.handle.settled:
            await asyncio.sleep(self.period)
            try:
                await self.handle.extend(self.lease_s)
            except SdfleetError as e:
                log.warning("lease heartbeat for %s failed: %s", self.handle.delivery.message_id, e)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def watch_cancels(
    parts: Parts, running: Callable[[], Collection[Prepared]], check_s: float, stop: asyncio.Event
) -> None:
    """Interrupt running tasks whose record says ``cancelled``, until ``stop`` is set."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=check_s / 2)
        now = time.monotonic()
        due = [p for p in running() if not (p.cancelled or p.taken_over) and _due(p, now, check_s)]
        for p in due:
            p.cancel_checked = now
            try:
                record = await parts.store.get(p.task.tenant, p.task.id)
            except SdfleetError as e:
                log.debug("cancel check of %s failed: %s", p.task.id, e)
                continue
            if record is not None and record.state is TaskState.CANCELLED:
                log.info("task %s cancelled: interrupting it", p.task.id)
                p.cancelled = True
                await parts.runtime.interrupt(p.task.id)
            elif record is not None and _taken_over(parts, p, record):
                log.warning(
                    "task %s taken over by %s after this agent's lease on it lapsed: interrupting it",
                    p.task.id,
                    record.worker,
                )
                p.taken_over = record.worker
                await parts.runtime.interrupt(p.task.id)


def _due(p: Prepared, now: float, check_s: float) -> bool:
    if p.run_started is None or now - p.run_started < check_s:
        return False
    return p.cancel_checked is None or now - p.cancel_checked >= check_s


def _taken_over(parts: Parts, p: Prepared, record: TaskRecord) -> bool:
    """The record says another agent runs the task, and this agent's own start was written
    (before that, it may still show the agent this one takes over from)."""
    mine = p.record is not None and p.record.state is TaskState.RUNNING and p.record.worker == parts.worker_id
    return mine and elsewhere(record, parts)
