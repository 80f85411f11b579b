"""The embedded bus: topics, filtered subscriptions and leased queues in one SQLite file (WAL).

Several processes may share the file (the API in one, agents in others). All sqlite calls of one
``SqliteBus`` run on its own single worker thread with one connection, so the event loop never
blocks on the database; receivers in other processes are kept apart by ``BEGIN IMMEDIATE``.

Semantics beyond ``bus.base``:

- ``receipt`` is ``"<rowid>:<token>"`` with a fresh token per lease, so a stale delivery (its lease
  expired and someone else received the message) can no longer ack, extend or release it; such calls
  are silent no-ops;
- ``release()`` ends the lease: the message counts as ``delayed`` until it is visible again;
- a receive cancelled while its query runs releases what it leased (receive_count stays counted);
- a long poll wakes at once on a publish or release through the same ``SqliteBus`` object and polls
  the file every ≤ 100 ms for everything else;
- retention: a publish deletes the messages of the queues it adds to that are older than their
  ``retention_s``, a receive those of its queue and of the DLQ it moves a message to (counted
  from the first send, as on SQS).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from sdfleet.bus.backends import sqlite_db as db
from sdfleet.bus.base import Delivery, QueueStats, Topology, wait_unless
from sdfleet.errors import BusUnavailable, SdfleetError
from sdfleet.urls import sqlite_file

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_POLL_S = 0.1
FIRST_POLL_S = 0.01


def path_from_url(url: str) -> str:
    """``sqlite:////abs/x.db`` → ``/abs/x.db``; ``sqlite:///rel.db`` → ``rel.db``; ``sqlite://`` → memory."""
    return sqlite_file(url) or ":memory:"


class SqliteBus:
    """``Bus`` on a SQLite file; see the module docstring for the fine print."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdfleet-sqlite-bus")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    @classmethod
    def from_url(cls, url: str) -> SqliteBus:
        return cls(path_from_url(url))

    async def __aenter__(self) -> SqliteBus:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _db(self) -> sqlite3.Connection:
        if self._closed:
            raise BusUnavailable("sqlite bus is closed")
        if self._conn is None:
            self._conn = db.connect(self.path)
        return self._conn

    async def _run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        undo: Callable[[sqlite3.Connection, T], object] | None = None,
        *,
        read: bool = False,
    ) -> T:
        """Run ``fn`` on the worker thread; if the caller is cancelled after it ran, run ``undo``.
        A ``read`` of a file that does not exist yet reads an empty bus in memory, without making
        the file (``sdfleet queues`` in the wrong folder leaves nothing behind)."""
        if self._closed:
            raise BusUnavailable("sqlite bus is closed")

        def call() -> T:
            with db.map_errors():
                if read and self._conn is None and self.path != ":memory:" and not Path(self.path).exists():
                    empty = db.connect(":memory:")
                    try:
                        return fn(empty)
                    finally:
                        empty.close()
                return fn(self._db())

        done = self._executor.submit(call)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            if undo is not None and not self._closed:
                self._executor.submit(self._undo, done, undo)
            raise

    def _undo(self, done: Future[T], undo: Callable[[sqlite3.Connection, T], object]) -> None:
        # The single worker runs jobs in order, so ``done`` has finished (or never started) by now.
        if done.cancelled() or done.exception() is not None:
            return
        try:
            with db.map_errors():
                undo(self._db(), done.result())
        except SdfleetError:
            log.warning("could not release deliveries of a cancelled receive", exc_info=True)

    def _wake(self) -> None:
        for fut in list(self._waiters):
            fut.get_loop().call_soon_threadsafe(_resolve, fut)

    async def ensure(self, topology: Topology) -> None:
        """Create topics, queues, DLQs and subscriptions; idempotent, updates filter policies."""
        await self._run(lambda c: db.ensure(c, topology))

    async def publish(self, topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
        """Publish to a topic; returns the message id. Raises ``NotFound`` for an unknown topic."""
        message_id = await self._run(lambda c: db.publish(c, topic, body, attributes))
        self._wake()
        return message_id

    async def receive(
        self,
        queue: str,
        *,
        max_messages: int = 1,
        wait_s: float = 0.0,
        lease_s: float | None = None,
        until: asyncio.Event | None = None,
    ) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting up to ``wait_s`` seconds for the first one
        (or until ``until`` is set)."""
        deadline = time.monotonic() + wait_s
        pause = FIRST_POLL_S
        loop = asyncio.get_running_loop()
        while True:
            # Registered before the query so a publish between query and wait is not missed.
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.add(fut)
            try:
                got = await self._run(lambda c: db.receive(c, queue, max_messages, lease_s), _release_all)
                left = deadline - time.monotonic()
                if got or left <= 0 or not await wait_unless(until, fut, min(pause, left)):
                    return got
                pause = min(pause * 2, MAX_POLL_S)
            finally:
                self._waiters.discard(fut)
                fut.cancel()

    async def ack(self, d: Delivery) -> None:
        """Done with the message: delete it. Acking a delivery whose lease expired is harmless."""
        if not await self._run(lambda c: db.ack(c, d.receipt)):
            log.debug("ack of a stale delivery of %s on %s ignored", d.message_id, d.queue)

    async def extend(self, d: Delivery, lease_s: float) -> None:
        """Heartbeat: the delivery stays invisible for ``lease_s`` more seconds from now."""
        if not await self._run(lambda c: db.set_visible(c, d.receipt, lease_s, keep_lease=True)):
            log.debug("extend of a stale delivery of %s on %s ignored", d.message_id, d.queue)

    async def release(self, d: Delivery, delay_s: float = 0.0) -> None:
        """Give the message back, visible again after ``delay_s`` seconds."""
        if await self._run(lambda c: db.set_visible(c, d.receipt, delay_s, keep_lease=False)):
            self._wake()

    async def stats(self, queue: str) -> QueueStats:
        """Depth of a queue: visible, in flight (leased), delayed, age of the oldest, DLQ depth."""
        return await self._run(lambda c: db.stats(c, queue), read=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)


def _release_all(conn: sqlite3.Connection, deliveries: list[Delivery]) -> None:
    """A receive cancelled mid-flight gives its leases back at once instead of after ``lease_s``."""
    for d in deliveries:
        db.set_visible(conn, d.receipt, 0.0, keep_lease=False)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
