"""Tasks received and prepared, waiting for the runtime: which run next, and which run together.

Priority, then model-aware order: among the tasks already here, those of the highest
``Task.priority`` go first; among them, on a queue that mixes models (the seed's dynamic queue),
where a switch costs seconds of GPU, the oldest for the loaded model, else the oldest for a cached
one, else the oldest. No task is passed over for longer than ``max_pass_over_s`` (then it goes
first, whatever its priority and model; 0 is arrival order). Batching: the chosen task takes along
others with the same batch key, highest priority then oldest first, while their images fit in
``max_batch``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence

from sdfleet.agent.parts import Prepared

BatchKey = Callable[[Prepared], Hashable | None]
"""Tasks with equal, non-None keys may share one runtime call."""


def images(p: Prepared) -> int:
    return p.task.params.batch_size


class ReadyPool:
    def __init__(self, *, max_pass_over_s: float = 30.0) -> None:
        self.max_pass_over_s = max_pass_over_s
        self._items: list[Prepared] = []  # in arrival order
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, p: Prepared) -> None:
        p.ready_at = time.monotonic()
        self._items.append(p)
        self._changed.set()

    def drain(self) -> list[Prepared]:
        """Everything still waiting (shutdown: these are released)."""
        items, self._items = self._items, []
        return items

    async def wait(self, timeout_s: float) -> None:
        """Until something is put (or ``timeout_s`` passes)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)
        except TimeoutError:
            pass

    def take(
        self,
        loaded: Sequence[str],
        *,
        max_batch: int = 1,
        key: BatchKey | None = None,
        model_of: Callable[[Prepared], str | None] = lambda p: p.task.model,
    ) -> list[Prepared]:
        """The next task and its batch-mates, removed from the pool; [] when empty.

        ``loaded``: models in the runtime's memory, the active one first.
        """
        if not self._items:
            return []
        first = self._choose(loaded, model_of)
        self._items.remove(first)
        if key is None or max_batch <= 1:
            return [first]
        return [first, *self.company([first], key, max_batch - images(first))]

    def company(self, batch: Sequence[Prepared], key: BatchKey, room: int) -> list[Prepared]:
        """Waiting tasks that may join ``batch`` (same key) with at most ``room`` images in all,
        highest priority then oldest first, removed from the pool."""
        k = key(batch[0])
        if k is None:
            return []
        mates = []
        for p in sorted(self._items, key=lambda p: -p.task.priority):  # stable: oldest first
            if images(p) <= room and key(p) == k:
                mates.append(p)
                room -= images(p)
        for p in mates:
            self._items.remove(p)
        return mates

    def _choose(self, loaded: Sequence[str], model_of: Callable[[Prepared], str | None]) -> Prepared:
        oldest = self._items[0]
        if time.monotonic() - oldest.ready_at >= self.max_pass_over_s:
            return oldest
        top = max(p.task.priority for p in self._items)
        first = [p for p in self._items if p.task.priority == top]
        for model in loaded:
            for p in first:
                if model_of(p) in (model, None):
                    return p
        return first[0]
