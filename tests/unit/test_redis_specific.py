"""Redis-only behaviour of the bus and task store: KEDA names, URLs, a server that goes away and comes back.

Restart tests run on a private ``RedisServer`` so the session's shared server is never disturbed.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection

from sdfleet._redis import split_url
from sdfleet.bus import Bus, QueueSpec, Subscription, Topology, open_bus
from sdfleet.bus.backends.redis import RedisBus, stream_names
from sdfleet.errors import BusUnavailable, ConfigError, StoreUnavailable
from sdfleet.store import open_store
from sdfleet.tasks import Task, TaskRecord


def topology(queue: str, **queue_kw: float) -> Topology:
    return Topology(
        topics=["tasks"],
        queues=[QueueSpec(name=queue, **queue_kw)],
        subscriptions=[Subscription(topic="tasks", queue=queue)],
    )


# tests/conftest.py's RedisServer; "conftest" is not importable by name with two conftest.py files.
RedisServer = Any


@pytest.fixture
def private_redis(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    server = type(redis_server)(tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def test_stream_names_are_what_keda_watches() -> None:
    assert stream_names("sdfleet", "sd15") == ("sdfleet:queue:sd15", "sdfleet")
    assert stream_names("prod", "sd15-dlq") == ("prod:queue:sd15-dlq", "sdfleet")


async def test_keda_view_of_a_queue(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    """What the ``redis-streams`` scaler reads: XLEN (streamLength), XINFO GROUPS pending and lag."""
    prefix = f"k{uuid.uuid4().hex[:8]}"
    async with RedisBus.from_url(f"{redis_server.url}?prefix={prefix}") as bus:
        await bus.ensure(topology("sd15"))
        for i in range(5):
            await bus.publish("tasks", f"m{i}".encode(), {})
        got = await bus.receive("sd15", max_messages=2, lease_s=30)
        await bus.ack(got[0])
        await bus.release(got[1])  # back at the end of the stream: undelivered again
        await bus.receive("sd15", lease_s=30)
        stream, group = stream_names(prefix, "sd15")
        (info,) = await raw.xinfo_groups(stream)
        assert info["name"].decode() == group
        # 4 messages left: 1 leased (pending), 3 never delivered since they entered the stream (lag).
        assert (await raw.xlen(stream), info["pending"], info["lag"]) == (4, 1, 3)
        stats = await bus.stats("sd15")
        assert (stats.visible, stats.in_flight) == (3, 1)


async def test_due_delayed_message_reaches_the_stream_without_a_receiver(
    redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    """A release with delay leaves the stream; ``stats`` (polled by API/metrics) puts it back for KEDA."""
    prefix = f"k{uuid.uuid4().hex[:8]}"
    async with RedisBus.from_url(f"{redis_server.url}?prefix={prefix}") as bus:
        await bus.ensure(topology("q"))
        await bus.publish("tasks", b"m", {})
        (d,) = await bus.receive("q", lease_s=30)
        await bus.release(d, delay_s=0.3)
        stream, _ = stream_names(prefix, "q")
        assert (await bus.stats("q")).delayed == 1
        assert await raw.xlen(stream) == 0
        await asyncio.sleep(0.4)
        stats = await bus.stats("q")
        assert (stats.visible, stats.delayed) == (1, 0)
        (info,) = await raw.xinfo_groups(stream)
        assert (info["pending"], info["lag"]) == (0, 1)


def test_url_prefix_password_and_tls() -> None:
    assert split_url("redis://127.0.0.1:6379/2?prefix=fleet-a&socket_timeout=3") == (
        "redis://127.0.0.1:6379/2?socket_timeout=3",
        "fleet-a",
    )
    assert split_url("redis://h:1/0")[1] == "sdfleet"
    bus = RedisBus.from_url("rediss://:s3cret@cache.internal:6380/1?prefix=p")
    pool = bus.client.connection_pool
    assert pool.connection_class is SSLConnection
    assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"], bus.prefix) == (
        "s3cret",
        1,
        "p",
    )
    with pytest.raises(ConfigError):
        split_url("redis://h:1/0?prefix=bad prefix")
    with pytest.raises(ConfigError):
        split_url("http://h:1/0")


async def test_bus_and_store_survive_a_restart_without_new_objects(private_redis: RedisServer) -> None:
    bus = open_bus(f"{private_redis.url}?prefix=r")
    store = open_store(f"{private_redis.url}?prefix=r")
    try:
        await bus.ensure(topology("q"))
        await bus.publish("tasks", b"before", {})
        record, _ = await store.create(TaskRecord(task=Task()))
        private_redis.stop()
        with pytest.raises(BusUnavailable, match=r"redis bus \(redis at 127\.0\.0\.1:\d+/0\) is unavailable"):
            await bus.receive("q", wait_s=0.5)
        with pytest.raises(BusUnavailable):
            await bus.publish("tasks", b"lost", {})
        with pytest.raises(StoreUnavailable, match=r"redis task store .* is unavailable"):
            await store.get(record.tenant, record.id)
        private_redis.start()  # same port, same data dir: the append-only file brings the data back
        (d,) = await bus.receive("q", lease_s=30)
        assert d.body == b"before"
        await bus.ack(d)
        assert await store.get(record.tenant, record.id) == record
    finally:
        await bus.aclose()
        await store.aclose()


class Run:
    """Book-keeping of the restart run: acks per message, who holds what until when."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.acks: collections.Counter[bytes] = collections.Counter()
        self.holders: dict[bytes, tuple[int, float]] = {}
        self.overlaps: list[bytes] = []
        self.outages = 0

    def take(self, worker: int, body: bytes, leased_until: float, now: float) -> None:
        # ``leased_until`` is taken before the receive call, so it is never later than the server's
        # deadline; ``now`` after it, so never earlier than the moment the server leased the message.
        other = self.holders.get(body)
        if other is not None and other[0] != worker and other[1] > now:
            self.overlaps.append(body)
        self.holders[body] = (worker, leased_until)

    def done(self) -> bool:
        return len(self.acks) >= self.total


async def _consume(bus: Bus, run: Run, worker: int, deadline: float, lease_s: float) -> None:
    while not run.done() and time.monotonic() < deadline:
        leased_until = time.monotonic() + lease_s
        try:
            got = await bus.receive("q", max_messages=5, wait_s=0.2, lease_s=lease_s)
        except BusUnavailable:
            run.outages += 1
            await asyncio.sleep(0.05)
            continue
        for d in got:
            run.take(worker, d.body, leased_until, time.monotonic())
        for d in got:
            await asyncio.sleep(0.002)  # the "work"
            while time.monotonic() < deadline:
                try:
                    await bus.ack(d)
                    break
                except BusUnavailable:
                    run.outages += 1
                    await asyncio.sleep(0.05)
            run.acks[d.body] += 1
            if run.holders.get(d.body, (None,))[0] == worker:
                del run.holders[d.body]


async def test_restart_mid_run_every_message_acked(private_redis: RedisServer) -> None:
    """200 messages, two receivers, the server stopped and started again while they work."""
    url = f"{private_redis.url}?prefix=run"
    buses = [open_bus(url), open_bus(url)]
    run = Run(200)
    lease_s = 1.0
    try:
        await buses[0].ensure(topology("q", max_receives=50))
        for i in range(run.total):
            await buses[0].publish("tasks", f"m{i:03}".encode(), {})

        async def restart_midway() -> None:
            while sum(run.acks.values()) < 60:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(private_redis.stop)
            await asyncio.sleep(lease_s + 0.2)  # down past the leases of what the receivers hold
            await asyncio.to_thread(private_redis.start)

        deadline = time.monotonic() + 30
        await asyncio.gather(
            restart_midway(), *(_consume(b, run, n, deadline, lease_s) for n, b in enumerate(buses))
        )
        # A stale ack (lease expired during the outage) leaves the message for a second delivery.
        await asyncio.sleep(lease_s + 0.2)
        while got := await buses[0].receive("q", max_messages=10, lease_s=30):
            for d in got:
                await buses[0].ack(d)
                run.acks[d.body] += 1
        stats = await buses[0].stats("q")
    finally:
        for b in buses:
            await b.aclose()
    assert run.outages > 0, "the restart did not interrupt the consumers"
    assert sorted(run.acks) == [f"m{i:03}".encode() for i in range(run.total)]
    assert run.overlaps == []
    assert (stats.visible, stats.in_flight, stats.delayed, stats.dead_letters) == (0, 0, 0, 0)
    duplicates = {body: n for body, n in run.acks.items() if n > 1}
    # At-least-once: only deliveries cut off by the outage may run twice (≤ 5 leased per receiver).
    assert len(duplicates) <= 10, duplicates
