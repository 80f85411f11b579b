"""Record writes and notifications shared by the agent's stages: fail, requeue, notify."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from functools import partial

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.outage import ride_out
from sdfleet.agent.parts import Parts, Prepared, output_keys
from sdfleet.compat.out import SEED_ORIGINS, failed_out
from sdfleet.errors import NotFound, SdfleetError, TakenOver, TransitionConflict
from sdfleet.store.base import transition
from sdfleet.tasks import EventType, Task, TaskError, TaskEvent, TaskRecord, TaskResult, TaskState

log = logging.getLogger(__name__)


def elsewhere(r: TaskRecord, parts: Parts) -> bool:
    """The record says another agent runs the task."""
    return r.state is TaskState.RUNNING and r.worker != parts.worker_id


def ours(r: TaskRecord, parts: Parts) -> None:
    """Raise ``TakenOver`` when the record says another agent runs the task: the outcome of this
    agent's run is no longer its to write (the other's start came after this one's)."""
    if elsewhere(r, parts):
        raise taken_over(r.id, r.worker)


def taken_over(task_id: str, worker: str | None) -> TakenOver:
    return TakenOver(f"task {task_id} taken over by {worker} after this agent's lease on it lapsed")


async def fail(
    parts: Parts,
    tenant: str,
    task_id: str,
    code: str,
    message: str,
    *,
    task: Task | None = None,
    ran: bool = False,
    when: Callable[[TaskRecord], bool] | None = None,
) -> bool:
    """Mark a task failed with a reason and notify (True); a task already terminal stays as it is.
    ``task``: create its record, failed, if it has none (a task another producer published). A
    task sent in a seed format also gets the seed's failure ``.out``, linked from its notification.
    ``ran``: the failure is of this agent's run, so ``TakenOver`` is raised rather than failing a
    task another agent runs now. ``when``: only a record it holds for fails (checked on the record
    each write attempt reads; e.g. only a task no agent runs now, ``queued``)."""

    tag = secrets.token_hex(2)

    def mutate(r: TaskRecord) -> TaskRecord:
        _may_fail(r, parts, ran=ran, when=when)
        r.state, r.error = TaskState.FAILED, TaskError(code=code, message=message)
        r.finished_at = time.time()
        if r.task.origin in SEED_ORIGINS and (r.result is None or r.result.output is None):
            # The seed writes a .out for a failed task too, and its notification links it.
            r.result = TaskResult(output=output_keys(r.task, [], tag)[1])
        return r

    try:
        try:
            record = await transition(parts.store, tenant, task_id, mutate)
        except NotFound:
            if task is None:
                raise
            record, created = await parts.store.create(mutate(TaskRecord(task=task)))
            if not created:
                record = await transition(parts.store, tenant, task_id, mutate)
    except TakenOver:
        raise
    except (TransitionConflict, NotFound) as e:
        log.info("task %s not failed: %s", task_id, e)
        return False
    parts.metrics.tasks.labels(queue=parts.queue.name, state="failed").inc()
    if record.task.origin in SEED_ORIGINS and record.result is not None and record.result.output:
        await _store_failed_out(parts, record, record.result.output, code, message)
    await notify(parts, record, EventType.FAILED)
    return True


def _may_fail(r: TaskRecord, parts: Parts, *, ran: bool, when: Callable[[TaskRecord], bool] | None) -> None:
    if ran:
        ours(r, parts)
    if when is not None and not when(r):
        raise TransitionConflict(f"task {r.id} is {r.state} (run {r.task.run})")


async def _store_failed_out(parts: Parts, record: TaskRecord, key: str, code: str, message: str) -> None:
    out = json.dumps(failed_out(record.task, code, message), indent=2).encode()
    try:
        await parts.storage.put(key, out, "application/json")
    except SdfleetError as e:  # the failure itself stands; only its .out is missing
        log.warning("task %s: failure .out not stored: %s", record.id, e)


async def requeue(parts: Parts, tenant: str, task_id: str, code: str, message: str) -> bool:
    """Back to ``queued`` with the reason of this agent's failed attempt (the delivery is
    released); False when the record is not queued after all (cancelled meanwhile), and
    ``TakenOver`` when another agent runs the task now."""

    def mutate(r: TaskRecord) -> TaskRecord | None:
        if r.state is not TaskState.RUNNING:
            return None
        ours(r, parts)
        r.state, r.error, r.worker = TaskState.QUEUED, TaskError(code=code, message=message), None
        return r

    try:
        record = await transition(parts.store, tenant, task_id, mutate)
    except TakenOver:
        raise
    except (TransitionConflict, NotFound) as e:
        log.info("task %s not requeued: %s", task_id, e)
        return False
    return record.state is TaskState.QUEUED


def cancelled_unrun(record: TaskRecord) -> bool:
    """Cancelled while queued: never started, or handed back by a failed attempt (no agent has a
    run of it, ``worker`` is None), so no runtime that could tell the cancel."""
    return record.state is TaskState.CANCELLED and record.worker is None


async def notify_if_cancelled_unrun(parts: Parts, record: TaskRecord | None) -> None:
    """A task cancelled while queued is told by the agent that drops it (at least once: each
    dropped copy may)."""
    if record is not None and cancelled_unrun(record):
        await notify(parts, record, EventType.CANCELLED)


async def acknowledge(parts: Parts, p: Prepared) -> None:
    """Ack a task's delivery once its notifications are out: a crash before that redelivers it,
    and the agent that gets it tells the subscribers again (at least once). Sets ``p.light`` first:
    from here on the task holds no finishing slot, only a lease."""
    p.light.set()
    await _delivered(parts, p.task.id)
    p.handle.told = True
    await ride_out(p.handle.ack, f"acking {p.task.id}", parts.fleet.retry.lease_s)


async def ack_when_told(parts: Parts, h: DeliveryHandle, task_id: str) -> None:
    """Ack a delivery settled without a run (failed before one, dropped) once the notifications
    sent for it are out, as ``acknowledge`` does for a run: a crash before that redelivers it, and
    the agent that gets it tells the subscribers again."""
    if h.on_light is not None:
        h.on_light()
    await _delivered(parts, task_id)
    await h.ack()


async def _delivered(parts: Parts, task_id: str) -> None:
    for notifier in parts.notifiers:
        await notifier.delivered(task_id)


async def notify(parts: Parts, record: TaskRecord, kind: EventType) -> None:
    urls = [parts.storage.location(k) for k in (record.result.images if record.result else [])]
    event = TaskEvent.of_record(record, kind, urls)
    for notifier in parts.notifiers:
        try:
            await ride_out(
                partial(notifier.notify, record, event), f"notifying {record.id}", parts.fleet.retry.lease_s
            )
        except SdfleetError as e:  # a lost notification must not undo a finished task
            log.error("notification of %s via %s failed: %s", record.id, type(notifier).__name__, e)
