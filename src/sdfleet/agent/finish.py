"""The finish stage: one task's outcome → stored images, its record, notifications, and the ack.

Runs concurrently with the next runtime call. Every path settles the delivery exactly once (ack,
or release for a retry) and leaves the record in a state that tells the client what happened; the
ack always follows the stored images and record, so a crash anywhere means a redelivery. A task
another agent took over (this one's lease lapsed) writes nothing and leaves its stale delivery to
the bus: its result is the other agent's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from functools import partial
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import StatusCode
from PIL import Image

from sdfleet.agent.backoff import input_retry_delay
from sdfleet.agent.execute import Outcome
from sdfleet.agent.outage import ride_out
from sdfleet.agent.parts import Parts, Prepared, output_keys
from sdfleet.agent.records import acknowledge, fail, notify, ours, requeue, taken_over
from sdfleet.agent.tasklog import task_event
from sdfleet.compat.out import SEED_ORIGINS, succeeded_out
from sdfleet.errors import InputUnavailable, Interrupted, Reject, SdfleetError, TakenOver, TransitionConflict
from sdfleet.media import reencode, sniff
from sdfleet.runtimes.base import RuntimeResult
from sdfleet.store.base import transition
from sdfleet.tasks import EventType, TaskRecord, TaskResult, TaskState

log = logging.getLogger(__name__)


async def finish(parts: Parts, p: Prepared, outcome: Outcome) -> None:
    """Settle a task that ran; ends its ``agent.task`` span."""
    try:
        # current span while it finishes, so log lines carry its trace id and task id
        with trace.use_span(p.span, end_on_exit=False):
            await _finish(parts, p, outcome)
    finally:
        p.span.end()


async def _finish(parts: Parts, p: Prepared, outcome: Outcome) -> None:
    try:
        if p.taken_over:  # seen by the cancel watch: not even its images are stored
            raise taken_over(p.task.id, p.taken_over)
        await _settle(parts, p, outcome)
    except TakenOver as e:
        _event(p, "dropped", reason=str(e))
        await p.handle.abandon()


async def _settle(parts: Parts, p: Prepared, outcome: Outcome) -> None:
    task = p.task
    if isinstance(outcome, RuntimeResult) and not p.cancelled:
        outcome = await _in_output_format(parts, p, outcome)
    if isinstance(outcome, RuntimeResult) and not p.cancelled:
        await _succeed(parts, p, outcome)
    elif isinstance(outcome, Interrupted | RuntimeResult):  # a cancelled task may still complete
        await _interrupted(parts, p)
    elif isinstance(outcome, Reject):
        p.span.set_status(StatusCode.ERROR, outcome.reason)
        failed = await fail(parts, task.tenant, task.id, outcome.code, outcome.reason, ran=True)
        if not failed and await _cancelled_meanwhile(parts, p):
            return
        _event(p, "failed", code=outcome.code, reason=outcome.reason, retry=False)
        await acknowledge(parts, p)
    elif isinstance(outcome, SdfleetError):
        # an input the runtime fetched itself that may come back: backed off, as in prepare
        unavailable = outcome if isinstance(outcome, InputUnavailable) else None
        message = outcome.message or str(outcome)
        await _retry_or_fail(parts, p, outcome.code, message, unavailable=unavailable)
    else:  # a runtime bug must not kill the agent; it counts as a failed attempt
        log.error("task %s: unexpected error", task.id, exc_info=outcome)
        await _retry_or_fail(parts, p, "runtime_failure", f"{type(outcome).__name__}: {outcome}")


def _event(p: Prepared, event: str, **fields: Any) -> None:
    task_event(p.task.id, p.delivery.queue, p.span, event, **fields)


async def _store_outputs(parts: Parts, p: Prepared, result: RuntimeResult) -> TaskResult:
    """Upload the images and the ``.out``, riding out a storage outage for up to a lease (the
    images are worth it: giving up runs the generation again)."""
    task = p.task
    keys, out_key = output_keys(task, result.images)
    with p.stage("storage.put", timing="storage_put"):
        info = {**result.info, "images": [parts.storage.location(k) for k in keys], "task_id": task.id}
        if task.origin in SEED_ORIGINS:  # what a backend built for the seed reads
            info["parameters"] = succeeded_out(task, result.info, result.seed, len(keys))
        out = json.dumps(info, indent=2).encode()
        blobs = [(k, data, sniff(data).mime) for k, data in zip(keys, result.images, strict=True)]
        blobs.append((out_key, out, "application/json"))

        async def put_all() -> None:  # the same keys on every try: a retry overwrites, not adds
            await asyncio.gather(*(parts.storage.put(*blob) for blob in blobs))

        await ride_out(put_all, f"storing {task.id}", parts.fleet.retry.lease_s)
    parts.metrics.observe_stages(parts.queue.name, {"storage_put": p.timings["storage_put"]})
    return TaskResult(images=keys, output=out_key, seed=result.seed, timings=dict(p.timings))


async def _in_output_format(parts: Parts, p: Prepared, result: RuntimeResult) -> RuntimeResult | Reject:
    """The result with its images in the task's ``output_format``, else its queue's (timed as
    ``encode``), encoded in a thread so the event loop keeps feeding the runtime; a ``Reject`` for
    images that cannot be (an image the runtime made that does not decode: running it again makes
    no better)."""
    fmt = p.task.params.output_format or parts.queue.output_format
    quality = p.task.params.output_quality
    if fmt is None:
        return result
    try:
        with p.stage("encode", timing="encode"):
            images = await asyncio.to_thread(lambda: [reencode(data, fmt, quality) for data in result.images])
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return Reject(f"the images could not be encoded as {fmt}: {e}", code="output_format_failed")
    parts.metrics.observe_stages(parts.queue.name, {"encode": p.timings["encode"]})
    return dataclasses.replace(result, images=images)


async def _succeed(parts: Parts, p: Prepared, result: RuntimeResult) -> None:
    task = p.task
    try:
        res = await _store_outputs(parts, p, result)
    except SdfleetError as e:
        # Refused (a missing bucket, no permission, a full disk) or down past a lease: a failed
        # attempt, so the record does not stay ``running`` behind a message that ran out of tries.
        # Clients get the error's type only: its text names buckets and hosts.
        log.error("task %s: storing its images failed: %s", task.id, e)
        message = f"the images could not be stored ({type(e).__name__}; see the agent's log)"
        await _retry_or_fail(parts, p, "storage_error", message)
        return

    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is TaskState.SUCCEEDED and r.result == res:
            return None  # our own write, applied by a server that went away before it replied
        ours(r, parts)
        r.state, r.result, r.progress, r.error = TaskState.SUCCEEDED, res, 1.0, None
        r.finished_at = time.time()
        return r

    lease_s = parts.fleet.retry.lease_s
    record_it = partial(transition, parts.store, task.tenant, task.id, mutate, current=p.record)
    try:
        record = await ride_out(record_it, f"recording {task.id}", lease_s)
    except TakenOver:
        raise
    except TransitionConflict as e:  # cancelled (or finished elsewhere) meanwhile: no second result
        if await _cancelled_meanwhile(parts, p):
            return
        log.info("task %s finished but not recorded: %s", task.id, e)
        await p.handle.ack()
        return
    p.record = record
    _event(p, "succeeded", images=len(res.images), timings=res.timings)
    parts.metrics.tasks.labels(queue=parts.queue.name, state="succeeded").inc()
    with p.stage("notify"):
        await notify(parts, record, EventType.SUCCEEDED)
    await acknowledge(parts, p)


async def _interrupted(parts: Parts, p: Prepared, record: TaskRecord | None = None) -> None:
    if p.cancelled:  # the API already wrote the terminal state; tell the subscribers
        _event(p, "cancelled")
        record = record or await parts.store.get(p.task.tenant, p.task.id)
        if record is not None:
            await notify(parts, record, EventType.CANCELLED)
        await acknowledge(parts, p)
        return
    reason = "agent shut down before the task finished"
    written = await requeue(parts, p.task.tenant, p.task.id, "interrupted", reason)
    if not written and await _cancelled_meanwhile(parts, p):
        return
    _event(p, "requeued", code="interrupted", reason=reason)
    await p.handle.release()


async def _cancelled_meanwhile(parts: Parts, p: Prepared) -> bool:
    """A run that ended (images, a failure, a shutdown) after the API wrote its cancel but before
    the cancel watch read it (within ``agent.cancel_check_s``) is settled as cancelled: its
    subscribers are told, and its message is acked, not handed back. False: not cancelled."""
    read = partial(parts.store.get, p.task.tenant, p.task.id)
    record = await ride_out(read, f"reading {p.task.id}", parts.fleet.retry.lease_s)
    if record is None or record.state is not TaskState.CANCELLED:
        return False
    p.cancelled = True
    await _interrupted(parts, p, record)
    return True


async def _retry_or_fail(
    parts: Parts, p: Prepared, code: str, message: str, *, unavailable: InputUnavailable | None = None
) -> None:
    """A failed attempt: requeued and released for another try after ``agent.retry_delay_s``
    (``unavailable``: after ``input_retry_delay``, 1, 2, 4 … s or the server's ``Retry-After``),
    or on the last receive failed and left to the dead-letter queue."""
    d = p.delivery
    p.span.set_status(StatusCode.ERROR, message)
    last = d.receive_count >= parts.fleet.retry.max_receives
    if last:
        reason = f"{message} (after {d.receive_count} attempts)"
        written = await fail(parts, p.task.tenant, p.task.id, code, reason, ran=True)
    else:
        written = await requeue(parts, p.task.tenant, p.task.id, code, message)
    if not written and await _cancelled_meanwhile(parts, p):
        return
    delay_s = parts.settings.retry_delay_s
    if unavailable is not None:
        delay_s = input_retry_delay(d.receive_count, delay_s, unavailable.retry_after_s)
    fields = {"code": code, "reason": message, "attempt": d.receive_count}
    if last:
        _event(p, "failed", level=logging.WARNING, **fields)
    else:
        _event(p, "requeued", level=logging.WARNING, delay_s=delay_s, **fields)
    # A last attempt is not acked either: the bus moves a message that used up its receives to
    # the dead-letter queue.
    await p.handle.release(0.0 if last else delay_s)
