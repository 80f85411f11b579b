"""The agent's loop: stages that keep the GPU busy, and a clean shutdown.

receive → prepare → (ready pool) → run → finish. The receiver keeps up to ``prefetch`` tasks
received and prepared (inputs fetched) ahead of the runtime, no more than it starts within
``prefetch_horizon_s`` (``pace``: long tasks are not hidden from other agents). The run stage
holds the GPU: it keeps ``runtime.max_in_flight`` calls outstanding (2 for every runtime shipped:
the next job already waits at the device's lock or the server's queue when one ends), picks the
next task in priority, then model-aware, order and, for a runtime that batches, takes compatible
tasks along. Its start write runs beside the call, and finishing a task (upload, record, notify,
ack) runs concurrently with the next calls, at most ``finishers`` at once, so the GPU never waits
on the network.

SIGTERM (scale-in, spot interruption): stop receiving, release what was prefetched, let running
tasks finish within ``drain_s`` or interrupt and release them, finish what finished, exit 0.
``burst`` drains the queue and returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Hashable, Sequence
from pathlib import Path
from typing import Any

from sdfleet.agent.begin import begin
from sdfleet.agent.dead_letters import watch_dead_letters
from sdfleet.agent.execute import Outcome, batching, job_of, run_tasks
from sdfleet.agent.expiry import expire, overdue
from sdfleet.agent.finish import finish
from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.holds import Holds, Waiting
from sdfleet.agent.jobs import Jobs
from sdfleet.agent.pace import Pace, ahead_limit
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.pool import ReadyPool, images
from sdfleet.agent.prepare import check, decode_or_settle, drop_if_no_dead_letter_queue, fail_unprepared
from sdfleet.agent.startup import deletion_cost, start_runtime
from sdfleet.agent.watch import Lease, watch_cancels
from sdfleet.bus.base import Delivery
from sdfleet.errors import BusError, BusUnavailable, NotFound, SdfleetError
from sdfleet.pod_cost import track

log = logging.getLogger(__name__)

MAX_RECEIVE = 10
"""Most deliveries one receive asks for (SQS's own limit)."""


class Agent:
    ROOM_POLL_S = 1.0
    """How long a receiver with a full pool sleeps before looking again if nothing wakes it."""

    def __init__(self, parts: Parts, *, burst: bool = False, ready_file: Path | None = None) -> None:
        self.parts = parts
        self.burst = burst
        self.ready_file = ready_file
        # Liveness = heartbeat age: the receive loop touches this file while the event loop is healthy.
        self.alive_file = ready_file.with_suffix(".alive") if ready_file is not None else None
        self._touched = 0.0
        s = parts.settings
        self.lease_s = parts.fleet.retry.lease_s
        self.period = s.heartbeat_period(self.lease_s)  # extended well before it runs out
        self.depth = max(1, parts.runtime.max_in_flight)
        self.batcher = batching(parts.runtime)
        self.max_batch = self.batcher.max_batch if self.batcher else 1
        self.prefetch = s.prefetch if s.prefetch is not None else max(4, 2 * self.depth * self.max_batch)
        self.pace = Pace()
        self.processed = 0
        self.pool = ReadyPool(max_pass_over_s=s.affinity_max_wait_s)
        self._preparing = 0
        self._running: set[Prepared] = set()
        self._jobs = Jobs()
        self._leases: dict[Prepared, Lease] = {}
        self._holds = Holds()
        self._gpu = asyncio.Semaphore(self.depth)
        self._room = asyncio.Semaphore(self.depth + s.finishers)
        self._aliases: dict[str, str] = {}
        self._dispatched: str | None = None
        self._stopping = asyncio.Event()
        self._receiver_done = asyncio.Event()
        self._taken = asyncio.Event()
        """Set when the pool has room again: a task taken to run, or a delivery settled unpooled."""

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> int:
        """Serve the queue until stopped (or, in burst mode, until it is empty). Returns tasks handled."""
        if not await start_runtime(self.parts, self._stopping):
            return 0
        if self.ready_file is not None:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
            self.ready_file.write_text("ready\n")
        receiver = asyncio.create_task(self._receive_loop(), name="receiver")
        done = asyncio.Event()
        check_s = self.parts.settings.cancel_check_s
        watcher = asyncio.create_task(watch_cancels(self.parts, lambda: self._running, check_s, done))
        letters_s = self.parts.settings.dead_letter_check_s
        letters = asyncio.create_task(watch_dead_letters(self.parts, letters_s, done), name="dead-letters")
        cost = deletion_cost(self.parts)
        costs = asyncio.create_task(track(cost, lambda: not self._idle(), done)) if cost else None
        try:
            await self._run_stage()
        finally:
            self._stopping.set()
            await receiver
            await _give_back(self._holds.drain())
            await self._release(self.pool.drain())
            await self._drain()
            done.set()
            await watcher
            await letters
            if costs is not None:
                await costs
            for f in (self.ready_file, self.alive_file):
                if f is not None:
                    f.unlink(missing_ok=True)
        return self.processed

    # --- receive and prepare ---------------------------------------------------------------

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self.alive_file is None or now - self._touched < 1.0:
            return
        self._touched = now
        self.alive_file.touch()

    async def _receive_loop(self) -> None:
        q = self.parts.queue.name
        wait_s = min(self.parts.settings.wait_s, 1.0) if self.burst else self.parts.settings.wait_s
        held = self.parts.metrics.prefetch_limit.labels(queue=q)
        try:
            while not self._stopping.is_set():
                self._heartbeat()
                limit = self.ahead()
                held.set(limit)
                room = limit - len(self.pool) - self._preparing - len(self._holds)
                # Refill by halves (several messages a call), or at once when the pool ran dry.
                if room <= 0 or (room < max(1, limit // 2) and (self.pool or self._preparing)):
                    self._taken.clear()
                    await self._until(self._taken.wait(), self.ROOM_POLL_S)
                    continue
                try:
                    deliveries = await self.parts.bus.receive(
                        q,
                        max_messages=min(room, MAX_RECEIVE),
                        wait_s=wait_s,
                        lease_s=self.lease_s,
                        until=self._stopping,
                    )
                except NotFound as e:  # the engine lost its data (a Redis restarted empty)
                    await self._queue_missing(e)
                    continue
                except BusError as e:
                    log.warning("receive from %s failed, retrying: %s", q, e)
                    await self._until(self._stopping.wait(), 1.0)
                    continue
                if not deliveries and self.burst and await self._drained():
                    return
                for d in deliveries:
                    self._preparing += 1
                    self._jobs.spawn(self._admit(d))
        finally:
            self._receiver_done.set()

    async def _queue_missing(self, missing: NotFound) -> None:
        """Put the topology back where this agent may (else wait, as through an outage, for
        `sdfleet ensure`); an agent never exits because its queue vanished."""
        try:
            await self.parts.keeper.restore(missing)
        except BusUnavailable as e:
            log.error("%s; retrying", e)
            await self._until(self._stopping.wait(), 5.0)

    def ahead(self) -> int:
        """Tasks the ready pool may hold now (received, prepared, not yet running)."""
        horizon_s = self.parts.settings.prefetch_horizon_s or None
        per_task_s = self.pace.estimate()
        return ahead_limit(self.prefetch, self.max_batch, horizon_s, per_task_s, queued=self.depth - 1)

    async def _drained(self) -> bool:
        stats = await self.parts.bus.stats(self.parts.queue.name)
        return stats.visible == 0 and stats.delayed == 0 and self._idle()

    def _idle(self) -> bool:
        return not self.pool and not self._preparing and not self._jobs

    async def _admit(self, d: Delivery) -> None:
        handle = DeliveryHandle(self.parts.bus, d)
        await self._admit_held(handle, Lease(handle, self.lease_s, self.period))

    async def _admit_held(self, handle: DeliveryHandle, lease: Lease) -> None:
        """Prepare a delivery whose lease is kept and pool it, hold it back, or settle it."""
        d = handle.delivery
        prepared, key = None, None
        slot = _Slot(self)
        handle.on_light = slot.telling  # settled but for its notifications: room for the next
        try:
            decoded = await decode_or_settle(self.parts, handle)
            if decoded is not None:
                task = decoded.task
                if self._holds.take((task.tenant, task.id), handle):
                    key = (task.tenant, task.id)
                else:  # another delivery of its id is in hand here: it waits its turn, never runs beside it
                    self._holds.wait((task.tenant, task.id), handle, lease)
                    return
                prepared = await check(self.parts, handle, decoded, self._stopping)
        except Exception as e:
            # One poison message or record must not take the agent down: released, it comes back
            # until max_receives moves it to the dead-letter queue, and the agent serves on.
            unexpected = not isinstance(e, SdfleetError)
            log.warning("could not prepare %s, releasing: %s", d.message_id, e, exc_info=unexpected)
            await lease.stop()
            await fail_unprepared(self.parts, d, e)
            if not await drop_if_no_dead_letter_queue(self.parts, handle, f"{type(e).__name__}: {e}"):
                await _settle(handle.release())
        except asyncio.CancelledError:  # the drain, while it waited for its notifications
            await lease.stop()
            raise
        finally:
            handle.on_light = None
            slot.free(wake=prepared is None)  # a drop or a failed input frees room at once, not in 1 s
        if prepared is None:
            await lease.stop()
            self.processed += 1
            if key is not None:
                await self._let_go(key, handle)
            return
        self._leases[prepared] = lease
        if self._stopping.is_set():
            # Received or prepared while the agent was stopping: the pool was (or is being) handed
            # back and no run stage will take it, so it goes back now, not one lease later.
            await self._release([prepared])
            return
        self.pool.put(prepared)

    async def _let_go(self, key: tuple[str, str], handle: DeliveryHandle) -> None:
        """The delivery ``handle`` has left the agent: the next one waiting for its id is prepared
        again, or, once the agent is stopping, given back."""
        nxt = self._holds.let_go(key, handle)
        if nxt is None:
            return
        nxt[0].told = handle.told  # what the holder told need not be told again
        if self._stopping.is_set():
            await _give_back([nxt])
            return
        self._preparing += 1
        self._jobs.spawn(self._admit_held(*nxt))

    # --- run and finish --------------------------------------------------------------------

    async def _run_stage(self) -> None:
        while True:
            if not await self._acquire(self._gpu):
                return
            if not await self._acquire(self._room):
                self._gpu.release()
                return
            batch = await self._next_batch()
            if batch is None:
                self._gpu.release()
                self._room.release()
                return
            self._dispatched = self._model_of(batch[0]) or self._dispatched
            self._taken.set()
            self._jobs.spawn(self._process(batch), batch)

    async def _next_batch(self) -> list[Prepared] | None:
        while not self._stopping.is_set():
            if self.pool:
                batch = self.pool.take(
                    self._loaded(), max_batch=self.max_batch, key=self._key, model_of=self._model_of
                )
                if self.batcher is not None and images_of(*batch) < self.max_batch:
                    batch += await self._company(batch)
                now = time.time()  # one that waited in the pool past its ttl_s does not start
                for p in [p for p in batch if overdue(p.start_by, now)]:
                    batch.remove(p)
                    self._jobs.spawn(self._expire(p))
                if batch:
                    return batch
                continue
            if self._receiver_done.is_set() and not self._preparing:
                return None
            await self.pool.wait(0.2)
        return None

    async def _company(self, batch: list[Prepared]) -> list[Prepared]:
        """Batch-mates that arrive within the runtime's ``batch_wait_s`` of the first task."""
        assert self.batcher is not None
        deadline = batch[0].ready_at + self.batcher.batch_wait_s
        mates: list[Prepared] = []
        while True:
            mates += self.pool.company(batch, self._key, self.max_batch - images_of(*batch, *mates))
            remaining = deadline - time.monotonic()
            full = images_of(*batch, *mates) >= self.max_batch
            if full or remaining <= 0 or self._stopping.is_set():
                return mates
            await self.pool.wait(remaining)

    def _key(self, p: Prepared) -> Hashable | None:
        if self.batcher is None:
            return None
        try:
            key = self.batcher.batch_key(job_of(self.parts, p))
            hash(key)  # a tuple holding a list is Hashable to isinstance, and fails in the pool
        except Exception:  # the run stage must not stop for one task's key: it runs alone
            log.exception("task %s: the runtime's batch_key failed; the task runs alone", p.task.id)
            return None
        return key

    def _loaded(self) -> list[str]:
        """Models the next job would find ready, best first: the last one handed to the runtime
        (the runtime runs jobs in order, so it is active by then), the active one, cached ones."""
        runtime = self.parts.runtime
        cached = getattr(runtime, "cached_models", ())
        loaded = [m for m in (self._dispatched, runtime.loaded_model, *reversed(cached)) if m]
        return list(dict.fromkeys(loaded))

    def _model_of(self, p: Prepared) -> str | None:
        model = job_of(self.parts, p).model
        return self._aliases.get(model, model) if model else None

    async def _process(self, batch: Sequence[Prepared]) -> None:
        finishing: asyncio.Future[Any] | None = None
        try:
            starts = [asyncio.create_task(self._begin(p)) for p in batch]
            outcomes = await self._run(batch)
            started = await asyncio.gather(*starts)
            settle = zip(batch, started, outcomes, strict=True)
            finishing = asyncio.gather(*(self._finish(p, ok, outcome) for p, ok, outcome in settle))
            # The slot is free once only notifications and acks are left (a slow webhook receiver
            # then holds a lease, not the GPU).
            light: asyncio.Future[Any] = asyncio.gather(*(p.light.wait() for p in batch))
            await asyncio.wait({finishing, light}, return_when=asyncio.FIRST_COMPLETED)
            light.cancel()
        finally:
            self._room.release()
            if finishing is None:
                self.processed += len(batch)
        try:
            await finishing
        finally:
            self.processed += len(batch)

    async def _begin(self, p: Prepared) -> bool | None:
        """The start write, beside the runtime call: a task that must not run is interrupted."""
        try:
            ok: bool | None = await begin(self.parts, p)
        except Exception as e:  # an outage past the retries: the lease brings the task back
            log.warning("task %s: start not recorded, left to its lease: %s", p.task.id, e)
            ok = None
        if not ok:
            await self.parts.runtime.interrupt(p.task.id)
        return ok

    async def _run(self, batch: Sequence[Prepared]) -> list[Outcome]:
        busy = self.parts.metrics.busy.labels(queue=self.parts.queue.name)
        self._running.update(batch)
        busy.set(1)
        self.pace.started(len(batch))
        try:
            outcomes = await run_tasks(self.parts, batch)
        finally:
            self.pace.ended()
            self._running.difference_update(batch)
            busy.set(1 if self._running else 0)
            self._gpu.release()
        model = job_of(self.parts, batch[0]).model
        if model and self.parts.runtime.loaded_model:
            self._aliases[model] = self.parts.runtime.loaded_model
        return outcomes

    async def _finish(self, p: Prepared, started: bool | None, outcome: Outcome) -> None:
        try:
            if started:
                await finish(self.parts, p, outcome)
            else:  # dropped at start (settled there) or left to its lease
                p.span.end()
        except Exception:  # a bug settling one task must not stop the agent; its lease brings it back
            log.exception("task %s: unexpected error while finishing, left to its lease", p.task.id)
        finally:
            await self._settled(p)
            p.light.set()

    async def _expire(self, p: Prepared) -> None:
        assert p.start_by is not None
        self._jobs.only_telling()  # no run to wait for
        try:
            await expire(self.parts, p.handle, p.task, p.start_by, p.span)
        except Exception as e:  # its lease brings it back, and the next agent expires it
            log.warning("task %s: not expired, left to its lease: %s", p.task.id, e)
        finally:
            p.span.end()
            await self._settled(p)
            self.processed += 1
            self._taken.set()

    async def _settled(self, p: Prepared) -> None:
        """``p``'s delivery has left the agent (settled, or left to its lease): its lease is no
        longer kept, and the next delivery of its id may go on."""
        await self._let_go((p.task.tenant, p.task.id), p.handle)
        lease = self._leases.pop(p, None)
        if lease is not None:
            await lease.stop()

    # --- shutdown --------------------------------------------------------------------------

    async def _release(self, items: Sequence[Prepared]) -> None:
        for p in items:
            await self._settled(p)
            p.span.end()
            await _settle(p.handle.release())

    async def _drain(self) -> None:
        """Running tasks get ``drain_s``, then are interrupted (and released); finishing ones end."""
        pending = await self._jobs.wait(self.parts.settings.drain_s)
        if pending and self._running:
            log.warning("tasks still running after %.0f s drain: interrupting", self.parts.settings.drain_s)
            # A receive still in flight would take the released task back and spend one of its
            # max_receives on an agent that is going away: let it end first.
            await self._receiver_done.wait()
            await self.parts.runtime.interrupt()
        self._jobs.cancel_telling(pending)  # recorded, not acked: the next agent tells again
        if pending:
            await asyncio.wait(pending)

    # --- plumbing --------------------------------------------------------------------------

    async def _acquire(self, sem: asyncio.Semaphore) -> bool:
        """``sem`` acquired (True), or shutdown began first (False)."""
        if self._stopping.is_set():
            return False
        acquire = asyncio.ensure_future(sem.acquire())
        await self._until(acquire, None)
        if not acquire.done() or acquire.cancelled():
            return False
        if self._stopping.is_set():
            sem.release()
            return False
        return True

    async def _until(self, aw: Awaitable[object], timeout_s: float | None) -> None:
        """Wait for ``aw``, for shutdown, or ``timeout_s``, whichever comes first (``aw`` is
        cancelled if it has not finished)."""
        fut = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({fut, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for f in (fut, stop):
            f.cancel()


class _Slot:
    """A delivery's place among those being prepared (``Agent._preparing``, which the receiver's
    room counts), given up once: pooled, settled, or with only its notifications left."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.held = agent, True

    def free(self, wake: bool = True) -> None:
        if self.held:
            self.held = False
            self.agent._preparing -= 1
            if wake:
                self.agent._taken.set()

    def telling(self) -> None:
        """Its delivery now waits only for its notifications."""
        self.agent._jobs.only_telling()
        self.free()


def images_of(*batch: Prepared) -> int:
    return sum(images(p) for p in batch)


async def _give_back(items: Sequence[Waiting]) -> None:
    """Deliveries waiting in ``Holds``, released at shutdown."""
    for handle, lease in items:
        await lease.stop()
        await _settle(handle.release())


async def _settle(op: Awaitable[None]) -> None:
    try:
        await op
    except SdfleetError as e:  # the lease will expire and the message come back anyway
        log.warning("settling a delivery failed: %s", e)
