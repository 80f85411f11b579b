"""``Prefer: wait=N`` (RFC 7240) on ``POST /v1/tasks``: answer with the finished task when it ends
within N seconds (at most ``MAX_WAIT_S``), else as usual. Preferences are hints: an unreadable
one is ignored, a larger N is cut to the maximum."""

from __future__ import annotations

import asyncio
import re
import time

from fastapi import Request

from sdfleet.api.deps import ApiContext
from sdfleet.tasks import TaskRecord

MAX_WAIT_S = 60
# ASCII digits only (\d also takes other scripts' digits), any count: a larger wait is cut, not ignored.
_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?([0-9]+)\"?\s*(?:[,;]|$)", re.IGNORECASE)
_FIRST_POLL_S = 0.02
_MAX_POLL_S = 0.5


def preferred_wait(request: Request) -> int | None:
    """The seconds a client prefers to wait, from its ``Prefer`` headers; None if it asks none."""
    for header in request.headers.getlist("prefer"):
        found = _WAIT.search(header)
        if found:
            digits = found.group(1).lstrip("0") or "0"
            return MAX_WAIT_S if len(digits) > 6 else min(int(digits), MAX_WAIT_S)
    return None


async def until_finished(ctx: ApiContext, record: TaskRecord, seconds: float) -> TaskRecord:
    """The record once it is terminal, or as it stands after ``seconds``. Polls the store, more
    slowly the longer it waits (no extra infrastructure, like the event stream)."""
    deadline = time.monotonic() + seconds
    delay = _FIRST_POLL_S
    while not record.state.terminal:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(delay, left))
        record = await ctx.store.get(record.tenant, record.id) or record
        delay = min(delay * 1.5, _MAX_POLL_S)
    return record
