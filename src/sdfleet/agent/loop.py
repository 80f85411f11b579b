"""The agent's loop: receive, keep leases alive, pipeline prefetch → run → finish, shut down cleanly.

While the runtime works on task N, the receiver already holds task N+1 with its inputs fetched
(``prefetch``), so the GPU never waits on the network. SIGTERM (scale-in, spot interruption): stop
receiving, release what was prefetched, let the running task finish within ``drain_s`` or interrupt
and release it, exit 0. ``burst`` drains the queue and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from sdfleet.agent.execute import execute
from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.prepare import prepare
from sdfleet.bus.base import Delivery
from sdfleet.errors import BusError, SdfleetError
from sdfleet.tasks import TaskState

log = logging.getLogger(__name__)


class Lease:
    """Extends a delivery's lease every ``period`` seconds, and watches its task for a cancel."""

    def __init__(self, parts: Parts, handle: DeliveryHandle, lease_s: float, period: float) -> None:
        self.parts, self.handle, self.lease_s, self.period = parts, handle, lease_s, period
        self.prepared: Prepared | None = None
        self._task = asyncio.create_task(self._beat(), name=f"lease-{handle.delivery.message_id}")

    async def _beat(self) -> None:
        while not self.handle.settled:
            await asyncio.sleep(self.period)
            try:
                await self.handle.extend(self.lease_s)
                await self._check_cancel()
            except SdfleetError as e:
                log.warning("lease heartbeat for %s failed: %s", self.handle.delivery.message_id, e)

    async def _check_cancel(self) -> None:
        if self.prepared is None or self.prepared.cancelled:
            return
        record = await self.parts.store.get(self.prepared.task.tenant, self.prepared.task.id)
        if record is not None and record.state is TaskState.CANCELLED:
            self.prepared.cancelled = True
            await self.parts.runtime.interrupt(self.prepared.task.id)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Agent:
    def __init__(self, parts: Parts, *, burst: bool = False, ready_file: Path | None = None) -> None:
        self.parts = parts
        self.burst = burst
        self.ready_file = ready_file
        # Liveness = heartbeat age: the receive loop touches this file while the event loop is healthy.
        self.alive_file = ready_file.with_suffix(".alive") if ready_file is not None else None
        self._touched = 0.0
        self.lease_s = parts.fleet.retry.lease_s
        self.period = parts.settings.heartbeat_s or max(1.0, self.lease_s / 3)
        self.processed = 0
        self._stopping = asyncio.Event()
        self._ready: asyncio.Queue[tuple[Prepared, Lease]] = asyncio.Queue(
            maxsize=max(1, parts.settings.prefetch)
        )
        self._receiver_done = asyncio.Event()
        self._current: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> int:
        """Serve the queue until stopped (or, in burst mode, until it is empty). Returns tasks handled."""
        await self.parts.runtime.start()
        if self.ready_file is not None:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
            self.ready_file.write_text("ready\n")
        receiver = asyncio.create_task(self._receive_loop(), name="receiver")
        try:
            await self._run_loop()
        finally:
            self._stopping.set()
            await receiver
            await self._release_prefetched()
            for f in (self.ready_file, self.alive_file):
                if f is not None:
                    f.unlink(missing_ok=True)
        return self.processed

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self.alive_file is None or now - self._touched < 1.0:
            return
        self._touched = now
        self.alive_file.touch()

    async def _receive_loop(self) -> None:
        q = self.parts.queue.name
        wait_s = min(self.parts.settings.wait_s, 1.0) if self.burst else self.parts.settings.wait_s
        try:
            while not self._stopping.is_set():
                self._heartbeat()
                if not self._has_room():
                    await self._sleep(0.05)
                    continue
                try:
                    deliveries = await self.parts.bus.receive(
                        q, max_messages=1, wait_s=wait_s, lease_s=self.lease_s
                    )
                except BusError as e:
                    log.warning("receive from %s failed, retrying: %s", q, e)
                    await self._sleep(1.0)
                    continue
                if not deliveries:
                    if self.burst and await self._drained():
                        return
                    continue
                for d in deliveries:
                    await self._admit(d)
        finally:
            self._receiver_done.set()

    def _has_room(self) -> bool:
        if self.parts.settings.prefetch == 0:
            return self._ready.empty() and self._current is None
        return self._ready.qsize() < self.parts.settings.prefetch

    async def _drained(self) -> bool:
        stats = await self.parts.bus.stats(self.parts.queue.name)
        return stats.visible == 0 and stats.delayed == 0 and self._ready.empty() and self._current is None

    async def _admit(self, d: Delivery) -> None:
        handle = DeliveryHandle(self.parts.bus, d)
        lease = Lease(self.parts, handle, self.lease_s, self.period)
        try:
            prepared = await prepare(self.parts, handle)
        except SdfleetError as e:
            log.warning("could not prepare %s, releasing: %s", d.message_id, e)
            await lease.stop()
            await self._settle_release(handle)
            return
        except Exception:
            # One poison message or record must not take the agent down: released, it comes back
            # until max_receives moves it to the dead-letter queue, and the agent serves on.
            log.exception("unexpected error preparing %s, releasing it", d.message_id)
            await lease.stop()
            await self._settle_release(handle)
            return
        if prepared is None:
            await lease.stop()
            self.processed += 1
            return
        lease.prepared = prepared
        self._ready.put_nowait((prepared, lease))  # room was checked before receiving

    async def _run_loop(self) -> None:
        while True:
            item = await self._next_ready()
            if item is None:
                return
            prepared, lease = item
            self._current = asyncio.create_task(self._execute(prepared, lease))
            await self._wait_current()
            self._current = None
            self.processed += 1

    async def _next_ready(self) -> tuple[Prepared, Lease] | None:
        while True:
            if self._stopping.is_set():
                return None
            if self._receiver_done.is_set() and self._ready.empty():
                return None
            try:
                return await asyncio.wait_for(self._ready.get(), timeout=0.2)
            except TimeoutError:
                continue

    async def _execute(self, prepared: Prepared, lease: Lease) -> None:
        self.parts.metrics.busy.labels(queue=self.parts.queue.name).set(1)
        try:
            await execute(self.parts, prepared)
        except SdfleetError as e:  # an engine outage outlasted the retries: the lease brings it back
            log.warning("task %s left unsettled: %s", prepared.task.id, e)
        except Exception:  # a bug settling one task must not stop the agent; its lease brings it back
            log.exception("task %s: unexpected error, left to its lease", prepared.task.id)
        finally:
            self.parts.metrics.busy.labels(queue=self.parts.queue.name).set(0)
            await lease.stop()

    async def _wait_current(self) -> None:
        assert self._current is not None
        stop_wait = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({self._current, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if self._current in done:
            return
        # Shutting down: give the running task the grace period, then interrupt it (it is released).
        drain = self.parts.settings.drain_s
        finished, _ = await asyncio.wait({self._current}, timeout=drain)
        if not finished:
            log.warning("task still running after %.0f s drain: interrupting", drain)
            # A receive still in flight would take the released task back and spend one of its
            # max_receives on an agent that is going away: let it end first.
            await self._receiver_done.wait()
            await self.parts.runtime.interrupt()
            await self._current

    async def _release_prefetched(self) -> None:
        while not self._ready.empty():
            prepared, lease = self._ready.get_nowait()
            await lease.stop()
            prepared.span.end()
            await self._settle_release(prepared.handle)

    async def _settle_release(self, handle: DeliveryHandle) -> None:
        try:
            await handle.release()
        except SdfleetError as e:  # the lease will expire and the message come back anyway
            log.warning("release of %s failed: %s", handle.delivery.message_id, e)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
