"""A seed publish that must wait for another publish's run of its id: given back, to come again.

The seed's Lambda publishes every POST anew, and the seed's agent runs every message it receives,
so two POSTs with one id run twice, one after the other. Their messages do not number their runs
(``Task.run``); the drop-in agent tells them apart by their publish (``Decoded.publish``) and a
task record holds one run at a time. So a publish that finds its id's record held by another
publish's run still going (queued or running on another agent, or started by another agent while
this one prepared it) is released to be received again later, when that run has ended and this one
reopens the record as the id's next run. It is not acked: dropping it would lose the second POST.
(Two publishes of one id that one agent holds together wait in hand instead: ``holds``.)

Each receive counts. On a queue without a dead-letter queue (the seed's own input queue, attached
by URL) the wait grows 2, 4, 8 … seconds up to a lease and may repeat for as long as the other run
lasts. On a queue with one, a release after ``max_receives`` receives moves the message aside, so
each wait is a whole lease (the time a run is expected to end in), and on its last receive the
delivery waits in hand instead (``outwait``: its lease kept, the record read every
``OUTWAIT_POLL_S``) until that run has ended, at most the longest a run may take (the queue's
``task_timeout_s``, which the agent enforces, and a lease for its end to be written); only a run
still going after that, or a shutdown meanwhile, sends it to the dead-letter queue (logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace

from sdfleet.agent.handle import DeliveryHandle
from sdfleet.agent.parts import Parts
from sdfleet.agent.tasklog import task_event
from sdfleet.bus.base import Delivery
from sdfleet.errors import SdfleetError, TransitionConflict
from sdfleet.tasks import TaskRecord

log = logging.getLogger(__name__)

StillHeld = Callable[[], Awaitable[bool]]
"""Whether the id's record still holds another publish's run that has not ended (read anew)."""
OUTWAIT_POLL_S = 1.0
"""How often a delivery waiting in hand on its last receive reads its record."""


class AnotherPublishRuns(TransitionConflict):
    """The record holds another publish's run of this seed id, not yet ended: wait for it."""

    code = "another_publish_runs"


def other_publish(record: TaskRecord, d: Delivery, publish: str | None) -> str | None:
    """Why seed message ``d`` of ``publish`` must wait: ``record`` holds another publish's run of
    its id (on this queue; a copy on another queue is dropped as one); None when it does not."""
    if record.message_id is None or record.message_id == publish:
        return None
    if record.task.queue not in (None, d.queue):
        return None
    return f"run {record.task.run} of another publish is {record.state}"


def unended_other_publish(record: TaskRecord, d: Delivery, publish: str | None) -> str | None:
    """``other_publish``, for a run that has not ended: why seed message ``d`` waits now."""
    return None if record.state.terminal else other_publish(record, d, publish)


def held_by_another_run(
    parts: Parts, d: Delivery, tenant: str, task_id: str, publish: str | None
) -> StillHeld:
    """``StillHeld`` for seed message ``d`` of ``publish``: its record read anew."""

    async def still_held() -> bool:
        r = await parts.store.get(tenant, task_id)
        return r is not None and unended_other_publish(r, d, publish) is not None

    return still_held


async def defer(
    parts: Parts,
    h: DeliveryHandle,
    task_id: str,
    span: trace.Span,
    reason: str,
    still_held: StillHeld | None = None,
    stopping: asyncio.Event | None = None,
) -> bool:
    """Release ``h`` to come back once the run that holds its id has ended; False. True when it
    waited in hand for that run on its last receive (``outwait``, given ``still_held`` and
    ``stopping``) and the run ended: ``h`` is unsettled, to be checked again. Never raises."""
    d = h.delivery
    lease_s = parts.fleet.retry.lease_s
    delay_s = min(lease_s, 2.0 ** min(d.receive_count, 16))
    try:
        dead_letters = (await parts.bus.stats(d.queue)).dead_letter_queue
    except SdfleetError as e:  # cannot tell: as if it had one (the longer wait)
        log.warning("could not read %s's attributes: %s", d.queue, e)
        dead_letters = True
    if dead_letters:
        delay_s = lease_s
        if d.receive_count >= parts.fleet.retry.max_receives:
            if (
                still_held is not None
                and stopping is not None
                and await outwait(parts, h, task_id, span, reason, still_held, stopping)
            ):
                return True
            log.error(
                "task %s: message %s waited %d receives for another run of its id to end; it goes to "
                "%s's dead-letter queue (%s)",
                task_id,
                d.message_id,
                d.receive_count,
                d.queue,
                reason,
            )
    task_event(task_id, d.queue, span, "deferred", reason=reason, receive=d.receive_count, delay_s=delay_s)
    try:
        await h.release(delay_s)
    except SdfleetError as e:  # its lease ends and it comes back anyway
        log.warning("could not release %s: %s", d.message_id, e)
    return False


async def outwait(
    parts: Parts,
    h: DeliveryHandle,
    task_id: str,
    span: trace.Span,
    reason: str,
    still_held: StillHeld,
    stopping: asyncio.Event,
) -> bool:
    """Keep ``h`` (its lease heartbeat runs) until ``still_held()`` says its id's record no longer
    holds another publish's unended run: True; False on shutdown, or when that run outlasts the
    longest a run of this queue may take (``task_timeout_s``, and a lease for its end to be
    recorded)."""
    d = h.delivery
    limit_s = parts.queue.task_timeout_s + parts.fleet.retry.lease_s
    task_event(task_id, d.queue, span, "waiting", reason=reason, receive=d.receive_count, limit_s=limit_s)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(stopping.wait(), OUTWAIT_POLL_S)
            return False
        except TimeoutError:
            pass
        try:
            if not await still_held():
                return True
        except SdfleetError as e:  # the store is away: wait on
            log.warning("task %s: could not read its record: %s", task_id, e)
    return False
