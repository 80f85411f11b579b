"""A task's ``ttl_s``: no run starts after it, counted from the submit.

Checked twice: when a delivery is prepared (before its inputs are fetched) and when the run stage
takes it from the ready pool (it may have waited there behind others). An expired task ends
``failed`` with code ``ttl_expired``, its subscribers are told, and its delivery is acked: it never
reaches the runtime. A task that has started a run keeps it (a redelivery after its agent died
continues that run); the limit is on starting.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts
from sdfleet.agent.records import ack_when_told, fail
from sdfleet.agent.tasklog import task_event
from sdfleet.tasks import Task, TaskRecord, TaskState

CODE = "ttl_expired"


def start_by(
    task: Task, record: TaskRecord | None, queue_ttl_s: float | None, enqueued_at: float
) -> float | None:
    """When the task's last chance to start ends (epoch seconds); None: no limit, or a run of it
    has started already (a takeover, which continues that run)."""
    if record is not None and record.state is TaskState.RUNNING:
        return None
    return task.start_by(queue_ttl_s, enqueued_at)


def overdue(deadline: float | None, now: float | None = None) -> bool:
    return deadline is not None and (time.time() if now is None else now) > deadline


async def expire(parts: Parts, h: DeliveryHandle, task: Task, deadline: float, span: trace.Span) -> None:
    """Fail the task unrun with code ``ttl_expired`` (unless it started or ended meanwhile) and ack
    its delivery."""
    d = h.delivery
    ttl_s = task.ttl_or(parts.queue.ttl_s)
    assert ttl_s is not None  # it has a deadline
    late_s = time.time() - deadline
    reason = f"not started within its ttl_s of {ttl_s:g} s from the submit ({late_s:.1f} s late)"
    span.set_status(StatusCode.ERROR, reason)
    task_event(task.id, d.queue, span, CODE, level=logging.WARNING, reason=reason)
    queued = task if task.queue else task.model_copy(update={"queue": d.queue})
    # Only a task no agent has started: a run that began meanwhile is not cut off.
    if await fail(parts, task.tenant, task.id, CODE, reason, task=queued, when=_unstarted):
        parts.metrics.ttl_expired.labels(queue=parts.queue.name).inc()
        h.told = True
    await ack_when_told(parts, h, task.id)


def _unstarted(r: TaskRecord) -> bool:
    return r.state is TaskState.QUEUED
