"""One delivery end to end: decode → inputs → runtime → storage → record → notify → ack.

Every exit path settles the delivery exactly once (ack, or release for a retry) and leaves the
record in a state that tells the client what happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from sdfleet.agent.decode import decode_task
from sdfleet.agent.inputs import InputFetcher
from sdfleet.agent.outage import ride_out
from sdfleet.bus.base import Bus, Delivery
from sdfleet.errors import (
    GenerationTimeout,
    InputFetchError,
    Interrupted,
    MessageDecodeError,
    NotFound,
    Reject,
    RuntimeFailure,
    SdfleetError,
    TransitionConflict,
)
from sdfleet.notify.base import Notifier
from sdfleet.routing import ATTR_ENQUEUED_AT
from sdfleet.runtimes.base import Job, Runtime, RuntimeResult
from sdfleet.settings import AgentSettings, FleetConfig, QueueConfig
from sdfleet.storage.base import BlobStore
from sdfleet.store.base import TaskStore, transition
from sdfleet.tasks import EventType, Task, TaskError, TaskEvent, TaskRecord, TaskResult, TaskState
from sdfleet.telemetry import Metrics

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything an agent works with, built by the CLI from settings."""

    bus: Bus
    store: TaskStore
    storage: BlobStore
    runtime: Runtime
    notifiers: Sequence[Notifier]
    fetcher: InputFetcher
    queue: QueueConfig
    fleet: FleetConfig
    settings: AgentSettings
    worker_id: str
    metrics: Metrics


@dataclass
class Prepared:
    """A received task whose inputs are already fetched, waiting for the runtime."""

    delivery: Delivery
    task: Task
    inputs: list[bytes]
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False
    shutting_down: bool = False


def image_keys(task: Task, count: int) -> tuple[list[str], str]:
    """The seed's layout: ``<prefix>/<id>/<id>-<n>.png`` and ``<prefix>/<id>/<id>.out``."""
    base = f"{task.storage_prefix()}/{task.id}"
    return [f"{base}/{task.id}-{n}.png" for n in range(1, count + 1)], f"{base}/{task.id}.out"


async def prepare(parts: Parts, d: Delivery) -> Prepared | None:
    """Decode and check a delivery, fetch its inputs. None when the delivery is already settled."""
    try:
        task = decode_task(d.body, d.attributes)
    except MessageDecodeError as e:
        # Released, not acked: after max_receives the bus moves it to the DLQ for a human to see.
        log.error("undecodable message %s on %s: %s", d.message_id, d.queue, e)
        await parts.bus.release(d)
        return None
    record = await parts.store.get(task.id)
    if record is None:  # published by the seed's Lambda or another producer: adopt it
        record, _ = await parts.store.create(TaskRecord(task=task.model_copy(update={"queue": d.queue})))
    if record.state.terminal:
        log.info("task %s is already %s: dropping redelivery", task.id, record.state)
        await parts.bus.ack(d)
        return None
    if record.task.queue not in (None, d.queue):
        # Overlapping filter policies fanned the task out; it runs on the queue it was routed to.
        log.warning("task %s belongs to queue %s, dropping copy on %s", task.id, record.task.queue, d.queue)
        await parts.bus.ack(d)
        return None
    timings = {"queue_wait": max(0.0, time.time() - _enqueued_at(d))}
    t0 = time.perf_counter()
    try:
        inputs = [await parts.fetcher.fetch(url) for url in task.params.init_images]
    except InputFetchError as e:
        await fail(parts, task.id, e.code, e.message or str(e))
        await parts.bus.ack(d)
        return None
    timings["inputs_fetch"] = time.perf_counter() - t0
    return Prepared(delivery=d, task=record.task, inputs=inputs, timings=timings)


def _enqueued_at(d: Delivery) -> float:
    try:
        return float(d.attributes.get(ATTR_ENQUEUED_AT, d.sent_at))
    except ValueError:
        return d.sent_at


async def execute(parts: Parts, p: Prepared) -> None:
    """Run a prepared task and settle its delivery."""
    d, task = p.delivery, p.task
    try:
        start = partial(transition, parts.store, task.id, lambda r: _start(r, parts, d))
        record = await ride_out(start, f"starting {task.id}", parts.fleet.retry.lease_s)
    except (TransitionConflict, NotFound) as e:
        log.info("task %s not started: %s", task.id, e)
        await parts.bus.ack(d)
        return
    await _notify(parts, record, EventType.STARTED)
    try:
        result = await _run(parts, p)
        await _succeed(parts, p, result)
    except Reject as e:
        await fail(parts, task.id, e.code, e.reason)
        await parts.bus.ack(d)
    except Interrupted as e:
        await _interrupted(parts, p, e)
    except (RuntimeFailure, SdfleetError) as e:
        await _retry_or_fail(parts, p, e.code, e.message or str(e))
    except Exception as e:  # a runtime bug must not kill the agent; it counts as a failed attempt
        log.exception("task %s: unexpected error", task.id)
        await _retry_or_fail(parts, p, "runtime_failure", f"{type(e).__name__}: {e}")


def _start(r: TaskRecord, parts: Parts, d: Delivery) -> TaskRecord:
    r.state = TaskState.RUNNING
    r.attempts = max(r.attempts + 1, d.receive_count)
    r.worker = parts.worker_id
    r.runtime = parts.runtime.name
    r.started_at = time.time()
    r.progress = 0.0
    return r


async def _run(parts: Parts, p: Prepared) -> RuntimeResult:
    task = p.task
    job = Job(
        task_id=task.id,
        type=task.type,
        model=task.model or parts.queue.model or parts.fleet.models.default,
        params=task.params,
        init_images=p.inputs,
        timeout_s=task.timeout_s,
    )
    before = parts.runtime.loaded_model
    last = 0.0

    async def progress(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 1.0 or fraction >= 1.0:  # throttle store writes
            last = now
            await _progress(parts, task.id, fraction)

    t0 = time.perf_counter()
    try:
        result = await asyncio.wait_for(parts.runtime.run(job, progress), timeout=task.timeout_s)
    except TimeoutError as e:
        await parts.runtime.interrupt()
        raise GenerationTimeout(f"generation took longer than {task.timeout_s} s") from e
    p.timings["runtime_run"] = time.perf_counter() - t0
    if parts.runtime.loaded_model != before:
        parts.metrics.model_switches.labels(queue=parts.queue.name).inc()
    parts.metrics.observe_stages(parts.queue.name, p.timings)
    return result


async def _progress(parts: Parts, task_id: str, fraction: float) -> None:
    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is not TaskState.RUNNING:
            return None
        r.progress = round(min(1.0, fraction), 4)
        return r

    try:
        await transition(parts.store, task_id, mutate)
    except SdfleetError as e:  # progress is best effort
        log.debug("progress of %s not saved: %s", task_id, e)


async def _succeed(parts: Parts, p: Prepared, result: RuntimeResult) -> None:
    task = p.task
    keys, out_key = image_keys(task, len(result.images))
    t0 = time.perf_counter()
    await asyncio.gather(
        *(parts.storage.put(k, img, "image/png") for k, img in zip(keys, result.images, strict=True))
    )
    info = {**result.info, "images": [parts.storage.location(k) for k in keys], "task_id": task.id}
    await parts.storage.put(out_key, json.dumps(info, indent=2).encode(), "application/json")
    p.timings["storage_put"] = time.perf_counter() - t0
    res = TaskResult(images=keys, output=out_key, seed=result.seed, timings=dict(p.timings))

    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is TaskState.SUCCEEDED and r.result == res:
            return None  # our own write, applied by a server that went away before it replied
        r.state, r.result, r.progress, r.error = TaskState.SUCCEEDED, res, 1.0, None
        r.finished_at = time.time()
        return r

    lease_s = parts.fleet.retry.lease_s
    try:
        record = await ride_out(
            partial(transition, parts.store, task.id, mutate), f"recording {task.id}", lease_s
        )
    except (
        TransitionConflict
    ) as e:  # cancelled (or finished elsewhere) meanwhile: the result is not written twice
        log.info("task %s finished but not recorded: %s", task.id, e)
        await parts.bus.ack(p.delivery)
        return
    parts.metrics.tasks.labels(queue=parts.queue.name, state="succeeded").inc()
    await _notify(parts, record, EventType.SUCCEEDED)
    await ride_out(partial(parts.bus.ack, p.delivery), f"acking {task.id}", lease_s)


async def _interrupted(parts: Parts, p: Prepared, e: Interrupted) -> None:
    if p.cancelled:
        await parts.bus.ack(p.delivery)  # the cancel already wrote the terminal state
        return
    await _requeue(parts, p.task.id, "interrupted", "agent shut down before the task finished")
    await parts.bus.release(p.delivery)


async def _retry_or_fail(parts: Parts, p: Prepared, code: str, message: str) -> None:
    d = p.delivery
    log.warning("task %s attempt %d failed: %s", p.task.id, d.receive_count, message)
    if d.receive_count >= parts.fleet.retry.max_receives:
        await fail(parts, p.task.id, code, f"{message} (after {d.receive_count} attempts)")
        # Not acked: the bus moves a message that used up its receives to the dead-letter queue.
        await parts.bus.release(d)
    else:
        await _requeue(parts, p.task.id, code, message)
        await parts.bus.release(d, parts.settings.retry_delay_s)


async def _requeue(parts: Parts, task_id: str, code: str, message: str) -> None:
    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is not TaskState.RUNNING:
            return None
        r.state, r.error, r.worker = TaskState.QUEUED, TaskError(code=code, message=message), None
        return r

    try:
        await transition(parts.store, task_id, mutate)
    except (TransitionConflict, NotFound) as e:
        log.info("task %s not requeued: %s", task_id, e)


async def fail(parts: Parts, task_id: str, code: str, message: str) -> None:
    """Mark a task failed with a reason and notify; a task already terminal stays as it is."""

    def mutate(r: TaskRecord) -> TaskRecord:
        r.state, r.error = TaskState.FAILED, TaskError(code=code, message=message)
        r.finished_at = time.time()
        return r

    try:
        record = await transition(parts.store, task_id, mutate)
    except (TransitionConflict, NotFound) as e:
        log.info("task %s not failed: %s", task_id, e)
        return
    parts.metrics.tasks.labels(queue=parts.queue.name, state="failed").inc()
    await _notify(parts, record, EventType.FAILED)


async def _notify(parts: Parts, record: TaskRecord, kind: EventType) -> None:
    urls = [parts.storage.location(k) for k in (record.result.images if record.result else [])]
    event = TaskEvent(
        type=kind,
        task_id=record.id,
        tenant=record.tenant,
        state=record.state,
        progress=record.progress,
        result=record.result,
        image_urls=urls,
        error=record.error,
        context=record.task.context,
    )
    for notifier in parts.notifiers:
        try:
            await ride_out(
                partial(notifier.notify, record, event), f"notifying {record.id}", parts.fleet.retry.lease_s
            )
        except SdfleetError as e:  # a lost notification must not undo a finished task
            log.error("notification of %s via %s failed: %s", record.id, type(notifier).__name__, e)
