"""File locks between the processes of one node that share a models folder (``flock``).

``<models>/.sdfleet/locks/<name>.lock``: held exclusively while a model is being downloaded, so
however many agents (processes or agents within one process) ask for it at once, one downloads
and the others wait, then find it on disk. ``<name>.use``: held shared by every process that is
using the model; eviction takes it exclusively without waiting, and skips a model it cannot get.
``flock`` locks belong to an open file, so two opens in one process exclude each other too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from sdfleet.models.layout import STATE_DIR

POLL_S = 0.1


def lock_path(root: Path, name: str, kind: str = "lock") -> Path:
    folder = root / STATE_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.{kind}"


@contextlib.asynccontextmanager
async def exclusive(path: Path) -> AsyncIterator[float]:
    """Hold ``path``'s lock exclusively; yields the seconds spent waiting for it (0.0: it was free)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    started = time.monotonic()
    waited = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = True
                await asyncio.sleep(POLL_S)
        yield time.monotonic() - started if waited else 0.0
    finally:
        os.close(fd)  # closing the file releases the lock


class SharedLock:
    """A shared hold on ``path`` until ``release()``."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_SH)  # only ever blocks for an eviction's instant

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def unless_used(path: Path) -> Iterator[bool]:
    """Exclusive hold on ``path`` without waiting; yields False (holding nothing) when it is in use."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
