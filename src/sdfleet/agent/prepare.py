"""A received delivery → a ``Prepared`` task: decoded, checked against its record and its
``ttl_s`` (``expiry``), inputs fetched.

Runs while the runtime is still busy with the previous task, so the GPU never waits on the network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import StatusCode

from sdfleet.agent.backoff import input_retry_delay
from sdfleet.agent.defer import defer, held_by_another_run, other_publish, unended_other_publish
from sdfleet.agent.expiry import expire, overdue, start_by
from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.records import ack_when_told, cancelled_unrun, elsewhere, fail, notify
from sdfleet.agent.tasklog import task_event
from sdfleet.bus.base import Delivery
from sdfleet.errors import InputFetchError, InputUnavailable, MessageDecodeError, SdfleetError
from sdfleet.messages import Decoded, decode_delivery, decode_task
from sdfleet.routing import enqueued_at
from sdfleet.store.base import reopen, transition
from sdfleet.tasks import EventType, Task, TaskError, TaskRecord, TaskState, TaskType
from sdfleet.telemetry import SQS_TRACE_ATTRIBUTE, extract, tracer

log = logging.getLogger(__name__)


async def decode_or_settle(parts: Parts, h: DeliveryHandle) -> Decoded | None:
    """The delivery's message, decoded; None, the delivery settled, when it is not a task."""
    d = h.delivery
    try:
        return decode_delivery(d)
    except MessageDecodeError as e:
        # Released, not acked: after max_receives the bus moves it to the DLQ for a human to see
        # (or, on a queue without one, it is deleted with its body in the log).
        log.error("undecodable message %s on %s: %s", d.message_id, d.queue, e)
        if not await drop_if_no_dead_letter_queue(parts, h, str(e)):
            await h.release()
        return None


async def check(
    parts: Parts, h: DeliveryHandle, m: Decoded, stopping: asyncio.Event | None = None
) -> Prepared | None:
    """The decoded delivery checked against its record, its inputs fetched; None when it needed
    no run and is already settled. ``stopping``: the agent's shutdown, which ends a wait in hand
    for another publish's run of its id (``defer.outwait``)."""
    d, task = h.delivery, m.task
    span = tracer().start_span("agent.task", context=trace_context(d, m.attributes))
    span.set_attributes(
        {"sdfleet.task_id": task.id, "sdfleet.queue": d.queue, "sdfleet.receive": d.receive_count}
    )
    _queue_wait_span(span, d, task.id)
    prepared = await _checked(parts, h, m, span, stopping)
    if prepared is None:
        span.end()
    return prepared


async def drop_if_no_dead_letter_queue(parts: Parts, h: DeliveryHandle, reason: str) -> bool:
    """Delete a delivery that failed on its last receive (``retry.max_receives``) where the queue
    has no dead-letter queue to move it to (an attached SQS queue such as the seed's): released,
    it would come back forever and keep the queue's depth, and so a worker, up. The seed's own
    agent deletes such messages too; this one logs the message first. True when deleted."""
    d = h.delivery
    if d.receive_count < parts.fleet.retry.max_receives:
        return False
    try:
        if (await parts.bus.stats(d.queue)).dead_letter_queue:
            return False
    except SdfleetError as e:  # cannot tell: released, as anywhere else
        log.warning("could not read %s's attributes: %s", d.queue, e)
        return False
    log.error(
        "deleted message %s from %s after %d receives: %s; the queue has no dead-letter queue "
        "(give it a RedrivePolicy to keep such messages); body: %r",
        d.message_id,
        d.queue,
        d.receive_count,
        reason,
        d.body[:2000],
    )
    try:
        await h.ack()
    except SdfleetError as e:  # it comes back, and this is tried again
        log.warning("could not delete %s: %s", d.message_id, e)
        return False
    return True


async def fail_unprepared(parts: Parts, d: Delivery, error: Exception) -> None:
    """A delivery ``prepare`` raised on (a record the store would not give, a bug): on its last
    receive the task is marked failed, so its record does not stay ``queued`` while the message
    sits in the dead-letter queue; before that it is only retried. Errors here are logged: the
    delivery is released either way."""
    if d.receive_count < parts.fleet.retry.max_receives:
        return
    try:
        task = decode_task(d.body, d.attributes)
    except MessageDecodeError:
        return
    # The error's type only: its text may name engines and hosts, which clients are not told.
    what = f"{type(error).__name__}; see its log"
    message = f"the agent could not prepare the task ({what}) (after {d.receive_count} attempts)"
    queued = task if task.queue else task.model_copy(update={"queue": d.queue})
    try:
        await fail(parts, task.tenant, task.id, "prepare_failed", message, task=queued)
    except Exception as e:  # the store itself may be what failed
        log.warning("could not mark %s failed: %s", task.id, e)


def trace_context(d: Delivery, attributes: Mapping[str, str]) -> Context:
    """The trace a delivery continues: the ``traceparent`` the API put in its attributes (inside
    the SNS envelope too, for a queue subscribed without raw delivery), else the X-Ray header SQS
    keeps as the ``AWSTraceHeader`` system attribute (API Gateway → Lambda → SNS → SQS, the
    seed's path, with active tracing on), else none: a new trace. ``attributes``: the message's
    own, already out of its envelope (``Decoded.attributes``)."""
    attributes = dict(attributes)
    attributes.pop(SQS_TRACE_ATTRIBUTE, None)  # only SQS itself may say it
    header = (d.raw.get("Attributes") or {}).get(SQS_TRACE_ATTRIBUTE)
    if isinstance(header, str):
        attributes[SQS_TRACE_ATTRIBUTE] = header
    return extract(attributes)


def _queue_wait_span(parent: trace.Span, d: Delivery, task_id: str) -> None:
    enqueued = _enqueued_at(d)
    ctx = trace.set_span_in_context(parent)
    span = tracer().start_span("queue.wait", context=ctx, start_time=int(enqueued * 1e9))
    span.set_attributes({"sdfleet.task_id": task_id, "sdfleet.queue": d.queue})
    span.end()


async def _checked(
    parts: Parts, h: DeliveryHandle, m: Decoded, span: trace.Span, stopping: asyncio.Event | None
) -> Prepared | None:
    d, task, ours, publish = h.delivery, m.task, m.ours, m.publish
    # None: published by the seed's Lambda or another producer, or by an API that has not written
    # the record yet; the agent creates it as the task starts (``begin``).
    record = await parts.store.get(task.tenant, task.id)
    if record is not None:
        task = task if ours else _numbered(task, record, d, publish)
        held = None if ours else unended_other_publish(record, d, publish)
        reason = _skip_reason(record, task, d) if held is None else None
        if not ours and publish in record.earlier_publishes:  # SNS's late duplicate
            held, reason = None, "a copy of an earlier run's publish"
        if reason is None and held is None and task.run > record.task.run:
            if task.queue is None:  # a seed message's next run keeps the queue it came on, as its first
                task = task.model_copy(update={"queue": d.queue})
            current = await reopen(parts.store, record, task, message_id=publish)
            # Another publish of the id may have reopened it first: its run, not this one.
            held = None if ours or current is None else other_publish(current, d, publish)
            record = current if current is not None and current.task.run == task.run else None
            reason = None if record is not None else f"run {task.run} was started elsewhere"
        if held is not None:
            still_held = held_by_another_run(parts, d, task.tenant, task.id, publish)
            if await defer(parts, h, task.id, span, held, still_held, stopping):
                return await _checked(parts, h, m, span, stopping)  # that run has ended: as it is now
            return None
        if reason is not None:
            task_event(task.id, d.queue, span, "dropped", reason=reason, receive=d.receive_count)
            if record is not None and task.run == record.task.run and not h.told:
                await _redelivered_result(parts, record, d)
            await ack_when_told(parts, h, task.id)
            return None
    return await _prepared(parts, h, task if record is None else record.task, record, m, span)


async def _prepared(
    parts: Parts, h: DeliveryHandle, task: Task, record: TaskRecord | None, m: Decoded, span: trace.Span
) -> Prepared | None:
    """A task that may run: expired, or its inputs fetched."""
    d = h.delivery
    deadline = start_by(task, record, parts.queue.ttl_s, _enqueued_at(d))
    if overdue(deadline):  # before its inputs are fetched
        assert deadline is not None
        await expire(parts, h, task, deadline, span)
        return None
    p = Prepared(handle=h, task=task, inputs=[], span=span, record=record, numbered=m.ours, publish=m.publish)
    p.start_by = deadline
    p.timings["queue_wait"] = max(0.0, time.time() - _enqueued_at(d))
    try:
        with p.stage("inputs.fetch", timing="inputs_fetch"):
            p.inputs = [await parts.fetcher.fetch(url) for url in task.params.init_images]
            mask = task.params.extra.get("mask") if task.type is TaskType.IMAGE_TO_IMAGE else None
            if isinstance(mask, str) and mask:  # an inpainting mask: a URL, data URL or base64
                p.mask = await parts.fetcher.fetch(mask)
    except InputFetchError as e:
        await _fetch_failed(parts, h, task, record, span, e)
        return None
    task_event(
        task.id, d.queue, span, "received", receive=d.receive_count, queue_wait=p.timings["queue_wait"]
    )
    return p


async def _fetch_failed(
    parts: Parts,
    h: DeliveryHandle,
    task: Task,
    record: TaskRecord | None,
    span: trace.Span,
    e: InputFetchError,
) -> None:
    """An input that could not be fetched. A lasting refusal (HTTP 404, not an image, a refused
    URL) fails the task at once. One that may pass (``InputUnavailable``: a timeout, HTTP 503,
    throttling) is a failed attempt: the delivery is released for a retry, like a failed run's,
    and the task fails on its last receive. So is any failure to fetch for a task another agent
    runs (a takeover after its lease lapsed): that agent had the input and may still finish."""
    d, reason = h.delivery, e.message or str(e)
    span.set_status(StatusCode.ERROR, reason)
    retried = isinstance(e, InputUnavailable) or (record is not None and elsewhere(record, parts))
    if retried and d.receive_count < parts.fleet.retry.max_receives:
        after = e.retry_after_s if isinstance(e, InputUnavailable) else None
        delay_s = input_retry_delay(d.receive_count, parts.settings.retry_delay_s, after)
        event = {"code": e.code, "reason": reason, "attempt": d.receive_count, "delay_s": delay_s}
        task_event(task.id, d.queue, span, "requeued", level=logging.WARNING, **event)
        if record is not None and record.state is TaskState.QUEUED:  # the client sees why it waits
            await _note_error(parts, record, TaskError(code=e.code, message=reason))
        await h.release(delay_s)
        return
    if retried:
        reason = f"{reason} (after {d.receive_count} attempts)"
    queued = task if task.queue else task.model_copy(update={"queue": d.queue})
    task_event(task.id, d.queue, span, "failed", code=e.code, reason=reason, retry=False)
    await fail(parts, task.tenant, task.id, e.code, reason, task=queued)
    # A retried one is released, like a failed run's last attempt, for the dead-letter queue.
    await (h.release(0.0) if retried else ack_when_told(parts, h, task.id))


async def _note_error(parts: Parts, record: TaskRecord, error: TaskError) -> None:
    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is not TaskState.QUEUED:
            return None
        r.error = error
        return r

    try:
        await transition(parts.store, record.task.tenant, record.id, mutate, current=record)
    except SdfleetError as e:  # only the reason shown while it waits is lost
        log.info("task %s: error not noted: %s", record.id, e)


async def _redelivered_result(parts: Parts, record: TaskRecord, d: Delivery) -> None:
    """Subscribers hear of every terminal state at least once: a task cancelled while queued is
    told by the agent that drops it, and a finished task whose delivery comes back (its agent died
    after the record, maybe before the notification) is told again, a run's end or a failure
    before any run (past its ``ttl_s``, an input refused); not when the delivery waited here for
    the one whose run told them (``DeliveryHandle.told``)."""
    if cancelled_unrun(record):
        await notify(parts, record, EventType.CANCELLED)
    elif record.state.terminal and d.receive_count > 1:
        await notify(parts, record, EventType(record.state.value))


def _numbered(task: Task, record: TaskRecord, d: Delivery, publish: str) -> Task:
    """A seed message, numbered: the seed's Lambda publishes every POST anew, so another publish
    for an id whose task finished is that id's next run; the publish that started the finished run
    (a redelivery, a copy) is that run. A record that does not name its publish (written before
    agents kept ``message_id``) goes by the receive count: a first receive is a new publish."""
    if not record.state.terminal:
        return task.model_copy(update={"run": record.task.run})
    if record.message_id is not None:
        new = publish != record.message_id
    else:
        new = d.receive_count <= 1
    return task.model_copy(update={"run": record.task.run + 1 if new else record.task.run})


def _skip_reason(record: TaskRecord, task: Task, d: Delivery) -> str | None:
    if task.run < record.task.run:
        return f"a message of run {task.run}; the task is on run {record.task.run}"
    if task.run > record.task.run:
        # The next run of a finished task is reopened; one of a task still going is not.
        return (
            None
            if record.state.terminal
            else f"run {task.run} of a task {record.state} on run {record.task.run}"
        )
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
    stamped = enqueued_at(d.attributes)
    return d.sent_at if stamped is None else stamped
