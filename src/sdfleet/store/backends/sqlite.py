"""The embedded task store: one table in the SQLite file the bus also uses (WAL, several processes).

Each record is stored as its JSON next to the columns that queries need (tenant, state, created_at,
version, expires_at); the key is (tenant, id), ids being per tenant. With ``retain_s`` a finished
record gets ``expires_at``: reads skip it from then on, and each write that finishes a task deletes
up to ``SWEEP`` expired rows right after it. Compare-and-set is a single
``UPDATE … WHERE tenant = ? AND id = ? AND version = ?``, which SQLite makes atomic across
processes. All SQLite calls run on one worker thread per store, off the event loop.

A file written before ids were per tenant (key ``id`` alone), or before records expired (no
``expires_at``), is migrated in place when a store first connects to it.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, TypeVar

from sdfleet import jsonsafe
from sdfleet.errors import ValidationFailed
from sdfleet.store.backends._sqlite_file import SqliteFile, sqlite_path
from sdfleet.store.base import SWEEP, expires_at, read_record
from sdfleet.tasks import TaskRecord, TaskState

T = TypeVar("T")

_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_SELECT_ONE = f"SELECT body FROM task_records WHERE tenant = ? AND id = ? AND {_LIVE}"

MAX_PAGE = 1000

_TABLE = """
CREATE TABLE IF NOT EXISTS task_records (
    tenant     TEXT NOT NULL,
    id         TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at REAL NOT NULL,
    version    INTEGER NOT NULL,
    body       TEXT NOT NULL,
    expires_at REAL,
    PRIMARY KEY (tenant, id)
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS task_records_by_tenant
    ON task_records (tenant, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS task_records_by_tenant_state
    ON task_records (tenant, state, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS task_records_expiring
    ON task_records (expires_at) WHERE expires_at IS NOT NULL;
"""
_COLUMNS = "tenant, id, state, created_at, version, body"
_SWEEP = (
    "DELETE FROM task_records WHERE rowid IN (SELECT rowid FROM task_records"
    f" WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT {SWEEP})"
)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the table, or migrate one keyed by ``id`` alone to the (tenant, id) key, atomically:
    several processes may open the file at once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        key = [row[1] for row in conn.execute("PRAGMA table_info(task_records)") if row[5]]
        if key == ["id"]:  # the file of an earlier version: ids were global
            conn.execute("DROP INDEX IF EXISTS task_records_by_tenant")
            conn.execute("DROP INDEX IF EXISTS task_records_by_tenant_state")
            conn.execute("ALTER TABLE task_records RENAME TO task_records_v0")
            conn.execute(_TABLE)
            conn.execute(f"INSERT INTO task_records ({_COLUMNS}) SELECT {_COLUMNS} FROM task_records_v0")
            conn.execute("DROP TABLE task_records_v0")
        else:
            conn.execute(_TABLE)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(task_records)")}
        if "expires_at" not in columns:  # a file from before records expired
            conn.execute("ALTER TABLE task_records ADD COLUMN expires_at REAL")
        for statement in filter(str.strip, _INDEXES.split(";")):
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def encode_cursor(created_at: float, task_id: str) -> str:
    raw = json.dumps([created_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = jsonsafe.loads(raw, max_depth=1)
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise TypeError("created_at")
        if not isinstance(task_id, str):
            raise TypeError("id")
        return float(created_at), task_id
    except (binascii.Error, ValueError, TypeError, OverflowError, ValidationFailed) as e:
        raise ValidationFailed(f"bad cursor {cursor!r}") from e


class SqliteTaskStore(SqliteFile):
    """``TaskStore`` on a SQLite file; safe to share between processes."""

    what = "sqlite task store"

    def __init__(self, path: str | Path, *, retain_s: float | None = None) -> None:
        super().__init__(path)
        self.retain_s = retain_s

    @classmethod
    def from_url(cls, url: str, *, retain_s: float | None = None) -> SqliteTaskStore:
        return cls(sqlite_path(url), retain_s=retain_s)

    async def __aenter__(self) -> SqliteTaskStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def prepare(self, conn: sqlite3.Connection) -> None:
        ensure_schema(conn)

    # -- TaskStore --------------------------------------------------------------------------------

    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        """Insert ``record`` unless its tenant already has its id; returns (stored record, created?)."""
        row = (
            record.tenant,
            record.id,
            record.state.value,
            record.task.created_at,
            record.version,
            record.model_dump_json(),
            expires_at(record, self.retain_s),
        )

        def insert(conn: sqlite3.Connection) -> str | None:
            now = time.time()
            # An expired record's id is free again: the new record takes its row.
            cur = conn.execute(
                f"INSERT INTO task_records ({_COLUMNS}, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, id) DO UPDATE SET state = excluded.state,"
                " created_at = excluded.created_at, version = excluded.version,"
                " body = excluded.body, expires_at = excluded.expires_at"
                " WHERE task_records.expires_at IS NOT NULL AND task_records.expires_at <= ?",
                (*row, now),
            )
            if cur.rowcount == 1:
                return None
            found = conn.execute(_SELECT_ONE, (*row[:2], now)).fetchone()
            return str(found[0])

        existing = await self._run(insert)
        if existing is None:
            return record, True  # what is stored is its JSON: the caller's object is theirs
        return read_record(existing), False

    async def get(self, tenant: str, task_id: str) -> TaskRecord | None:
        """The record of ``tenant``'s task ``task_id``, or None."""

        def select(conn: sqlite3.Connection) -> Any:
            return conn.execute(_SELECT_ONE, (tenant, task_id, time.time())).fetchone()

        found = await self._run(select)
        return None if found is None else read_record(found[0])

    async def compare_and_set(self, record: TaskRecord, expected_version: int) -> bool:
        """Replace the record iff the stored one still has ``expected_version``."""
        if record.version != expected_version + 1:
            raise ValueError(f"record.version must be {expected_version + 1}, got {record.version}")
        expires = expires_at(record, self.retain_s)
        params = (
            record.state.value,
            record.version,
            record.model_dump_json(),
            expires,
            record.tenant,
            record.id,
            expected_version,
        )

        def update(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "UPDATE task_records SET state = ?, version = ?, body = ?, expires_at = ?"
                f" WHERE tenant = ? AND id = ? AND version = ? AND {_LIVE}",
                (*params, now),
            )
            if expires is not None:  # a task ended: take a few expired records with it
                conn.execute(_SWEEP, (now,))
            return cur.rowcount == 1

        return await self._run(update)

    async def delete(self, tenant: str, task_id: str, expected_version: int) -> bool:
        """Remove the record iff the stored one still has ``expected_version``."""

        def delete(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"DELETE FROM task_records WHERE tenant = ? AND id = ? AND version = ? AND {_LIVE}",
                (tenant, task_id, expected_version, time.time()),
            )
            return cur.rowcount == 1

        return await self._run(delete)

    async def list(
        self,
        tenant: str,
        *,
        state: TaskState | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[TaskRecord], str | None]:
        """A tenant's tasks, newest first; returns (page, cursor of the next page or None)."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationFailed(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        sql = f"SELECT body, created_at, id FROM task_records WHERE tenant = ? AND {_LIVE}"
        args: list[Any] = [tenant, time.time()]
        if state is not None:
            sql += " AND state = ?"
            args.append(state.value)
        if cursor is not None:
            after_ts, after_id = decode_cursor(cursor)
            sql += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            args += [after_ts, after_ts, after_id]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit + 1)

        def select(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql, args).fetchall()

        rows = await self._run(select)
        page = rows[:limit]
        records = [read_record(r[0]) for r in page]
        next_cursor = encode_cursor(page[-1][1], page[-1][2]) if len(rows) > limit else None
        return records, next_cursor
