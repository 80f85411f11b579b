"""One SQLite file behind an asyncio API: the connection (WAL, a busy timeout) on one worker thread,
errors as ``StoreUnavailable``, closing that never reopens. Shared by the task store and the access
store, which keep their tables in the same file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sdfleet.errors import ConfigError, StoreUnavailable
from sdfleet.urls import SQLITE_FORMS, sqlite_file

T = TypeVar("T")


@contextmanager
def map_errors(what: str = "sqlite task store") -> Iterator[None]:
    """Translate sqlite3 errors into ``StoreUnavailable``."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreUnavailable(f"{what}: {e}") from e


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///relative.db`` or ``sqlite:////abs/path.db`` URL (a store is kept:
    no in-memory ``sqlite://``)."""
    path = sqlite_file(url)
    if path is None:
        raise ConfigError(f"sqlite URL without a file: {url!r}; use {SQLITE_FORMS}")
    return path


class SqliteFile:
    """The plumbing; a subclass names itself (``what``) and creates its tables (``prepare``)."""

    what = "sqlite store"

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sdfleet-{type(self).__name__}"
        )

    def prepare(self, conn: sqlite3.Connection) -> None:
        """Create or migrate this store's tables on a new connection."""

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._open(str(self.path))
        return self._conn

    def _open(self, path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self.prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, read: bool = False) -> T:
        """``fn`` on the worker thread. A ``read`` of a file that does not exist yet reads an
        empty database in memory: what the file would hold, without making it (``sdfleet keys
        list`` in the wrong folder leaves nothing behind)."""
        if self._closed:
            raise StoreUnavailable(f"{self.what} is closed")

        def call() -> T:
            if self._closed:  # queued before aclose() but run after it: don't reopen
                raise StoreUnavailable(f"{self.what} is closed")
            with map_errors(self.what):
                if read and self._conn is None and not self.path.exists():
                    empty = self._open(":memory:")
                    try:
                        return fn(empty)
                    finally:
                        empty.close()
                return fn(self._connect())

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread; idempotent."""
        if self._closed:
            return

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        self._closed = True
        try:
            with map_errors(self.what):
                await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)
