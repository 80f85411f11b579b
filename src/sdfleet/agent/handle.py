"""One delivery's settlement: ack, release and lease extension under one lock, at most once.

The lease heartbeat and the code that finishes a task run concurrently; without the lock an
extension in flight could land after a release and hide a retried message for another lease (SQS
keeps a receipt handle valid until the message is received again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sdfleet.bus.base import Bus, Delivery


class DeliveryHandle:
    def __init__(self, bus: Bus, delivery: Delivery) -> None:
        self.bus = bus
        self.delivery = delivery
        self.settled = False
        self.told = False
        """Subscribers heard how its task's run ended from this agent (the notifications went out
        before the ack): a delivery of that run that waited here for this one tells them nothing
        again (``agent.holds``)."""
        self.on_light: Callable[[], None] | None = None
        """Called when only notifications and the ack are left of a delivery settled without a
        run (``records.ack_when_told``): the agent stops counting it as being prepared, so a slow
        webhook does not hold up receiving, and its drain on SIGTERM does not wait for it (unacked,
        the task is told again by the agent that receives it next)."""
        self._lock = asyncio.Lock()

    async def ack(self) -> None:
        async with self._lock:
            if not self.settled:
                await self.bus.ack(self.delivery)
                self.settled = True

    async def release(self, delay_s: float = 0.0) -> None:
        async with self._lock:
            if not self.settled:
                await self.bus.release(self.delivery, delay_s)
                self.settled = True

    async def abandon(self) -> None:
        """Settled without a word to the bus: another agent received the message again after
        this delivery's lease lapsed, and an ack or release with this stale receipt could end or
        expose that agent's delivery (SQS's documentation: such a delete "might not" delete the
        message; moto deletes it and re-times it with any receipt handle it issued)."""
        async with self._lock:
            self.settled = True

    async def extend(self, lease_s: float) -> None:
        async with self._lock:
            if not self.settled:
                await self.bus.extend(self.delivery, lease_s)
