"""Retention: a store with ``retain_s`` lets a finished task's record go ``retain_s`` after it ended.

Every backend: reads stop showing an expired record at once (get, list, list by state), its id is
free again, a compare-and-set on it fails, and records that can still change never expire. Then,
per engine, that the engine itself lets go of it: the SQLite row is deleted by the next finishes,
the Redis hash expires and its index entries are swept, the DynamoDB item carries the table's TTL
attribute and the table's TTL is on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import boto3
import pytest
import store_fixtures
from store_fixtures import RETAIN_S

from sdfleet.store.backends.dynamodb import TTL_ATTRIBUTE, DynamoTaskStore, record_key
from sdfleet.store.backends.redis import RedisTaskStore
from sdfleet.store.backends.sqlite import SqliteTaskStore
from sdfleet.store.base import SWEEP, TaskStore, reopen, transition
from sdfleet.tasks import Task, TaskRecord, TaskState

retaining_store = store_fixtures.retaining_store
set_state, tenant_name = store_fixtures.set_state, store_fixtures.tenant_name


async def finished(
    store: TaskStore, tenant: str, ended_ago: float, state: TaskState = TaskState.SUCCEEDED
) -> TaskRecord:
    """A task of ``tenant`` run and ended ``ended_ago`` seconds ago."""
    record, _ = await store.create(TaskRecord(task=Task(tenant=tenant)))
    await transition(store, tenant, record.id, set_state(TaskState.RUNNING))
    return await transition(store, tenant, record.id, set_state(state, finished_at=time.time() - ended_ago))


async def ids(store: TaskStore, tenant: str, state: TaskState | None = None) -> set[str]:
    page, _ = await store.list(tenant, state=state, limit=1000)
    return {r.id for r in page}


async def test_an_expired_record_is_gone_and_its_id_free(retaining_store: TaskStore) -> None:
    store, tenant = retaining_store, tenant_name()
    old = await finished(store, tenant, RETAIN_S + 5)
    failed = await finished(store, tenant, RETAIN_S + 5, TaskState.FAILED)
    recent = await finished(store, tenant, RETAIN_S - 60)
    long_ago = time.time() - 10 * RETAIN_S
    queued, _ = await store.create(TaskRecord(task=Task(tenant=tenant, created_at=long_ago)))

    assert await store.get(tenant, old.id) is None
    assert await store.get(tenant, failed.id) is None
    assert await store.get(tenant, recent.id) == recent
    assert await store.get(tenant, queued.id) == queued, "a task not finished never expires"
    assert await ids(store, tenant) == {recent.id, queued.id}
    assert await ids(store, tenant, TaskState.SUCCEEDED) == {recent.id}
    assert await ids(store, tenant, TaskState.FAILED) == set()

    stale = old.model_copy(update={"version": old.version + 1, "progress": 0.5})
    assert not await store.compare_and_set(stale, old.version), "an expired record is not written"

    again = TaskRecord(task=old.task.model_copy(update={"created_at": time.time()}))
    stored, created = await store.create(again)
    assert created and stored == again, "an expired record's id is free again"
    assert await store.get(tenant, old.id) == again
    assert await ids(store, tenant, TaskState.QUEUED) == {queued.id, old.id}
    assert await ids(store, tenant, TaskState.SUCCEEDED) == {recent.id}
    assert (await store.create(again.model_copy(deep=True)))[1] is False, "the new record is not"


async def test_a_record_that_expires_later_leaves_no_trace_under_its_id(retaining_store: TaskStore) -> None:
    """Live when written, expired a moment later (no sweep has run yet): the id is taken again
    and the new record is listed under its own state only."""
    store, tenant = retaining_store, tenant_name()
    record = await finished(store, tenant, RETAIN_S - 0.5, TaskState.CANCELLED)
    assert await ids(store, tenant, TaskState.CANCELLED) == {record.id}
    at = await expiry_of(store, record)  # DynamoDB's TTL is in whole seconds: up to 1 s later
    assert at is not None
    await asyncio.sleep(at - time.time() + 0.1)
    assert await store.get(tenant, record.id) is None
    assert await ids(store, tenant) == set()
    fresh, created = await store.create(TaskRecord(task=record.task))
    assert created
    assert await ids(store, tenant, TaskState.CANCELLED) == set()
    assert await ids(store, tenant, TaskState.QUEUED) == {record.id}
    assert await ids(store, tenant) == {record.id}
    running = await transition(store, tenant, record.id, set_state(TaskState.RUNNING), current=fresh)
    assert running.state is TaskState.RUNNING


async def test_a_reopened_record_is_kept_again(retaining_store: TaskStore) -> None:
    """A seed id's next run reopens a finished record: it is queued again and loses its expiry
    (checked through the engine: no expiry left)."""
    store, tenant = retaining_store, tenant_name()
    done = await finished(store, tenant, RETAIN_S - 60)
    assert await expiry_of(store, done) is not None
    nxt = await reopen(store, done, done.task.model_copy(update={"run": 2}))
    assert nxt is not None and nxt.state is TaskState.QUEUED and nxt.task.run == 2
    assert await expiry_of(store, nxt) is None
    ended = await finished_again(store, nxt)
    at = await expiry_of(store, ended)
    assert at is not None and abs(at - (ended.finished_at or 0) - RETAIN_S) < 2


async def finished_again(store: TaskStore, record: TaskRecord) -> TaskRecord:
    await transition(store, record.tenant, record.id, set_state(TaskState.RUNNING))
    ended = set_state(TaskState.SUCCEEDED, finished_at=time.time())
    return await transition(store, record.tenant, record.id, ended)


async def expiry_of(store: TaskStore, record: TaskRecord) -> float | None:
    """When the engine will let go of ``record`` (epoch s), as the engine itself holds it."""
    if isinstance(store, SqliteTaskStore):
        with sqlite3.connect(store.path) as conn:
            row = conn.execute(
                "SELECT expires_at FROM task_records WHERE tenant = ? AND id = ?", (record.tenant, record.id)
            ).fetchone()
        return None if row[0] is None else float(row[0])
    if isinstance(store, RedisTaskStore):
        ms = await store.client.pexpiretime(store._task_key(record.tenant, record.id))
        return None if ms < 0 else ms / 1000
    assert isinstance(store, DynamoTaskStore)
    item = _dynamo_item(store, record)
    return None if TTL_ATTRIBUTE not in item else float(item[TTL_ATTRIBUTE]["N"])


def _dynamo_item(store: DynamoTaskStore, record: TaskRecord) -> dict:  # type: ignore[type-arg]
    db = boto3.client("dynamodb", region_name="us-east-1")
    try:
        key = {"id": {"S": record_key(record.tenant, record.id)}}
        return db.get_item(TableName=store.table, Key=key, ConsistentRead=True).get("Item", {})
    finally:
        db.close()


async def test_the_engine_lets_expired_records_go(retaining_store: TaskStore) -> None:
    """SQLite: each finish deletes up to ``SWEEP`` expired rows, so a backlog goes in a few.
    Redis: the hash is gone and each finish sweeps ``SWEEP`` records' index entries. DynamoDB:
    the item carries ``expires_at`` (whole seconds, never early) and the table's TTL is on."""
    store, tenant = retaining_store, tenant_name()
    expired = [await finished(store, tenant, RETAIN_S + 5) for _ in range(SWEEP + 4)]
    kept = await finished(store, tenant, 0)
    if isinstance(store, SqliteTaskStore):
        # The sweeps ran at each finish: every expired row but the last ones written is gone.
        assert _sqlite_rows(store, tenant) <= {r.id for r in expired[-1:]} | {kept.id}
        await finished(store, tenant, 0)
        assert kept.id in _sqlite_rows(store, tenant)
        assert not _sqlite_rows(store, tenant) & {r.id for r in expired}
    elif isinstance(store, RedisTaskStore):
        client = store.client
        assert not any([await client.exists(store._task_key(tenant, r.id)) for r in expired])
        members = {m.decode() for m in await client.zrange(store._index(tenant), 0, -1)}
        assert members == {kept.id}, "the finishes swept the expired records' index entries"
        assert await client.zrange(store._index(tenant, TaskState.SUCCEEDED), 0, -1) == [kept.id.encode()]
        left = {m.decode() for m in await client.zrange(store._expiring, 0, -1)}
        assert left == {f"{tenant}/{kept.id}"}
        ttl_ms = await client.pttl(store._task_key(tenant, kept.id))
        assert RETAIN_S * 1000 - 60_000 < ttl_ms <= RETAIN_S * 1000
    else:
        assert isinstance(store, DynamoTaskStore)
        item = _dynamo_item(store, expired[0])
        assert int(item[TTL_ATTRIBUTE]["N"]) >= (expired[0].finished_at or 0) + RETAIN_S
        assert item[TTL_ATTRIBUTE]["N"].isdigit(), "TTL reads whole epoch seconds"
        db = boto3.client("dynamodb", region_name="us-east-1")
        try:
            ttl = db.describe_time_to_live(TableName=store.table)["TimeToLiveDescription"]
        finally:
            db.close()
        assert ttl["TimeToLiveStatus"] == "ENABLED" and ttl["AttributeName"] == TTL_ATTRIBUTE
    assert await store.get(tenant, kept.id) == kept


def _sqlite_rows(store: SqliteTaskStore, tenant: str) -> set[str]:
    with sqlite3.connect(store.path) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM task_records WHERE tenant = ?", (tenant,))}


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_file_from_before_retention_is_migrated(tmp_path, backend: str) -> None:  # type: ignore[no-untyped-def]
    """A SQLite file whose table has no ``expires_at`` gains it; its records stay, kept for ever."""
    path = tmp_path / "old.db"
    record = TaskRecord(task=Task(tenant="default"), state=TaskState.SUCCEEDED, finished_at=1.0)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE task_records (tenant TEXT NOT NULL, id TEXT NOT NULL, state TEXT NOT NULL,"
            " created_at REAL NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,"
            " PRIMARY KEY (tenant, id))"
        )
        conn.execute(
            "INSERT INTO task_records VALUES (?, ?, ?, ?, ?, ?)",
            ("default", record.id, "succeeded", record.task.created_at, 0, record.model_dump_json()),
        )
    store = SqliteTaskStore(path, retain_s=RETAIN_S)
    try:
        assert await store.get("default", record.id) == record, "written before: no expiry"
        fresh = await finished(store, "default", RETAIN_S + 5)
        assert await store.get("default", fresh.id) is None
        assert await store.get("default", record.id) == record
    finally:
        await store.aclose()
