"""The bus: topics with SNS-style filtered subscriptions fanning out to leased queues.

Semantics every backend keeps (checked by ``tests/contract/test_bus.py``):

- at-least-once: a delivery not acked within its lease comes back;
- ``receive_count`` counts deliveries; a message delivered ``max_receives`` times and not acked
  moves to the queue's dead-letter queue (``<queue>-dlq``) instead of being delivered again;
- a subscription's ``filter_policy`` is an SNS filter policy (``policy.py``), applied to the
  message attributes or, with ``scope="MessageBody"``, to the JSON body; attributes are strings,
  except those named in ``NUMBER_ATTRIBUTES``, which are numbers (SNS ``Number``) on every engine;
- delivery is raw: the body and the attributes arrive as published;
- a message is kept at most its queue's ``retention_s`` after it was sent (SQS's
  ``MessageRetentionPeriod``: 4 days unless set), in a dead-letter queue ``DLQ_RETENTION_S``,
  whether or not anyone reads it: a queue nobody drains (a results queue of a fleet that only
  uses webhooks) does not grow for ever.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from sdfleet.errors import ValidationFailed

DLQ_SUFFIX = "-dlq"
QUEUE_RETENTION_S = 4 * 86400
"""How long a queue keeps a message: SQS's default retention."""
DLQ_RETENTION_S = 14 * 86400
"""How long a dead-letter queue keeps one: SQS's longest, time to read and redrive it."""

NUMBER_ATTRIBUTES = frozenset({"priority"})
"""Attributes that are numbers, SNS ``Number``: the aws engine publishes them with that data type
and the other engines route them as numbers, so a ``numeric`` filter policy (``{"priority":
[{"numeric": [">=", 5]}]}``) or an exact number routes them alike everywhere. SNS's ``numeric``
never matches a ``String`` attribute."""


NUMBER_LIMIT = 1e9
"""SNS's ``Number`` attributes lie within ±this."""


def typed_attributes(attributes: Mapping[str, str]) -> dict[str, str | float]:
    """Attributes as SNS filters them: ``NUMBER_ATTRIBUTES`` values as numbers. Raises
    ``ValidationFailed`` for one that is not a number SNS takes, as SNS refuses the publish."""
    typed: dict[str, str | float] = dict(attributes)
    for name in NUMBER_ATTRIBUTES & typed.keys():
        try:
            number = float(attributes[name])
        except ValueError:
            number = math.nan
        if not abs(number) <= NUMBER_LIMIT:
            raise ValidationFailed(
                f"message attribute {name!r} must be a number within ±1e9, got {attributes[name]!r}"
            )
        typed[name] = number
    return typed


def dlq_name(queue: str) -> str:
    return f"{queue}{DLQ_SUFFIX}"


class QueueSpec(BaseModel):
    name: str
    retention_s: float = Field(QUEUE_RETENTION_S, gt=0, le=DLQ_RETENTION_S)
    """How long a message is kept after it was sent, read or not (SQS takes 60 s or more)."""
    lease_s: float = Field(60.0, gt=0)
    """Default visibility timeout of a receive, in seconds."""
    max_receives: int = Field(3, ge=1)
    """Deliveries before the message moves to the dead-letter queue."""


class Subscription(BaseModel):
    topic: str
    queue: str
    filter_policy: dict[str, Any] | None = None
    scope: Literal["MessageAttributes", "MessageBody"] = "MessageAttributes"


class Topology(BaseModel):
    topics: list[str] = Field(default_factory=list)
    queues: list[QueueSpec] = Field(default_factory=list)
    subscriptions: list[Subscription] = Field(default_factory=list)

    def queue(self, name: str) -> QueueSpec | None:
        return next((q for q in self.queues if q.name == name), None)


@dataclass(frozen=True)
class Delivery:
    """One received message. ``receipt`` is the backend's handle for ack/extend/release."""

    queue: str
    message_id: str
    body: bytes
    attributes: Mapping[str, str]
    receive_count: int
    receipt: str
    sent_at: float
    """Epoch seconds when the message entered the queue."""
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueStats:
    queue: str
    visible: int
    in_flight: int
    delayed: int = 0
    oldest_age_s: float | None = None
    dead_letters: int = 0
    dead_letter_queue: bool = True
    """Whether the queue moves a message received ``max_receives`` times aside. Only a queue the
    bus did not make can lack one (an SQS queue attached by URL, such as the seed's)."""


class Bus(Protocol):
    async def ensure(self, topology: Topology) -> None:
        """Create topics, queues, DLQs and subscriptions; idempotent, updates filter policies."""

    async def publish(self, topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
        """Publish to a topic; returns the message id. Raises ``NotFound`` for an unknown topic."""

    async def receive(
        self,
        queue: str,
        *,
        max_messages: int = 1,
        wait_s: float = 0.0,
        lease_s: float | None = None,
        until: asyncio.Event | None = None,
    ) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting up to ``wait_s`` seconds for the first one.

        Each is invisible to other receivers for ``lease_s`` seconds (the queue's default if None).
        Once ``until`` is set (an agent stopping) the wait ends with what it has; a request that
        may lease messages is never cut short (SQS's long poll, at most 20 s, runs out), so none
        is left under a lease that no one holds.
        """

    async def ack(self, d: Delivery) -> None:
        """Done with the message: delete it. Acking a delivery whose lease expired is harmless."""

    async def extend(self, d: Delivery, lease_s: float) -> None:
        """Heartbeat: the delivery stays invisible for ``lease_s`` more seconds from now."""

    async def release(self, d: Delivery, delay_s: float = 0.0) -> None:
        """Give the message back, visible again after ``delay_s`` seconds."""

    async def stats(self, queue: str) -> QueueStats:
        """Depth of a queue: visible, in flight (leased), delayed, age of the oldest, DLQ depth."""

    async def aclose(self) -> None: ...


async def wait_unless(until: asyncio.Event | None, aw: Awaitable[object], timeout_s: float | None) -> bool:
    """Wait for ``aw`` at most ``timeout_s`` (None: no limit) or until ``until`` is set, and
    cancel ``aw`` if it has not finished (it must claim nothing: a wait for a wake-up, a Redis
    ``XREAD``). False when ``until`` is set."""
    work = asyncio.ensure_future(aw)
    stop = asyncio.ensure_future(until.wait()) if until is not None else None
    try:
        waits = {work} if stop is None else {work, stop}
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in (work, stop):
            if f is not None:
                f.cancel()
    # A cancelled client call finishes its clean-up (redis-py drops the connection); asyncio.wait,
    # unlike awaiting it, lets a cancel of the caller through.
    await asyncio.wait({work})
    if not work.cancelled() and (error := work.exception()) is not None:
        raise error
    return until is None or not until.is_set()
