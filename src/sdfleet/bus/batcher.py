"""Coalescing calls that an engine takes in batches (SQS's DeleteMessageBatch takes 10).

``await batcher.add(item)`` returns once a batch holding the item was sent; items of one group
(a queue) that arrive within ``linger_s`` of the first, up to ``size``, share the call. Each
caller gets its own item's error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sdfleet.bus.base import Delivery

T = TypeVar("T", bound=Delivery)
Send = Callable[[Sequence[T]], Awaitable[list[BaseException | None]]]


class Batcher(Generic[T]):
    def __init__(self, send: Send[T], *, size: int, linger_s: float) -> None:
        self._send, self.size, self.linger_s = send, size, linger_s
        self._open: dict[str, list[tuple[T, asyncio.Future[None]]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    async def add(self, item: T) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self._open.setdefault(item.queue, [])
        batch.append((item, fut))
        if len(batch) == 1:
            self._spawn(self._later(item.queue, batch))
        elif len(batch) >= self.size:
            self._spawn(self._flush(item.queue, batch))
        await fut

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _later(self, group: str, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        await asyncio.sleep(self.linger_s)
        await self._flush(group, batch)

    async def _flush(self, group: str, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        if self._open.get(group) is not batch:
            return  # already sent (full before its linger ended)
        del self._open[group]
        try:
            errors = await self._send([item for item, _ in batch])
        except Exception as e:
            errors = [e] * len(batch)
        except BaseException:
            for _, fut in batch:
                fut.cancel()
            raise
        for (_, fut), error in zip(batch, errors, strict=True):
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def aclose(self) -> None:
        """Send what is waiting now, and wait for the calls in flight."""
        for group, batch in list(self._open.items()):
            await self._flush(group, batch)
        await asyncio.gather(*self._flushes, return_exceptions=True)
