"""Tasks whose message reached the dead-letter queue with no outcome: failed, their clients told.

A message moves to its queue's dead-letter queue on the receive after its last try
(``retry.max_receives``). A task whose last try failed is ``failed`` by then. One whose agents
stopped on each try (killed for memory, a node lost, a crash inside the runtime) or whose
receives were lost on the way has no outcome: its record stays ``queued`` or ``running`` and its
client, webhook or results subscriber waits for ever. The agent looks at its queue's dead-letter
queue as it starts and every ``agent.dead_letter_check_s`` after, reads its letters when their
count changed, and fails each such task with ``dead_lettered``, told as any failure is. The
letters stay where they are: ``sdfleet dlq redrive`` runs the task's next run once the fault is
fixed, as for a task that failed on each try.

Left alone: a letter of another run than the record's (a later run exists), of a task published
again after it (a client's repeated submit: that copy runs), of a task with no record (published
past the API and never started; ``sdfleet dlq`` shows it) and a seed message (its run is its
publish: ``Task.run`` does not number it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sdfleet import dlq
from sdfleet.agent.parts import Parts
from sdfleet.agent.records import fail
from sdfleet.bus.base import Delivery, dlq_name
from sdfleet.errors import SdfleetError
from sdfleet.routing import enqueued_at
from sdfleet.tasks import TaskRecord, TaskState

log = logging.getLogger(__name__)

CODE = "dead_lettered"
LIMIT = 100
"""Letters read in one look; a larger dead-letter queue is read over several looks (its count
does not settle while some are unread)."""
HOLD_S = 10.0
"""How long a look holds its letters: given back at once when it ends, else (the agent died, or
the give-back itself failed) by the engine after this long; a look takes a second or two."""


async def watch_dead_letters(parts: Parts, every_s: float, done: asyncio.Event) -> None:
    """Look at the queue's dead-letter queue now and every ``every_s`` until ``done``."""
    seen: int | None = None
    while not done.is_set():
        try:
            seen = await look(parts, seen)
        except SdfleetError as e:  # the engine is away: the next look tries again
            log.warning("dead-letter queue of %s not read: %s", parts.queue.name, e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)


async def look(parts: Parts, seen: int | None) -> int | None:
    """Fail the tasks of the dead-letter queue's letters that have no outcome, when the number of
    letters is not ``seen`` (the count of the last look that read them all). Returns the count
    this look read and settled them all at, else ``seen``: a look that missed some (held by
    another agent's look, past ``LIMIT``, or one the store did not answer for) leaves the next
    to read them again."""
    queue = parts.queue.name
    stats = await parts.bus.stats(queue)
    if not stats.dead_letter_queue or stats.dead_letters in (0, seen):
        return stats.dead_letters if stats.dead_letter_queue else seen
    # No more than it holds: a read past the last letter waits out a long poll for more.
    want, missed = min(LIMIT, stats.dead_letters), False
    held: list[Delivery] = []
    try:
        while len(held) < want:
            got = await parts.bus.receive(
                dlq_name(queue), max_messages=min(10, want - len(held)), wait_s=dlq.WAIT_S, lease_s=HOLD_S
            )
            if not got:
                break
            held += got
            for d in got:
                try:
                    await _settle(parts, await dlq.read_letter(parts.store, queue, d))
                except SdfleetError as e:  # one letter's outage does not stop the others
                    log.warning("dead letter %s of %s not looked at: %s", d.message_id, queue, e)
                    missed = True
    finally:
        for d in held:  # all held to the end, so the look does not read one twice
            with contextlib.suppress(SdfleetError):  # back when its hold ends
                await parts.bus.release(d)
    return stats.dead_letters if not missed and len(held) >= stats.dead_letters else seen


async def _settle(parts: Parts, letter: dlq.Letter) -> None:
    """Fail ``letter``'s task when it has no outcome (see the module docstring)."""
    view, task = letter.view, letter.task
    if task is None or view.state not in (TaskState.QUEUED, TaskState.RUNNING) or view.record_run != task.run:
        return
    enqueued = enqueued_at(letter.attributes)

    def stranded(r: TaskRecord) -> bool:
        """Still without an outcome, of the letter's run, and no other copy of it published
        since (a client's repeated submit) or running (a copy sent again by hand)."""
        again = r.published_at is not None and enqueued is not None and r.published_at > enqueued
        other = r.state is TaskState.RUNNING and r.message_id not in (None, letter.publish)
        unsettled = r.state in (TaskState.QUEUED, TaskState.RUNNING) and r.task.run == task.run
        return unsettled and not (again or other)

    tries = parts.fleet.retry.max_receives
    message = (
        f"no agent finished it in {tries} tries (each stopped with no result: killed, evicted or "
        "cut off); its message is in the dead-letter queue"
    )
    if await fail(parts, task.tenant, task.id, CODE, message, when=stranded):
        log.warning("task %s failed: %s (%s)", task.id, message, view.state)
