"""The access store in the embedded SQLite file (beside the task records; several processes).

Tables: ``api_keys`` (one row per key, by digest), ``rate_limits`` (one GCRA bucket per row: its
theoretical arrival time) and ``claims`` (name, expiry). Each operation is one statement or one
``BEGIN IMMEDIATE`` transaction, so it is atomic across every process that opens the file.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TypeVar

from sdfleet.store.access import ApiKey
from sdfleet.store.backends._sqlite_file import SqliteFile, sqlite_path
from sdfleet.store.backends.sqlite import ensure_schema

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    digest TEXT PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    body   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_limits (bucket TEXT PRIMARY KEY, tat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS claims (name TEXT PRIMARY KEY, expires REAL NOT NULL);
"""

# Admit when the new theoretical arrival time is within ``burst`` intervals of now; else no row.
_TAKE = """
INSERT INTO rate_limits (bucket, tat) VALUES (:bucket, :now + :interval)
ON CONFLICT (bucket) DO UPDATE SET tat = max(tat, :now) + :interval
WHERE max(tat, :now) + :interval - :now <= :burst * :interval + 1e-9
RETURNING tat
"""

_ACTIVE = """
SELECT count(*) FROM (
    SELECT 1 FROM task_records WHERE tenant = ? AND state IN ('queued', 'running') LIMIT ?
)
"""


class SqliteAccessStore(SqliteFile):
    """``AccessStore`` on a SQLite file; safe to share between processes."""

    what = "sqlite access store"

    @classmethod
    def from_url(cls, url: str) -> SqliteAccessStore:
        return cls(sqlite_path(url))

    def prepare(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SCHEMA)
        ensure_schema(conn)  # count_active reads the task records

    async def add_key(self, key: ApiKey) -> None:
        row = (key.digest, key.id, key.model_dump_json())
        await self._run(lambda c: c.execute("INSERT INTO api_keys VALUES (?, ?, ?)", row))

    async def find_key(self, key_digest: str) -> ApiKey | None:
        sql = "SELECT body FROM api_keys WHERE digest = ?"
        found = await self._run(lambda c: c.execute(sql, (key_digest,)).fetchone())
        return None if found is None else ApiKey.model_validate_json(found[0])

    async def keys(self) -> list[ApiKey]:
        rows = await self._run(lambda c: c.execute("SELECT body FROM api_keys").fetchall(), read=True)
        return sorted((ApiKey.model_validate_json(r[0]) for r in rows), key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> ApiKey | None:
        def revoke(conn: sqlite3.Connection) -> str | None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = conn.execute("SELECT body FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
                if found is None:
                    return None
                key = ApiKey.model_validate_json(found[0])
                if key.revoked_at is None:
                    key.revoked_at = time.time()
                    conn.execute(
                        "UPDATE api_keys SET body = ? WHERE key_id = ?", (key.model_dump_json(), key_id)
                    )
                return key.model_dump_json()
            finally:
                conn.execute("COMMIT")

        body = await self._run(revoke)
        return None if body is None else ApiKey.model_validate_json(body)

    async def take(self, bucket: str, rate: float, burst: int) -> float:
        now, interval = time.time(), 1.0 / rate
        args = {"bucket": bucket, "now": now, "interval": interval, "burst": burst}

        def take(conn: sqlite3.Connection) -> float:
            if conn.execute(_TAKE, args).fetchone() is not None:
                return 0.0
            found = conn.execute("SELECT tat FROM rate_limits WHERE bucket = ?", (bucket,)).fetchone()
            tat = float(found[0]) if found else now
            return max(1e-3, max(tat, now) + interval - now - burst * interval)

        return await self._run(take)

    async def count_active(self, tenant: str, at_most: int) -> int:
        found = await self._run(lambda c: c.execute(_ACTIVE, (tenant, at_most)).fetchone())
        return int(found[0])

    async def claim(self, name: str, ttl_s: float) -> bool:
        now = time.time()
        sql = (
            "INSERT INTO claims (name, expires) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET expires = excluded.expires WHERE claims.expires <= ?"
        )
        return await self._run(lambda c: c.execute(sql, (name, now + ttl_s, now)).rowcount == 1)

    async def release(self, name: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM claims WHERE name = ?", (name,)))
