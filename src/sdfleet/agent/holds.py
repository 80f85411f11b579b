"""Which delivery holds each task id on an agent, and the deliveries of that id waiting for it.

One agent may receive a second delivery of an id it already has in hand (being prepared, pooled,
running, finishing): the seed's Lambda publishes every POST anew, the API publishes a still-queued
id again when it is submitted again, and a delivery whose lease lapsed (an event loop stalled past
it, an engine away) comes back to the agent that is running it. Only one may be in hand at a
time: two would run the task twice at once here (the record's start takes this agent's own
``running`` as its own), or the second's start would be refused and interrupt the job of its id,
the first's. A second delivery waits here, its lease kept by its heartbeat (no release, no receive
spent), until the holder is let go; then the agent prepares it again as what it is then (finished:
dropped; the id's next run: ``defer``; a retry of a run that failed).
"""

from __future__ import annotations

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.tasklog import task_event
from sdfleet.agent.watch import Lease

Key = tuple[str, str]
"""(tenant, task id)."""
Waiting = tuple[DeliveryHandle, Lease]


class Holds:
    def __init__(self) -> None:
        self._held: dict[Key, DeliveryHandle] = {}
        self._waiting: dict[Key, list[Waiting]] = {}

    def __len__(self) -> int:
        """Deliveries waiting (they count against the agent's prefetch)."""
        return sum(map(len, self._waiting.values()))

    def take(self, key: Key, handle: DeliveryHandle) -> bool:
        """``handle`` holds ``key`` from now on; False when another delivery already does."""
        if key in self._held:
            return False
        self._held[key] = handle
        return True

    def wait(self, key: Key, handle: DeliveryHandle, lease: Lease) -> None:
        """``handle``, a delivery of a held id, waits for the holder to be let go."""
        self._waiting.setdefault(key, []).append((handle, lease))
        d = handle.delivery
        reason = "another delivery of its id is in hand here"
        task_event(key[1], d.queue, None, "waiting", reason=reason, receive=d.receive_count)

    def let_go(self, key: Key, handle: DeliveryHandle) -> Waiting | None:
        """``handle`` has left the agent: if it held ``key``, the next delivery waiting for it."""
        if self._held.get(key) is not handle:
            return None
        del self._held[key]
        waiting = self._waiting.get(key)
        if not waiting:
            return None
        nxt = waiting.pop(0)
        if not waiting:
            del self._waiting[key]
        return nxt

    def drain(self) -> list[Waiting]:
        """Every delivery still waiting (shutdown: these are given back)."""
        items = [item for waiting in self._waiting.values() for item in waiting]
        self._waiting.clear()
        return items
