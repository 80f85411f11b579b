"""Dead letters: what a queue's dead-letter queue (``<queue>-dlq``) holds, and running it again.

A message reaches the dead-letter queue after ``retry.max_receives`` deliveries without an ack
(a task that failed on each try, an agent killed on each try). Its task's record is ``failed``
by then (on the last try, or by the queue's agents when they find its letter with no outcome:
``agent.dead_letters``), and an agent drops a delivery of a finished task: so sending the message back
as it is would do nothing. A redrive runs the task's **next run** instead (``Task.run``), as a
client's resubmit of a seed-format id does: published to the tasks topic again (its filter
policies route it, with the attributes it was first published with), its record reopened
(attempts, error and result cleared), then the letter deleted. Published first: a crash before
the delete leaves the letter, and the next redrive finishes as the same run: it publishes that
run once more if the record was not reopened yet (the agents run it once), else drops the letter
(at least once, one result, never a run more).

What each letter comes to (``Outcome``):

- ``rerun``: the record is ``failed``: its next run is published and the record reopened;
- ``sent``: the record is ``queued`` or ``running`` (its agents died on each try and no agent has
  looked at the letter yet, or a copy of it was published again since) or missing (it was never
  recorded): the message is published again as it is;
- ``dropped``: the record ``succeeded`` or was ``cancelled``, or a later run exists: nothing to run,
  the letter is deleted;
- ``kept``: not sdfleet's own task JSON (a seed Lambda message in drop-in mode, whose run is its
  SNS publish: resubmit it through the API; or a body no agent can read): left where it is, for
  ``drop`` to delete once someone has looked at it.

Reading a dead-letter queue holds each letter under a lease (``hold_s``) so a second read does not
see it twice; ``list`` gives every letter back at once, and a reader that dies gives them back
when the lease ends. Nothing here connects anywhere but the fleet's bus and store.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel

from sdfleet.bus.base import Bus, Delivery, dlq_name
from sdfleet.errors import MessageDecodeError, NotFound, SdfleetError
from sdfleet.messages import decode_delivery
from sdfleet.routing import stamp
from sdfleet.store.base import TaskStore, reopen
from sdfleet.tasks import Task, TaskError, TaskRecord, TaskState

HOLD_S = 300.0
"""How long a read holds the letters it has read (a reader that dies gives them back then)."""
WAIT_S = 1.0
"""How long a read waits for more letters before it takes a queue as read: a long poll, since a
short SQS receive samples only some of its servers and can answer nothing while letters wait."""


class Outcome(StrEnum):
    RERUN = "rerun"
    SENT = "sent"
    DROPPED = "dropped"
    KEPT = "kept"


class DeadLetter(BaseModel):
    """One message of a dead-letter queue, with what its task's record says now."""

    queue: str
    """The queue it died on (its dead-letter queue is ``<queue>-dlq``)."""
    message_id: str
    task_id: str | None = None
    tenant: str | None = None
    type: str | None = None
    model: str | None = None
    run: int | None = None
    """The run the message is of (``Task.run``); None for a message that is not a task."""
    state: TaskState | None = None
    """The record's state now; None: no record (or not a task)."""
    record_run: int | None = None
    error: TaskError | None = None
    """The record's error: why its last try failed."""
    unreadable: str | None = None
    """Why the message is not sdfleet's own task JSON (then nothing else is known)."""


class Settled(BaseModel):
    """What a redrive or a drop did with one letter."""

    letter: DeadLetter
    outcome: Outcome
    reason: str
    run: int | None = None
    """The run now queued (``rerun`` and ``sent``)."""


@dataclass
class Letter:
    """A held delivery of a dead-letter queue: its task (None when it is not sdfleet's own) and
    the attributes it was published with (inside its SNS envelope, if any)."""

    delivery: Delivery
    view: DeadLetter
    task: Task | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    publish: str | None = None
    """The publish it is a copy of (``Decoded.publish``)."""
    settled: bool = False
    """Deleted (redriven or dropped): not given back."""


async def read_letter(store: TaskStore, queue: str, delivery: Delivery) -> Letter:
    """A delivery of ``queue``'s dead-letter queue, with what its task's record says now."""
    view = DeadLetter(queue=queue, message_id=delivery.message_id)
    try:
        decoded = decode_delivery(delivery)
    except MessageDecodeError as e:
        view.unreadable = e.message or str(e)
        return Letter(delivery, view)
    task = decoded.task
    view = view.model_copy(
        update={"task_id": task.id, "tenant": task.tenant, "type": task.type.value, "model": task.model}
    )
    if not decoded.ours:
        view.unreadable = "a seed message (its run is its SNS publish): submit it again through the API"
        return Letter(delivery, view)
    view.run = task.run
    record = await store.get(task.tenant, task.id)
    if record is not None:
        view.state, view.record_run, view.error = record.state, record.task.run, record.error
    return Letter(delivery, view, task, decoded.attributes, decoded.publish)


@dataclass
class Read:
    """What ``held`` read: the letters, and the queues it could not read with the reason."""

    letters: list[Letter]
    skipped: dict[str, str]


@asynccontextmanager
async def held(
    bus: Bus,
    store: TaskStore,
    queues: Iterable[str],
    *,
    limit: int,
    hold_s: float = HOLD_S,
    wait_s: float = WAIT_S,
) -> AsyncIterator[Read]:
    """Up to ``limit`` letters of the dead-letter queues of ``queues``, held for ``hold_s``; those
    still held on exit (not settled by ``redrive``) are given back at once. A queue the bus did
    not make (an SQS queue attached by URL, such as the seed's) has no dead-letter queue of
    sdfleet's: it is skipped, and said so."""
    read = Read([], {})
    try:
        for queue in queues:
            if not (await bus.stats(queue)).dead_letter_queue:
                read.skipped[queue] = "it has no dead-letter queue"
                continue
            try:
                await _read_queue(bus, store, queue, read.letters, limit, hold_s, wait_s)
            except NotFound as e:  # a dead-letter queue of its own, under another name
                read.skipped[queue] = f"its dead-letter queue is not {dlq_name(queue)!r} ({e})"
        yield read
    finally:
        for letter in read.letters:
            if not letter.settled:
                try:
                    await bus.release(letter.delivery)
                except SdfleetError:  # back when its hold ends
                    pass


async def _read_queue(
    bus: Bus, store: TaskStore, queue: str, letters: list[Letter], limit: int, hold_s: float, wait_s: float
) -> None:
    while len(letters) < limit:
        want = min(10, limit - len(letters))
        got = await bus.receive(dlq_name(queue), max_messages=want, wait_s=wait_s, lease_s=hold_s)
        if not got:
            return
        for d in got:
            letters.append(await read_letter(store, queue, d))


async def redrive(bus: Bus, store: TaskStore, topic: str, letter: Letter) -> Settled:
    """Run ``letter``'s task again (the module docstring says how); the letter is deleted unless
    the outcome is ``kept``. Raises the bus's and the store's errors (the letter is then kept)."""
    view, task = letter.view, letter.task
    if task is None:
        return Settled(letter=view, outcome=Outcome.KEPT, reason=view.unreadable or "not a task")
    # Read again, not the record ``held`` saw: it may have moved on since (an agent, a resubmit).
    record = await store.get(task.tenant, task.id)
    outcome, reason, run = _decide(task, record)
    if outcome is Outcome.RERUN and record is not None:
        task = task.model_copy(update={"run": run})
        await _publish(bus, topic, task, letter.attributes)
        # Another writer first (an agent that received the new run already reopens it itself): theirs.
        await reopen(store, record, task, published_at=time.time())
    elif outcome is Outcome.SENT:
        await _publish(bus, topic, task, letter.attributes)
    await bus.ack(letter.delivery)
    letter.settled = True
    return Settled(letter=view, outcome=outcome, reason=reason, run=run)


async def settle(letter: Letter, act: Callable[[Letter], Awaitable[Settled]]) -> Settled:
    """``act`` (a redrive, a drop) on ``letter``; a bus or store error keeps the letter (it goes
    back to its dead-letter queue) with the error as the reason, so one letter's failure does not
    stop the others'."""
    try:
        return await act(letter)
    except SdfleetError as e:
        return Settled(letter=letter.view, outcome=Outcome.KEPT, reason=f"not settled: {e}")


async def drop(bus: Bus, letter: Letter) -> Settled:
    """Delete ``letter`` without running it: a letter a redrive keeps (a body no agent can read),
    or a task nobody wants run any more."""
    await bus.ack(letter.delivery)
    letter.settled = True
    return Settled(letter=letter.view, outcome=Outcome.DROPPED, reason="dropped on request")


def _decide(task: Task, record: TaskRecord | None) -> tuple[Outcome, str, int | None]:
    if record is None:
        return Outcome.SENT, "no record: published again as it is", task.run
    if record.task.run > task.run:
        return Outcome.DROPPED, f"run {record.task.run} came after it (now {record.state})", None
    if record.state is TaskState.FAILED:
        return Outcome.RERUN, f"failed: run {record.task.run + 1} published", record.task.run + 1
    if record.state.terminal:
        return Outcome.DROPPED, f"the task {record.state}: nothing to run", None
    return Outcome.SENT, f"still {record.state} (its agents stopped): published again as it is", task.run


async def _publish(bus: Bus, topic: str, task: Task, attributes: dict[str, str]) -> None:
    # The attributes it was first published with (routing, tier, trace), a new enqueue time.
    await bus.publish(topic, task.to_message(), stamp(attributes))
