"""Tenant limits at the door: ``max_priority`` (403), ``max_in_flight`` and ``rate_limit`` (429
with ``Retry-After``).

Both are kept in the access store (the task store's engine), so every API replica enforces one
limit per tenant. The in-flight count is read from the task records, then the task is created:
replicas that admit at the same instant can each see the last free slot, so a tenant can briefly
exceed ``max_in_flight`` by the number of submits in flight at that moment. The rate bucket is one
atomic step in the engine and is exact.
"""

from __future__ import annotations

import math

from sdfleet.api.auth import Caller
from sdfleet.api.deps import ApiContext
from sdfleet.errors import Forbidden, RateLimited
from sdfleet.tasks import Task

IN_FLIGHT_RETRY_S = 1.0
"""``Retry-After`` of a submit refused for ``max_in_flight``: when a task ends is not known."""


def burst_of(who: Caller) -> int:
    """Submissions a tenant may make at once: its ``burst``, else one second's worth (at least 1)."""
    assert who.rate_limit is not None
    return who.burst or max(1, math.ceil(who.rate_limit))


def check_priority(who: Caller, task: Task) -> None:
    """A task may ask for its tenant's ``max_priority`` at most: priority lanes are for those
    meant to use them."""
    if task.priority > who.max_priority:
        raise Forbidden(
            f"tenant {who.tenant!r} may submit priority {who.max_priority} at most, not {task.priority}",
            code="priority_not_allowed",
        )


async def admit(ctx: ApiContext, who: Caller) -> None:
    """Let one new task of ``who`` in, or raise ``RateLimited``. In-flight first: a refused
    submit must not spend a token of the rate."""
    if who.max_in_flight is not None:
        active = await ctx.access.count_active(who.tenant, who.max_in_flight)
        if active >= who.max_in_flight:
            raise RateLimited(
                f"tenant {who.tenant!r} has {active} tasks queued or running, its limit",
                retry_after_s=IN_FLIGHT_RETRY_S,
                code="too_many_in_flight",
            )
    if who.rate_limit is not None:
        wait = await ctx.access.take(who.tenant, who.rate_limit, burst_of(who))
        if wait > 0:
            raise RateLimited(
                f"tenant {who.tenant!r} is over its rate limit of {who.rate_limit:g} tasks per second",
                retry_after_s=wait,
            )
