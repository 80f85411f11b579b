"""The agent's background jobs (preparing, running and finishing tasks, settling deliveries), and
which of them a SIGTERM drain may cancel rather than wait for: those only waiting for their
notifications to go out. Such a delivery is not acked, so the next agent that receives it tells
the subscribers again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from sdfleet.agent.parts import Prepared


class Jobs:
    def __init__(self) -> None:
        self._all: set[asyncio.Task[None]] = set()
        self._batches: dict[asyncio.Task[None], Sequence[Prepared]] = {}
        self._telling: set[asyncio.Task[Any]] = set()

    def __bool__(self) -> bool:
        return bool(self._all)

    def spawn(self, work: Awaitable[None], batch: Sequence[Prepared] = ()) -> asyncio.Task[None]:
        """Run ``work`` as a job; ``batch``: the tasks it runs and finishes (``Prepared.light``
        says when only their notifications are left)."""
        job = asyncio.ensure_future(work)
        self._all.add(job)
        job.add_done_callback(self._all.discard)
        if batch:
            self._batches[job] = batch
            job.add_done_callback(lambda j: self._batches.pop(j, None))
        return job

    def only_telling(self) -> None:
        """The current job settles a delivery without a run, at most waiting for its notifications."""
        job = asyncio.current_task()
        if job is not None and job in self._all:
            self._telling.add(job)
            job.add_done_callback(self._telling.discard)

    async def wait(self, timeout_s: float) -> set[asyncio.Task[None]]:
        """Until every job ends or ``timeout_s`` passes; the jobs still going."""
        if not self._all:
            return set()
        _, pending = await asyncio.wait(set(self._all), timeout=timeout_s)
        return pending

    def cancel_telling(self, pending: set[asyncio.Task[None]]) -> None:
        """Cancel those of ``pending`` that wait only for notifications: recorded, not acked."""
        for job in pending:
            batch = self._batches.get(job, ())
            if job in self._telling or (batch and all(p.light.is_set() for p in batch)):
                job.cancel()
