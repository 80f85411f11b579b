"""One diffusers run's link with its worker thread: progress in order, interrupt between steps."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

from sdfleet.runtimes.base import ProgressFn

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Raised inside the step callback to leave the pipeline after ``interrupt()``."""


class RunControl:
    """One run's link with its worker thread: progress to the loop (in order, coalesced), stop back."""

    def __init__(self, progress: ProgressFn, task_ids: Collection[str] = ()) -> None:
        self.task_ids = frozenset(task_ids)
        self.stopped: set[str] = set()
        """Jobs of this run that were interrupted; the run stops once all of them are."""
        self.stop = threading.Event()
        self._progress = progress
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[float | None] = asyncio.Queue()
        self._last = 0.0
        self._task = asyncio.create_task(self._drain())

    def interrupt(self, task_id: str | None) -> None:
        """Stop the run for ``task_id`` (None: for all); a batch goes on while a job of it is wanted."""
        self.stopped |= self.task_ids if task_id is None else {task_id} & self.task_ids
        if self.stopped >= self.task_ids:
            self.stop.set()

    def report(self, value: float) -> None:
        """Thread-safe."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value)

    async def _drain(self) -> None:
        while True:
            value = await self._queue.get()
            while not self._queue.empty() and value is not None:
                value = self._queue.get_nowait()
            if value is None:
                return
            if value > self._last:
                self._last = value
                try:
                    await self._progress(value)
                except Exception:
                    log.warning("progress callback failed", exc_info=True)

    async def close(self) -> None:
        """Deliver what is queued, then stop the pump (idempotent)."""
        if not self._task.done():
            self._queue.put_nowait(None)
            await self._task

    async def final(self) -> None:
        """Report completion (1.0) once the pump is closed."""
        if self._last < 1.0:
            self._last = 1.0
            try:
                await self._progress(1.0)
            except Exception:
                log.warning("progress callback failed", exc_info=True)


def step_callback(ctl: RunControl, call: int = 0, calls: int = 1) -> Callable[..., dict[str, Any]]:
    """The pipeline's step callback: stops the run when asked, reports progress. A run of several
    pipeline calls (``calls``; this is call ``call``) counts them in turn, 0 to 1 in all."""

    def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if ctl.stop.is_set():
            raise Stopped
        total = max(1, int(getattr(pipe, "num_timesteps", 0) or 1))
        ctl.report(min(0.99, (call + (i + 1) / total) / calls))
        return {}

    return on_step_end
