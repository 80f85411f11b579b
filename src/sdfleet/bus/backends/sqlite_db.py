"""Synchronous SQLite side of ``SqliteBus``: schema, transactions and the queue operations.

Every function here runs on the bus's single worker thread. Writers take ``BEGIN IMMEDIATE`` so two
processes sharing the file serialise on the write lock instead of both leasing the same row.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdfleet.bus.base import (
    DLQ_RETENTION_S,
    DLQ_SUFFIX,
    QUEUE_RETENTION_S,
    Delivery,
    QueueStats,
    Subscription,
    Topology,
    dlq_name,
)
from sdfleet.errors import BusUnavailable, ConfigError, NotFound
from sdfleet.policy import matching_queues

BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_topics (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS bus_queues (
    name TEXT PRIMARY KEY,
    lease_s REAL NOT NULL,
    max_receives INTEGER NOT NULL,
    dlq TEXT,
    retention_s REAL
);
CREATE TABLE IF NOT EXISTS bus_subscriptions (
    topic TEXT NOT NULL,
    queue TEXT NOT NULL,
    filter_policy TEXT,
    scope TEXT NOT NULL,
    PRIMARY KEY (topic, queue)
);
CREATE TABLE IF NOT EXISTS bus_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,
    sent_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS bus_messages_ready ON bus_messages (queue, visible_at, id);
CREATE INDEX IF NOT EXISTS bus_messages_age ON bus_messages (queue, sent_at);
"""


@contextmanager
def map_errors() -> Iterator[None]:
    """Translate sqlite3 errors (locked past busy_timeout, I/O, corrupt file) into ``BusUnavailable``."""
    try:
        yield
    except sqlite3.Error as e:
        raise BusUnavailable(f"sqlite bus: {e}") from e


@contextmanager
def write_tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction holding the database's write lock from the start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    create_schema(conn)
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    # Not executescript(): it would commit our BEGIN IMMEDIATE before running.
    with write_tx(conn):
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(bus_queues)")}
        if "retention_s" not in columns:  # a file from before messages expired
            conn.execute("ALTER TABLE bus_queues ADD COLUMN retention_s REAL")


def ensure(conn: sqlite3.Connection, topology: Topology) -> None:
    with write_tx(conn):
        for topic in {*topology.topics, *(s.topic for s in topology.subscriptions)}:
            conn.execute("INSERT OR IGNORE INTO bus_topics (name) VALUES (?)", (topic,))
        for q in topology.queues:
            dlq = dlq_name(q.name)
            conn.execute(
                "INSERT INTO bus_queues (name, lease_s, max_receives, dlq, retention_s)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET lease_s = excluded.lease_s,"
                " max_receives = excluded.max_receives, dlq = excluded.dlq,"
                " retention_s = excluded.retention_s",
                (q.name, q.lease_s, q.max_receives, dlq, q.retention_s),
            )
            conn.execute(
                "INSERT OR IGNORE INTO bus_queues (name, lease_s, max_receives, dlq, retention_s)"
                " VALUES (?, ?, ?, NULL, ?)",
                (dlq, q.lease_s, q.max_receives, DLQ_RETENTION_S),
            )
        for s in topology.subscriptions:
            if _queue_row(conn, s.queue) is None:
                raise ConfigError(f"subscription of {s.topic!r} to unknown queue {s.queue!r}")
            policy = None if s.filter_policy is None else json.dumps(s.filter_policy, sort_keys=True)
            conn.execute(
                "INSERT INTO bus_subscriptions (topic, queue, filter_policy, scope) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (topic, queue) DO UPDATE SET "
                "filter_policy = excluded.filter_policy, scope = excluded.scope",
                (s.topic, s.queue, policy, s.scope),
            )


def _queue_row(conn: sqlite3.Connection, queue: str) -> tuple[float, int, str | None, float] | None:
    """(lease_s, max_receives, dlq, retention_s) of ``queue``, or None."""
    row = conn.execute(
        "SELECT lease_s, max_receives, dlq, retention_s FROM bus_queues WHERE name = ?", (queue,)
    ).fetchone()
    return None if row is None else (float(row[0]), int(row[1]), row[2], _retention(queue, row[3]))


def _retention(queue: str, stored: float | None) -> float:
    """A queue's retention; a row from before messages expired has none: SQS's defaults."""
    if stored is not None:
        return float(stored)
    return DLQ_RETENTION_S if queue.endswith(DLQ_SUFFIX) else QUEUE_RETENTION_S


def _subscriptions(conn: sqlite3.Connection, topic: str) -> list[Subscription]:
    rows = conn.execute(
        "SELECT queue, filter_policy, scope FROM bus_subscriptions WHERE topic = ? ORDER BY queue", (topic,)
    ).fetchall()
    return [
        Subscription(topic=topic, queue=q, filter_policy=None if p is None else json.loads(p), scope=scope)
        for q, p, scope in rows
    ]


def publish(conn: sqlite3.Connection, topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
    message_id = uuid.uuid4().hex
    attrs = json.dumps(dict(attributes), sort_keys=True)
    with write_tx(conn):
        if conn.execute("SELECT 1 FROM bus_topics WHERE name = ?", (topic,)).fetchone() is None:
            raise NotFound(f"topic {topic!r} does not exist")
        queues = matching_queues(_subscriptions(conn, topic), topic, attributes, body)
        now = time.time()
        conn.executemany(
            "INSERT INTO bus_messages (queue, message_id, body, attributes, sent_at, visible_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(q, message_id, body, attrs, now, now) for q in queues],
        )
        for q in queues:  # so a queue nobody reads keeps only its last retention_s of messages
            spec = _queue_row(conn, q)
            if spec is not None:
                _expire(conn, q, spec[3], now)
    return message_id


def _expire(conn: sqlite3.Connection, queue: str, keep_s: float, now: float) -> None:
    """Drop ``queue``'s messages sent more than ``keep_s`` ago, leased or not (SQS's rule)."""
    conn.execute("DELETE FROM bus_messages WHERE queue = ? AND sent_at < ?", (queue, now - keep_s))


def receive(conn: sqlite3.Connection, queue: str, max_messages: int, lease_s: float | None) -> list[Delivery]:
    with write_tx(conn):
        spec = _queue_row(conn, queue)
        if spec is None:
            raise NotFound(f"queue {queue!r} does not exist")
        default_lease, max_receives, dlq, keep_s = spec
        lease = default_lease if lease_s is None else lease_s
        _expire(conn, queue, keep_s, time.time())
        out: list[Delivery] = []
        while len(out) < max_messages:
            now = time.time()
            rows = conn.execute(
                "SELECT id, message_id, body, attributes, sent_at, receive_count FROM bus_messages "
                "WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?",
                (queue, now, max_messages - len(out)),
            ).fetchall()
            if not rows:
                break
            for row in rows:
                if dlq is not None and row[5] >= max_receives:
                    # SQS redrive: the receive that would exceed max_receives moves the message instead.
                    conn.execute(
                        "UPDATE bus_messages SET queue = ?, visible_at = ?, receipt = NULL WHERE id = ?",
                        (dlq, now, row[0]),
                    )
                    if (dead := _queue_row(conn, dlq)) is not None:  # counted from its first send
                        _expire(conn, dlq, dead[3], now)
                else:
                    out.append(_lease(conn, queue, row, now + lease))
        return out


def _lease(conn: sqlite3.Connection, queue: str, row: tuple[Any, ...], visible_at: float) -> Delivery:
    rowid, message_id, body, attributes, sent_at, count = row
    receipt = f"{rowid}:{uuid.uuid4().hex}"
    conn.execute(
        "UPDATE bus_messages SET visible_at = ?, receive_count = ?, receipt = ? WHERE id = ?",
        (visible_at, count + 1, receipt, rowid),
    )
    return Delivery(
        queue=queue,
        message_id=message_id,
        body=bytes(body),
        attributes=json.loads(attributes),
        receive_count=count + 1,
        receipt=receipt,
        sent_at=float(sent_at),
    )


def _rowid(receipt: str) -> int:
    try:
        return int(receipt.split(":", 1)[0])
    except ValueError as e:
        raise NotFound(f"not a sqlite bus receipt: {receipt!r}") from e


def ack(conn: sqlite3.Connection, receipt: str) -> bool:
    with write_tx(conn):
        cur = conn.execute(
            "DELETE FROM bus_messages WHERE id = ? AND receipt = ?", (_rowid(receipt), receipt)
        )
        return cur.rowcount > 0


def set_visible(conn: sqlite3.Connection, receipt: str, delay_s: float, *, keep_lease: bool) -> bool:
    """Move a leased message's visibility to now + ``delay_s``; without ``keep_lease`` the receipt dies."""
    sql = "UPDATE bus_messages SET visible_at = ?" + ("" if keep_lease else ", receipt = NULL")
    with write_tx(conn):
        cur = conn.execute(
            sql + " WHERE id = ? AND receipt = ?", (time.time() + delay_s, _rowid(receipt), receipt)
        )
        return cur.rowcount > 0


def stats(conn: sqlite3.Connection, queue: str) -> QueueStats:
    if _queue_row(conn, queue) is None:
        raise NotFound(f"queue {queue!r} does not exist")
    now = time.time()
    visible, in_flight, delayed, oldest = conn.execute(
        "SELECT "
        "COALESCE(SUM(visible_at <= :now), 0), "
        "COALESCE(SUM(visible_at > :now AND receipt IS NOT NULL), 0), "
        "COALESCE(SUM(visible_at > :now AND receipt IS NULL), 0), "
        "MIN(sent_at) FROM bus_messages WHERE queue = :queue",
        {"now": now, "queue": queue},
    ).fetchone()
    (dead,) = conn.execute("SELECT COUNT(*) FROM bus_messages WHERE queue = ?", (dlq_name(queue),)).fetchone()
    return QueueStats(
        queue=queue,
        visible=int(visible),
        in_flight=int(in_flight),
        delayed=int(delayed),
        oldest_age_s=None if oldest is None else max(0.0, now - float(oldest)),
        dead_letters=int(dead),
    )
