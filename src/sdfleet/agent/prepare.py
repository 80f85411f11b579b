"""A received delivery → a ``Prepared`` task: decoded, checked against its record, inputs fetched.

Runs while the runtime is still busy with the previous task, so the GPU never waits on the network.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace

from sdfleet.agent.decode import decode_task
from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.records import fail, notify_if_cancelled_unrun
from sdfleet.bus.base import Delivery
from sdfleet.errors import InputFetchError, MessageDecodeError
from sdfleet.routing import ATTR_ENQUEUED_AT
from sdfleet.tasks import Task, TaskRecord, TaskState
from sdfleet.telemetry import extract, tracer

log = logging.getLogger(__name__)


async def prepare(parts: Parts, h: DeliveryHandle) -> Prepared | None:
    """None when the delivery needed no run and is already settled."""
    d = h.delivery
    try:
        task = decode_task(d.body, d.attributes)
    except MessageDecodeError as e:
        # Released, not acked: after max_receives the bus moves it to the DLQ for a human to see.
        log.error("undecodable message %s on %s: %s", d.message_id, d.queue, e)
        await h.release()
        return None
    span = tracer().start_span("agent.task", context=extract(d.attributes))
    span.set_attributes(
        {"sdfleet.task_id": task.id, "sdfleet.queue": d.queue, "sdfleet.receive": d.receive_count}
    )
    _queue_wait_span(span, d)
    prepared = await _checked(parts, h, task, span)
    if prepared is None:
        span.end()
    return prepared


def _queue_wait_span(parent: trace.Span, d: Delivery) -> None:
    enqueued = _enqueued_at(d)
    ctx = trace.set_span_in_context(parent)
    tracer().start_span("queue.wait", context=ctx, start_time=int(enqueued * 1e9)).end()


async def _checked(parts: Parts, h: DeliveryHandle, task: Task, span: trace.Span) -> Prepared | None:
    d = h.delivery
    record = await parts.store.get(task.tenant, task.id)
    if record is None:
        # Published by the seed's Lambda or another producer, or by an API that has not written
        # (or never will write) the record yet: adopt it, keeping the queue the API routed it to.
        adopted = task if task.queue else task.model_copy(update={"queue": d.queue})
        record, _ = await parts.store.create(TaskRecord(task=adopted))
    reason = _skip_reason(record, d)
    if reason is not None:
        log.info("task %s: %s: dropping this delivery", task.id, reason)
        await notify_if_cancelled_unrun(parts, record)
        await h.ack()
        return None
    p = Prepared(handle=h, task=record.task, inputs=[], span=span)
    p.timings["queue_wait"] = max(0.0, time.time() - _enqueued_at(d))
    t0 = time.perf_counter()
    try:
        with p.stage("inputs.fetch"):
            p.inputs = [await parts.fetcher.fetch(url) for url in task.params.init_images]
    except InputFetchError as e:
        await fail(parts, task.tenant, task.id, e.code, e.message or str(e))
        await h.ack()
        return None
    p.timings["inputs_fetch"] = time.perf_counter() - t0
    return p


def _skip_reason(record: TaskRecord, d: Delivery) -> str | None:
    if record.state.terminal:
        return f"already {record.state}"
    if record.task.queue not in (None, d.queue):
        # Overlapping filter policies fanned the task out; it runs on the queue it was routed to.
        return f"routed to queue {record.task.queue}, this copy came on {d.queue}"
    if record.state is TaskState.RUNNING and d.receive_count <= 1:
        # A second copy of a task another agent is running (a re-published submit). A task whose
        # agent died comes back as a redelivery, with a receive count of 2 or more.
        return f"already running on {record.worker}"
    return None


def _enqueued_at(d: Delivery) -> float:
    try:
        return float(d.attributes.get(ATTR_ENQUEUED_AT, d.sent_at))
    except ValueError:
        return d.sent_at
