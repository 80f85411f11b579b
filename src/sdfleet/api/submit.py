"""Accepting a task: validate against the fleet, record it, publish it. Shared by every wire format."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from opentelemetry import trace

from sdfleet.api.auth import Caller
from sdfleet.api.deps import ApiContext
from sdfleet.errors import Conflict, InputFetchError, NotFound, ValidationFailed
from sdfleet.guarded_http import check_url
from sdfleet.models.catalog import default_model
from sdfleet.routing import resolve_queues, stamp, task_attributes
from sdfleet.tasks import Task, TaskRecord, TaskState, TaskType
from sdfleet.telemetry import extract, inject, tracer, xray_trace_id

log = logging.getLogger(__name__)

NEEDS_PROMPT = (TaskType.TEXT_TO_IMAGE,)
NEEDS_IMAGE = (TaskType.IMAGE_TO_IMAGE, TaskType.EXTRA_SINGLE_IMAGE, TaskType.EXTRA_BATCH_IMAGES)


def check_task(ctx: ApiContext, task: Task) -> None:
    """What the fleet allows, beyond what the models themselves check."""
    p, s = task.params, ctx.settings
    if p.width > s.max_width or p.height > s.max_height:
        raise ValidationFailed(
            f"size {p.width}x{p.height} is over the maximum {s.max_width}x{s.max_height}", code="too_large"
        )
    if task.type in NEEDS_PROMPT and not p.prompt.strip():
        raise ValidationFailed(f"a {task.type.value} task needs a prompt", code="missing_prompt")
    if task.type in NEEDS_IMAGE and not p.init_images:
        raise ValidationFailed(f"a {task.type.value} task needs an input image", code="missing_image")
    if task.type is TaskType.PIPELINE and not p.workflow:
        raise ValidationFailed("a pipeline task needs a workflow", code="missing_workflow")
    model = task.model or default_model(ctx.fleet.models.default, ctx.catalog)
    if model and ctx.catalog is not None and ctx.catalog.list():
        try:
            ctx.catalog.resolve(model)
        except NotFound as e:
            raise ValidationFailed(str(e), code="unknown_model") from e


async def check_webhook(ctx: ApiContext, task: Task) -> None:
    """The SSRF guard agents apply before each delivery, applied once more here so a client
    learns at once that its webhook URL will never be called."""
    if task.webhook is None:
        return
    try:
        await asyncio.to_thread(check_url, task.webhook.url, allow_private=ctx.webhook.allow_private)
    except InputFetchError as e:
        raise ValidationFailed(f"webhook URL refused: {e.message or e}", code="bad_webhook") from e


async def submit(
    ctx: ApiContext, caller: Caller, task: Task, headers: Mapping[str, str] | None = None
) -> tuple[TaskRecord, bool]:
    """Returns (record, accepted now). A repeated client id of the same tenant returns the first
    record (and publishes it again while it is still queued).

    ``api.submit`` is the root of the task's trace, or continues the trace the request's
    ``headers`` carry (``traceparent``, else ``X-Amzn-Trace-Id`` from API Gateway or an X-Ray SDK).
    """
    context = extract(headers or {})
    with tracer().start_as_current_span("api.submit", context=context) as span:
        span.set_attribute("sdfleet.task_id", task.id)
        span.set_attribute("sdfleet.tenant", caller.tenant)
        record, created = await _submit(ctx, caller, task)
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


async def _submit(ctx: ApiContext, caller: Caller, task: Task) -> tuple[TaskRecord, bool]:
    task = task.model_copy(update={"tenant": caller.tenant})
    if task.model is None:  # stamped, so routing on sd_model_checkpoint and the record see it
        task.model = default_model(ctx.fleet.models.default, ctx.catalog)
    check_task(ctx, task)
    await check_webhook(ctx, task)
    attributes = task_attributes(task, tier=caller.tier)
    queues = resolve_queues(ctx.fleet, task, attributes)
    task.queue = task.queue or queues[0]
    _cap_timeout(ctx, task)
    existing = await ctx.store.get(task.id)
    if existing is not None:
        return await _repeated(ctx, caller, existing), False
    # Publish first, record second: if the API dies in between, the agent that receives the task
    # creates its record (as for tasks the seed's Lambda publishes), so a 202 is never an orphan.
    # A failed publish leaves nothing behind and the client gets a 503 to retry.
    await ctx.bus.publish(ctx.fleet.tasks_topic, task.to_message(), inject(stamp(attributes)))
    record, created = await ctx.store.create(TaskRecord(task=task))
    if not created and record.tenant != caller.tenant:  # another tenant took the id meanwhile
        raise Conflict(f"task id {task.id!r} is taken; choose another id")
    ctx.metrics.submitted.labels(queue=task.queue, origin=task.origin.value).inc()
    return record, True


def _cap_timeout(ctx: ApiContext, task: Task) -> None:
    """At most the queue's ``task_timeout_s``: what its workers' drain on scale-in is sized for."""
    q = ctx.fleet.queue(task.queue or "")
    if q is not None and (task.timeout_s is None or task.timeout_s > q.task_timeout_s):
        task.timeout_s = q.task_timeout_s


async def _repeated(ctx: ApiContext, caller: Caller, record: TaskRecord) -> TaskRecord:
    """A client id seen before: the same tenant gets the first record (idempotency key)."""
    if record.tenant != caller.tenant:
        raise Conflict(f"task id {record.id!r} is taken; choose another id")
    if record.state is TaskState.QUEUED:
        # The client is retrying, maybe because its answer was lost: publish again. A second copy
        # is harmless (agents drop copies of running or finished tasks).
        attrs = task_attributes(record.task, tier=caller.tier)
        await ctx.bus.publish(ctx.fleet.tasks_topic, record.task.to_message(), inject(stamp(attrs)))
    return record
