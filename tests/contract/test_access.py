"""AccessStore contract: stored keys, GCRA buckets, in-flight counts and claims, on every engine
the task store runs on (the same file, prefix or table as the task records)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import boto3
import pytest

from sdfleet.store import open_store
from sdfleet.store.access import AccessStore, ApiKey, digest, new_key, open_access
from sdfleet.store.backends.access_dynamodb import DynamoAccessStore
from sdfleet.store.backends.access_redis import RedisAccessStore
from sdfleet.store.backends.access_sqlite import SqliteAccessStore
from sdfleet.store.backends.dynamodb import TTL_ATTRIBUTE
from sdfleet.store.base import TaskStore, transition
from sdfleet.tasks import Task, TaskRecord, TaskState


def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh namespace on each task-store engine (the URL both stores are opened from)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'sdfleet.db'}"
    if backend == "redis":
        return f"{request.getfixturevalue('redis_server').url}?prefix=a-{uuid.uuid4().hex}"
    request.getfixturevalue("moto_url")
    return f"aws://?table=a-{uuid.uuid4().hex[:12]}&region=us-east-1"


@pytest.fixture(params=["sqlite", "redis", "dynamodb"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[AccessStore, TaskStore]]:
    """An access store and the task store it sits beside (one engine, one namespace)."""
    url = store_url(request.param, request, tmp_path)
    tasks, access = open_store(url), open_access(url)
    yield access, tasks
    await access.aclose()
    await tasks.aclose()


def tenant_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_key(tenant: str, **limits: object) -> tuple[str, ApiKey]:
    secret, key_id = new_key()
    return secret, ApiKey(id=key_id, digest=digest(secret), tenant=tenant, **limits)  # type: ignore[arg-type]


async def test_keys_are_found_by_digest_listed_and_revoked(engine: tuple[AccessStore, TaskStore]) -> None:
    access, _ = engine
    secret, key = make_key(tenant_name(), tier="paid", rate_limit=2.5, max_in_flight=3)
    _, other = make_key(tenant_name())
    await access.add_key(key)
    await access.add_key(other)
    assert await access.find_key(digest(secret)) == key
    assert await access.find_key(digest("not a key")) is None
    assert [k.id for k in await access.keys()] == [key.id, other.id]
    revoked = await access.revoke(key.id)
    assert revoked is not None and revoked.revoked_at is not None and not revoked.active
    found = await access.find_key(key.digest)
    assert found is not None and found.revoked_at == revoked.revoked_at
    again = await access.revoke(key.id)
    assert again is not None and again.revoked_at == revoked.revoked_at, "revoking twice keeps the first time"
    assert await access.revoke("0123456789ab") is None
    assert {k.id: k.active for k in await access.keys()} == {key.id: False, other.id: True}


async def test_take_admits_a_burst_then_refuses_with_the_wait(engine: tuple[AccessStore, TaskStore]) -> None:
    access, _ = engine
    bucket = tenant_name()
    waits = [await access.take(bucket, rate=0.5, burst=3) for _ in range(5)]
    assert waits[:3] == [0, 0, 0]
    # refused: the next slot is about one interval (2 s) away, less the time the calls took
    assert all(1.0 < w <= 2.0 for w in waits[3:]), waits
    assert await access.take(tenant_name(), rate=0.5, burst=3) == 0, "buckets are independent"


async def test_take_is_atomic_across_clients(engine: tuple[AccessStore, TaskStore]) -> None:
    access, _ = engine
    bucket = tenant_name()
    results = await asyncio.gather(*(access.take(bucket, rate=0.01, burst=4) for _ in range(12)))
    assert sum(1 for w in results if w == 0) == 4, results


async def test_count_active_counts_queued_and_running_up_to_the_bound(
    engine: tuple[AccessStore, TaskStore],
) -> None:
    access, tasks = engine
    tenant = tenant_name()
    records = [TaskRecord(task=Task(tenant=tenant)) for _ in range(5)]
    for r in records:
        await tasks.create(r)
    await tasks.create(TaskRecord(task=Task(tenant=tenant_name())))

    def to(state: TaskState) -> Callable[[TaskRecord], TaskRecord]:
        def mutate(r: TaskRecord) -> TaskRecord:
            r.state = state
            return r

        return mutate

    await transition(tasks, tenant, records[0].id, to(TaskState.RUNNING))
    await transition(tasks, tenant, records[1].id, to(TaskState.CANCELLED))
    await transition(tasks, tenant, records[2].id, to(TaskState.RUNNING))
    await transition(tasks, tenant, records[2].id, to(TaskState.SUCCEEDED))
    assert await _eventually(access, tenant, 10, 3)  # 0 running, 3 and 4 queued
    assert await access.count_active(tenant, 2) == 2
    assert await access.count_active(tenant_name(), 10) == 0


async def _eventually(access: AccessStore, tenant: str, at_most: int, want: int) -> bool:
    # DynamoDB's index is eventually consistent (moto's is not; AWS's takes milliseconds).
    for _ in range(50):
        if await access.count_active(tenant, at_most) == want:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_claims_are_exclusive_until_released_or_expired(engine: tuple[AccessStore, TaskStore]) -> None:
    access, _ = engine
    name = f"{tenant_name()}/some-id"
    results = await asyncio.gather(*(access.claim(name, ttl_s=30) for _ in range(6)))
    assert sorted(results) == [False] * 5 + [True]
    await access.release(name)
    assert await access.claim(name, ttl_s=0.3)
    assert not await access.claim(name, ttl_s=30)
    await asyncio.sleep(0.4)
    assert await access.claim(name, ttl_s=30), "an expired claim can be taken"


async def test_a_spent_claim_does_not_stay_for_ever(engine: tuple[AccessStore, TaskStore]) -> None:
    """A claim is taken per submitted task: released, it must not stay in the engine. SQLite and
    Redis delete it; DynamoDB marks it with the table's one TTL attribute (the one task records
    use), and the store turns the table's TTL on."""
    access, _ = engine
    name = f"{tenant_name()}/spent"
    assert await access.claim(name, ttl_s=30)
    await access.release(name)
    if isinstance(access, SqliteAccessStore):
        with sqlite3.connect(access.path) as conn:
            assert conn.execute("SELECT count(*) FROM claims WHERE name = ?", (name,)).fetchone() == (0,)
    elif isinstance(access, RedisAccessStore):
        assert not await access.client.exists(f"{access.prefix}:claim:{name}")
    else:
        assert isinstance(access, DynamoAccessStore)
        db = boto3.client("dynamodb", region_name="us-east-1")
        try:
            item = db.get_item(TableName=access.table, Key={"id": {"S": f"!claim/{name}"}})["Item"]
            ttl = db.describe_time_to_live(TableName=access.table)["TimeToLiveDescription"]
        finally:
            db.close()
        assert int(item[TTL_ATTRIBUTE]["N"]) <= time.time() + 1, "due for DynamoDB's TTL now"
        assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", TTL_ATTRIBUTE)
    assert await access.claim(name, ttl_s=30), "and it can be taken again"
