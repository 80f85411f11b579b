"""Riding out a short engine outage (Redis restarting, a DynamoDB or SQS blip) instead of losing work.

Once a task has run, its result record, notification and ack are worth waiting for: giving up would
run the generation again (the record is missing) or lose the notification (the record is written,
so a redelivery is dropped as finished).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sdfleet.errors import BusUnavailable, StorageUnavailable, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT = (BusUnavailable, StoreUnavailable, StorageUnavailable)
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0


async def ride_out(op: Callable[[], Awaitable[T]], what: str, budget_s: float) -> T:
    """``await op()``, again and again while an engine is unavailable, for up to ``budget_s`` seconds;
    then the last ``*Unavailable`` error is raised. Other errors are raised at once."""
    deadline = time.monotonic() + budget_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return await op()
        except TRANSIENT as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; retrying in %.1f s", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
