"""A task's start: its record goes to ``running`` with this agent's name (one write).

The agent starts the runtime call at the same moment, so the GPU never waits for this write; when
the write says the task must not run (cancelled while queued, finished, running elsewhere), the
agent interrupts that job and drops the delivery.
"""

from __future__ import annotations

import logging
import time
from functools import partial

from sdfleet.agent.defer import AnotherPublishRuns, defer, other_publish
from sdfleet.agent.outage import ride_out
from sdfleet.agent.parts import Parts, Prepared
from sdfleet.agent.records import ack_when_told, notify, notify_if_cancelled_unrun
from sdfleet.agent.tasklog import task_event
from sdfleet.bus.base import Delivery
from sdfleet.errors import NotFound, TransitionConflict
from sdfleet.store.base import transition
from sdfleet.tasks import EventType, TaskRecord, TaskState

log = logging.getLogger(__name__)


async def begin(parts: Parts, p: Prepared) -> bool:
    """Record the start; False (delivery settled) when the task must not run."""
    task = p.task
    start = partial(_start_record, parts, p)
    try:
        record = await ride_out(start, f"starting {task.id}", parts.fleet.retry.lease_s)
    except AnotherPublishRuns as e:  # it came in while that run started: it waits its turn
        await defer(parts, p.handle, task.id, p.span, str(e))
        return False
    except (TransitionConflict, NotFound) as e:
        task_event(task.id, p.delivery.queue, p.span, "dropped", reason=str(e))
        await notify_if_cancelled_unrun(parts, await parts.store.get(task.tenant, task.id))
        await ack_when_told(parts, p.handle, task.id)
        return False
    p.record = record
    task_event(task.id, p.delivery.queue, p.span, "started", attempt=record.attempts, worker=record.worker)
    await notify(parts, record, EventType.STARTED)
    return True


async def _start_record(parts: Parts, p: Prepared) -> TaskRecord:
    d = p.delivery
    if p.record is None:
        # Published by another producer (the seed's Lambda, a script) or by an API that has not
        # written the record yet: created here, straight in ``running``, keeping the queue the
        # API routed it to. Only a lost race with that API's write goes on to a transition.
        task = p.task if p.task.queue else p.task.model_copy(update={"queue": d.queue})
        fresh = _start(TaskRecord(task=task), parts, d, p.publish, p.numbered)
        assert fresh is not None
        record, created = await parts.store.create(fresh)
        if created:
            return record
        p.record = record
    mutate = partial(_start, parts=parts, d=d, publish=p.publish, numbered=p.numbered)
    return await transition(parts.store, p.task.tenant, p.task.id, mutate, current=p.record)


def _start(
    r: TaskRecord, parts: Parts, d: Delivery, publish: str | None, numbered: bool
) -> TaskRecord | None:
    if not numbered and (held := other_publish(r, d, publish)) is not None:
        raise AnotherPublishRuns(held)
    if r.state is TaskState.RUNNING:
        if r.worker == parts.worker_id:
            return None  # our own start, applied by a server that went away before it replied
        if d.receive_count <= 1:
            # Another agent holds a copy of this task (a re-published submit); only a redelivery,
            # whose receive count is 2 or more, takes over from an agent that died.
            raise TransitionConflict(f"already running on {r.worker}")
    r.state = TaskState.RUNNING
    r.attempts = max(r.attempts + 1, d.receive_count)
    r.worker = parts.worker_id
    r.message_id = publish
    r.runtime = parts.runtime.name
    r.started_at = time.time()
    r.progress = 0.0
    return r
