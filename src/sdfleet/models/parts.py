"""What the transfers of ``models.transfer`` and ``models.multipart`` share: part arithmetic,
running parts together, and the disk-full error."""

from __future__ import annotations

import asyncio
import errno
import math
import os
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

from sdfleet.errors import DiskFull

MIB = 2**20
CHUNK = MIB
MAX_PARTS = 10_000
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Stopped(Exception):
    """A sibling part failed or the transfer was cancelled: stop between chunks."""


def part_size_for(size: int, wanted: int) -> int:
    """``wanted``, raised to whole MiB when ``size`` would need more than S3's 10,000 parts."""
    return max(wanted, math.ceil(size / MAX_PARTS / MIB) * MIB)


def span(i: int, part_size: int, size: int) -> tuple[int, int]:
    """Offset and length of part ``i`` (0-based)."""
    start = i * part_size
    return start, max(0, min(part_size, size - start))


def disk_full(path: Path, e: OSError) -> DiskFull:
    return DiskFull(f"no room for {path.name} in {path.parent}: {os.strerror(e.errno or errno.ENOSPC)}")


async def all_or_first_error(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run ``coros`` together; when one fails the others are cancelled and its error is raised as
    itself (not an ``ExceptionGroup``: callers and the CLI deal in sdfleet errors)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as eg:
        first = next(iter(_leaves(eg)))
        raise first from None


def _leaves(eg: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
