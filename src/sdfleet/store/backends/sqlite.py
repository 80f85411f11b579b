"""The embedded task store: one table in the SQLite file the bus also uses (WAL, several processes).

Each record is stored as its JSON next to the columns that queries need (tenant, state, created_at,
version); the key is (tenant, id), ids being per tenant. Compare-and-set is a single
``UPDATE … WHERE tenant = ? AND id = ? AND version = ?``, which SQLite makes atomic across
processes. All SQLite calls run on one worker thread per store, off the event loop.

A file written before ids were per tenant (key ``id`` alone) is migrated in place when a store
first connects to it.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from typing import Any, TypeVar

from sdfleet import jsonsafe
from sdfleet.errors import ValidationFailed
from sdfleet.store.backends._sqlite_file import SqliteFile, sqlite_path
from sdfleet.store.base import read_record
from sdfleet.tasks import TaskRecord, TaskState

T = TypeVar("T")

_SELECT_ONE = "SELECT body FROM task_records WHERE tenant = ? AND id = ?"

MAX_PAGE = 1000

_TABLE = """
CREATE TABLE IF NOT EXISTS task_records (
    tenant     TEXT NOT NULL,
    id         TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at REAL NOT NULL,
    version    INTEGER NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (tenant, id)
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS task_records_by_tenant
    ON task_records (tenant, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS task_records_by_tenant_state
    ON task_records (tenant, state, created_at DESC, id DESC);
"""
_COLUMNS = "tenant, id, state, created_at, version, body"


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

    @classmethod
    def from_url(cls, url: str) -> SqliteTaskStore:
        return cls(sqlite_path(url))

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
        )

        def insert(conn: sqlite3.Connection) -> str | None:
            cur = conn.execute(
                f"INSERT INTO task_records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, id) DO NOTHING",
                row,
            )
            if cur.rowcount == 1:
                return None
            found = conn.execute(_SELECT_ONE, row[:2]).fetchone()
            return str(found[0])

        existing = await self._run(insert)
        if existing is None:
            return record, True  # what is stored is its JSON: the caller's object is theirs
        return read_record(existing), False

    async def get(self, tenant: str, task_id: str) -> TaskRecord | None:
        """The record of ``tenant``'s task ``task_id``, or None."""

        def select(conn: sqlite3.Connection) -> Any:
            return conn.execute(_SELECT_ONE, (tenant, task_id)).fetchone()

        found = await self._run(select)
        return None if found is None else read_record(found[0])

    async def compare_and_set(self, record: TaskRecord, expected_version: int) -> bool:
        """Replace the record iff the stored one still has ``expected_version``."""
        if record.version != expected_version + 1:
            raise ValueError(f"record.version must be {expected_version + 1}, got {record.version}")
        params = (
            record.state.value,
            record.version,
            record.model_dump_json(),
            record.tenant,
            record.id,
            expected_version,
        )

        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE task_records SET state = ?, version = ?, body = ?"
                " WHERE tenant = ? AND id = ? AND version = ?",
                params,
            )
            return cur.rowcount == 1

        return await self._run(update)

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
        sql = "SELECT body, created_at, id FROM task_records WHERE tenant = ?"
        args: list[Any] = [tenant]
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
