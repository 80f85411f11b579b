"""Accepting a task: validate against the fleet, admit it, publish it, record it. Shared by every
wire format.

Ids are per tenant. A task with a server id is published first and recorded second: if the API
dies in between, the agent that receives it creates its record, so a 202 is never an orphan, and
a failed publish leaves nothing behind. A client id is an idempotency key, so two submits of one
id must not both publish: the first takes a short claim on ``<tenant>/<id>`` in the access store,
looks once more for a record, and only then publishes; the other waits for the winner's record
and answers with it. A repeated submit of a still-queued task publishes it again at most once per
lease period (``retry.lease_s``), decided by compare-and-set on the record's ``published_at``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from opentelemetry import trace

from sdfleet.api.admission import admit, check_priority
from sdfleet.api.auth import Caller
from sdfleet.api.checks import check_task, check_webhook
from sdfleet.api.deps import ApiContext
from sdfleet.errors import BusUnavailable, Conflict, NotFound, Reject, SdfleetError, ValidationFailed
from sdfleet.models.catalog import default_model
from sdfleet.routing import resolve_queues, stamp, task_attributes
from sdfleet.runtimes.unsupported import refuse
from sdfleet.store.base import reopen, reopened
from sdfleet.tasks import Task, TaskRecord, TaskState, TaskType
from sdfleet.telemetry import extract, inject, xray_trace_id

log = logging.getLogger(__name__)

CLAIM_TTL_S = 30.0
"""How long a claim on a client id holds if its submit never ends (the API died)."""
WINNER_WAIT_S = 2.0
"""How long the loser of a race on a client id waits for the winner's record."""


async def submit(
    ctx: ApiContext,
    caller: Caller,
    task: Task,
    headers: Mapping[str, str] | None = None,
    *,
    rerun_finished: bool = False,
) -> tuple[TaskRecord, bool]:
    """Returns (record, accepted now). A client id (``id`` set on ``task``) the tenant used before
    returns the first record, accepted earlier; with ``rerun_finished`` (the seed formats: the
    seed runs every POST anew) one whose task finished runs again, as its next run (``Task.run``).

    ``api.submit`` is the root of the task's trace, or continues the trace the request's
    ``headers`` carry (``traceparent``, else ``X-Amzn-Trace-Id`` from API Gateway or an X-Ray SDK).
    """
    context = extract(headers or {})
    with ctx.tracer.start_as_current_span("api.submit", context=context) as span:
        span.set_attribute("sdfleet.task_id", task.id)
        span.set_attribute("sdfleet.tenant", caller.tenant)
        record, created = await _submit(ctx, caller, task, rerun_finished)
        span.set_attribute("sdfleet.queue", record.task.queue or "")
        if created:
            _log_queued(record, span)
        return record, created


def _log_queued(record: TaskRecord, span: trace.Span) -> None:
    """The first line of a task's story (the agent logs the rest, see ``agent.tasklog``)."""
    extra = {"task_id": record.id, "queue": record.task.queue, "event": "queued"}
    ids = span.get_span_context()
    if ids.is_valid:
        extra.update(trace_id=format(ids.trace_id, "032x"), xray_trace_id=xray_trace_id(ids.trace_id))
    log.info(
        "task %s queued (queue=%s, origin=%s)", record.id, record.task.queue, record.task.origin, extra=extra
    )


async def _submit(ctx: ApiContext, caller: Caller, task: Task, rerun: bool) -> tuple[TaskRecord, bool]:
    client_id = "id" in task.model_fields_set
    task = task.model_copy(update={"tenant": caller.tenant})
    if task.model is None:  # stamped, so routing on sd_model_checkpoint and the record see it
        task.model = default_model(ctx.fleet.models.default, ctx.catalog)
    if task.type is TaskType.IMAGE_TO_IMAGE and len(task.params.init_images) > 1:
        # One batch item per input, item i from input i, so the record says how many images come.
        # SD WebUI makes its batch as large as the inputs too, but refuses more inputs than
        # batch_size; here the batch grows to them (a rule no request schema can state).
        task.params.batch_size = len(task.params.init_images)
    check_task(ctx, task)
    check_priority(caller, task)
    await check_webhook(ctx, task)
    attributes = task_attributes(task, tier=caller.tier)
    queues = resolve_queues(ctx.fleet, task, attributes, ctx.topology)
    task.queue = task.queue or queues[0]
    _refuse_unsupported(ctx, task)
    _cap_timeout(ctx, task)
    if not client_id:
        await admit(ctx, caller)
        return await _publish_and_record(ctx, task, attributes), True
    existing = await ctx.store.get(task.tenant, task.id)
    if existing is not None and not (rerun and _runs_again(existing, task)):
        return await _repeated(ctx, caller, existing), False
    await admit(ctx, caller)
    return await _claimed(ctx, caller, task, attributes, rerun)


def _runs_again(existing: TaskRecord, task: Task) -> bool:
    """A seed-format id whose task finished, sent again in the same format: its next run."""
    return existing.state.terminal and existing.task.origin is task.origin


def _refuse_unsupported(ctx: ApiContext, task: Task) -> None:
    """What the queue's runtime would fail the task on (a task type it does not run; diffusers:
    hires fix, scripts, ``n_iter``, a sampler it lacks...): a 422 now, not a failed task later."""
    queue = ctx.fleet.queue(task.queue or "")
    if queue is None:
        return
    try:
        refuse(queue.runtime, task.type, task.params)
    except Reject as e:
        raise ValidationFailed(f"queue {queue.name!r}: {e.reason}", code=e.code) from None


async def _claimed(
    ctx: ApiContext, caller: Caller, task: Task, attributes: dict[str, str], rerun: bool
) -> tuple[TaskRecord, bool]:
    name = f"{task.tenant}/{task.id}"
    if not await ctx.access.claim(name, CLAIM_TTL_S):
        return await _winners_record(ctx, task), False
    try:
        # The previous holder may have recorded the task and released its claim just before.
        existing = await ctx.store.get(task.tenant, task.id)
        if existing is not None and rerun and _runs_again(existing, task):
            return await _publish_and_reopen(ctx, existing, task, attributes), True
        if existing is not None:
            return await _repeated(ctx, caller, existing), False
        return await _publish_and_record(ctx, task, attributes), True
    finally:
        try:
            await ctx.access.release(name)
        except SdfleetError as e:  # it expires by itself
            log.warning("claim %s not released: %s", name, e)


async def _publish_and_record(ctx: ApiContext, task: Task, attributes: dict[str, str]) -> TaskRecord:
    now = time.time()
    await _publish(ctx, task.to_message(), inject(stamp(attributes)))
    # Not created: an agent received the message first and adopted the task; it is this one.
    record, _ = await ctx.store.create(TaskRecord(task=task, published_at=now))
    ctx.metrics.submitted.labels(queue=task.queue, origin=task.origin.value).inc()
    return record


async def _publish_and_reopen(
    ctx: ApiContext, finished: TaskRecord, task: Task, attributes: dict[str, str]
) -> TaskRecord:
    """``task``, sent again with the id of ``finished``, published as that id's next run and its
    record reopened for it. Published first, as a new task is: an agent that receives the message
    before the record is reopened reopens it itself (``agent.prepare``): its record is this run's."""
    task = task.model_copy(update={"run": finished.task.run + 1})
    now = time.time()
    await _publish(ctx, task.to_message(), inject(stamp(attributes)))
    ctx.metrics.submitted.labels(queue=task.queue, origin=task.origin.value).inc()
    record = await reopen(ctx.store, finished, task, published_at=now)
    return record or reopened(finished, task, published_at=now)  # gone meanwhile: as published


async def _publish(ctx: ApiContext, message: bytes, attributes: dict[str, str]) -> None:
    """Publish to the tasks topic. A topic the engine lost (a Redis restarted empty) is put back
    and the publish tried once more; missing still, it is a 503 (an outage), never a 404."""
    topic = ctx.fleet.tasks_topic
    for attempt in (1, 2):
        try:
            await ctx.bus.publish(topic, message, attributes)
            return
        except NotFound as e:
            if attempt == 2:
                raise BusUnavailable(f"{e.message}; run `sdfleet ensure`") from e
            await ctx.keeper.restore(e)


async def _winners_record(ctx: ApiContext, task: Task) -> TaskRecord:
    """The record of the concurrent submit that holds the claim on ``task``'s id."""
    deadline = time.monotonic() + WINNER_WAIT_S
    delay = 0.01
    while time.monotonic() < deadline:
        await asyncio.sleep(delay)
        record = await ctx.store.get(task.tenant, task.id)
        if record is not None:
            return record
        delay = min(delay * 2, 0.2)
    raise Conflict(f"task id {task.id!r} is being submitted by another request; retry", code="id_busy")


def _due(ctx: ApiContext, record: TaskRecord, now: float) -> bool:
    last = record.published_at if record.published_at is not None else record.task.created_at
    return now - last >= ctx.fleet.retry.lease_s


def _cap_timeout(ctx: ApiContext, task: Task) -> None:
    """At most the queue's ``task_timeout_s``: what its workers' drain on scale-in is sized for."""
    q = ctx.fleet.queue(task.queue or "")
    if q is not None and (task.timeout_s is None or task.timeout_s > q.task_timeout_s):
        task.timeout_s = q.task_timeout_s


async def _repeated(ctx: ApiContext, caller: Caller, record: TaskRecord) -> TaskRecord:
    """A client id seen before: the first record. While it is still queued the client may be
    retrying because the task was lost on the way (its publish or its message): publish again,
    at most once per lease period across every replica."""
    now = time.time()
    if record.state is not TaskState.QUEUED or not _due(ctx, record, now):
        return record
    marked = record.model_copy(update={"published_at": now, "version": record.version + 1, "updated_at": now})
    if not await ctx.store.compare_and_set(marked, record.version):
        return await ctx.store.get(record.tenant, record.id) or record  # another replica did it
    attrs = task_attributes(record.task, tier=caller.tier)
    try:
        await ctx.bus.publish(ctx.fleet.tasks_topic, record.task.to_message(), inject(stamp(attrs)))
    except SdfleetError:
        # Not published after all: let the client's next retry publish, not one a lease later.
        undone = marked.model_copy(
            update={"published_at": record.published_at, "version": marked.version + 1}
        )
        try:
            await ctx.store.compare_and_set(undone, marked.version)
        except SdfleetError as e:
            log.warning("task %s: publish time not reset: %s", record.id, e)
        raise
    return marked
