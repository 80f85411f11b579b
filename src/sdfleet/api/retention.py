"""Result files of tasks no longer kept, deleted in the background on ``file://`` storage.

With ``fleet.retain_days`` a finished task's record goes that long after it ended (the task store
sees to it); its images and ``.out`` JSON go here, up to an hour later (``MARGIN_S``, never more
than ``retain_days`` itself: a file is written before its task's record ends, so it must not go
before the record that links to it). S3 storage
is left to the bucket's lifecycle rule (the CDK app makes one from ``retain_days``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sdfleet.api.background import beside
from sdfleet.storage.backends.local import LocalBlobStore
from sdfleet.storage.base import BlobStore

log = logging.getLogger(__name__)

MARGIN_S = 3600.0
EVERY_S = 600.0


async def _expire_forever(storage: LocalBlobStore, older_than_s: float, every_s: float) -> None:
    while True:
        try:
            removed = await storage.expire(older_than_s)
        except OSError as e:  # a full or read-only disk must not end the sweeper
            log.warning("expired result files not deleted: %s", e)
        else:
            if removed:
                log.info("deleted %d result files of tasks no longer kept", removed)
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def files_expiry(storage: BlobStore, retain_s: float | None) -> AsyncIterator[None]:
    """While inside, delete ``file://`` result files older than ``retain_s`` and a margin, every
    10 minutes (a quarter of ``retain_s`` where that is shorter, at least each second); nothing
    where tasks are kept for ever or storage is not local. Each pass that removes files logs how
    many (a metric would carry no queue, which every dashboard panel filters by)."""
    if retain_s is None or not isinstance(storage, LocalBlobStore):
        yield
        return
    every_s = min(EVERY_S, max(1.0, retain_s / 4))
    sweeper = _expire_forever(storage, retain_s + min(MARGIN_S, retain_s), every_s)
    async with beside(sweeper, "files-expiry"):
        yield
