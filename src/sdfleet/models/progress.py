"""How transfers report progress: per file (label) and, summed by the receiver, in all."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Receives transfer progress; called from worker threads, so implementations must be thread-safe."""

    def start(self, label: str, total: int, done: int = 0) -> None:
        """A file of ``total`` bytes begins; ``done`` bytes were already there (a resumed transfer)."""

    def advance(self, label: str, n: int) -> None:
        """``n`` more bytes of ``label`` moved."""

    def finish(self, label: str) -> None:
        """``label`` is complete and verified."""


class Silent:
    """No output; counts the bytes that really moved (resumed bytes excluded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.moved = 0

    def __enter__(self) -> Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self, label: str, total: int, done: int = 0) -> None:
        if done:
            log.info("resuming %s at %d of %d bytes", label, done, total)

    def advance(self, label: str, n: int) -> None:
        with self._lock:
            self.moved += n

    def finish(self, label: str) -> None:
        log.debug("transferred %s", label)
