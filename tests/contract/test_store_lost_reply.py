"""A conditional write whose reply is lost is applied once.

The networked stores' clients retry a request whose connection dropped (botocore's "standard"
mode, redis-py's ``Retry``). When the first try had landed, the retry's condition fails on the
store's own write: without care the store answers "lost the race", and ``transition`` applies its
change a second time on top of the first (an attempt counted twice, a claim refused to its own
agent). Each test here loses one reply between a real server and the store (``LostReplyProxy``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import pytest
import store_fixtures

from lost_reply import LostReplyProxy, proxy_to, script_marker
from sdfleet.store import open_store
from sdfleet.store.access import open_access
from sdfleet.store.backends import redis as redis_store
from sdfleet.store.base import TaskStore, transition
from sdfleet.tasks import Task, TaskRecord, TaskState

set_state, tenant_name = store_fixtures.set_state, store_fixtures.tenant_name


# What marks each backend's conditional writes on the wire: (create, compare-and-set).
MARKERS = {
    "redis": (script_marker(redis_store._CREATE), script_marker(redis_store._CAS)),
    "dynamodb": (b"attribute_not_exists(id) OR NOT", b"version = :expected"),
}


class Proxied(NamedTuple):
    url: str
    """The store URL, whose server the test reaches through ``proxy``."""
    proxy: LostReplyProxy
    create: bytes
    cas: bytes


@pytest.fixture(params=list(MARKERS))
def proxied(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxied]:
    """A fresh namespace on each networked engine, reached through a ``LostReplyProxy``."""
    proxy = proxy_to(request.param, request, monkeypatch)
    if request.param == "redis":
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix=t-{uuid.uuid4().hex}"
    else:
        url = f"aws://?table=t-{uuid.uuid4().hex[:12]}&region=us-east-1"
    with proxy:
        yield Proxied(url, proxy, *MARKERS[request.param])


@pytest.fixture
async def store(proxied: Proxied) -> AsyncIterator[TaskStore]:
    opened = open_store(proxied.url)
    yield opened
    await opened.aclose()


def _bump(r: TaskRecord) -> TaskRecord:
    r.attempts += 1
    return r


async def test_a_transition_whose_reply_is_lost_is_applied_once(proxied: Proxied, store: TaskStore) -> None:
    proxy, cas = proxied.proxy, proxied.cas
    rec = TaskRecord(task=Task(tenant=tenant_name()))
    await store.create(rec)
    await transition(store, rec.tenant, rec.id, set_state(TaskState.RUNNING))

    proxy.lose_next(cas)
    done = await transition(store, rec.tenant, rec.id, _bump)
    assert proxy.lost == 1, "the reply was not lost: the test proves nothing"
    stored = await store.get(rec.tenant, rec.id)
    assert stored is not None
    assert (done.attempts, done.version) == (1, 2)
    assert stored == done, "what transition returned is what the store holds"


async def test_a_create_whose_reply_is_lost_is_created(proxied: Proxied, store: TaskStore) -> None:
    proxy, create = proxied.proxy, proxied.create
    await store.create(TaskRecord(task=Task(tenant=tenant_name())))  # Redis: the script is loaded
    rec = TaskRecord(task=Task(tenant=tenant_name()))
    proxy.lose_next(create)
    stored, created = await store.create(rec)
    assert proxy.lost == 1, "the reply was not lost: the test proves nothing"
    assert created, "the store's own write is not someone else's task"
    assert stored == rec
    # and a second create of the id still finds it taken
    again, created_again = await store.create(rec.model_copy(update={"state": TaskState.FAILED}))
    assert not created_again and again == rec


async def test_concurrent_writes_of_equal_content_are_each_their_own(store: TaskStore) -> None:
    """Equal content is not proof of identity: only a write's own token is."""
    rec = TaskRecord(task=Task(tenant=tenant_name()))
    await store.create(rec)
    same = rec.model_copy(update={"state": TaskState.RUNNING, "version": 1, "updated_at": 5.0})
    results = await asyncio.gather(*(store.compare_and_set(same.model_copy(), 0) for _ in range(6)))
    assert sorted(results) == [False] * 5 + [True]


async def test_a_stale_write_whose_reply_is_lost_still_loses(proxied: Proxied, store: TaskStore) -> None:
    """The retry's check must not take another writer's record for its own."""
    proxy, cas = proxied.proxy, proxied.cas
    rec = TaskRecord(task=Task(tenant=tenant_name()))
    await store.create(rec)
    winner = rec.model_copy(update={"state": TaskState.RUNNING, "version": 1, "worker": "a"})
    assert await store.compare_and_set(winner, 0)
    loser = rec.model_copy(update={"state": TaskState.RUNNING, "version": 1, "worker": "b"})
    proxy.lose_next(cas)
    assert not await store.compare_and_set(loser, 0)
    got = await store.get(rec.tenant, rec.id)
    assert got is not None and got.worker == "a"


async def test_a_claim_whose_reply_is_lost_is_held(proxied: Proxied) -> None:
    """The API's claim on a caller's task id: lost, the submit would wait for a winner that never
    records the task."""
    access = open_access(proxied.url)
    try:
        name = f"{tenant_name()}/{uuid.uuid4().hex}"
        proxied.proxy.lose_next(name.encode())
        assert await access.claim(name, ttl_s=30), "its own claim, sent again"
        assert proxied.proxy.lost == 1, "the reply was not lost: the test proves nothing"
        assert not await access.claim(name, ttl_s=30), "and nobody else's"
    finally:
        await access.aclose()


async def test_a_take_whose_reply_is_lost_is_charged_once(proxied: Proxied) -> None:
    """A rate limit's take: charged twice, a caller within its limit would be refused."""
    access = open_access(proxied.url)
    try:
        bucket = f"{tenant_name()}/lost"
        await access.take(f"{bucket}-warm", rate=0.001, burst=1)  # Redis: the script is loaded
        # Redis: the script call names the bucket; DynamoDB: only the put writes a "tat"
        proxied.proxy.lose_next(bucket.encode() if proxied.url.startswith("redis") else b'"tat": {')
        assert await access.take(bucket, rate=0.001, burst=1) == 0.0, "admitted: its first take"
        assert proxied.proxy.lost == 1, "the reply was not lost: the test proves nothing"
        assert await access.take(bucket, rate=0.001, burst=1) > 900, "charged once: the next waits"
    finally:
        await access.aclose()


@pytest.mark.parametrize("step", [b"SETINFO", b"MAINT_NOTIFICATIONS"])
async def test_a_new_redis_connection_sets_up_with_one_round_trip(redis_server: Any, step: bytes) -> None:
    """redis-py retries a command whose reply is lost, but not the setup of a new connection, so
    every round trip of that setup is a call that fails where a command would have succeeded."""
    with LostReplyProxy(redis_server.port) as proxy:
        store = open_store(f"redis://127.0.0.1:{proxy.port}/0?prefix=t-{uuid.uuid4().hex}")
        try:
            proxy.lose_next(step)
            assert await store.get("t", "none") is None
            assert proxy.lost == 0, f"the connection's setup still sends {step!r}"
        finally:
            await store.aclose()
