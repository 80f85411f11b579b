"""The Redis bus: one Redis Stream per queue, read through one consumer group, for Kubernetes without AWS.

URL: ``redis://[:password@]host:port/db?prefix=sdfleet`` (``rediss://`` for TLS; see ``sdfleet._redis``).
Needs one Redis ≥ 7 primary (standalone or behind Sentinel; not Redis Cluster: a queue's scripts touch
several keys without a hash tag). Keys, with ``p`` the prefix:

    p:topics                  hash  topic → "{}"
    p:queues                  hash  queue → {"lease_ms", "max_receives", "retention_ms"}  (the DLQ is
                                    a queue: max 0, 14 days)
    p:subs:<topic>            hash  queue → Subscription JSON (filter policy, scope)
    p:queue:<q>               stream of the queue, consumer group "sdfleet"   ← what KEDA watches
    p:queue:<q>:leases        zset  entry id → lease deadline (ms)
    p:queue:<q>:delayed       zset  message id → due time (ms)
    p:queue:<q>:delayed-msgs  hash  message id → the delayed entry (cmsgpack)
    p:queue:<q>-dlq           the dead-letter queue's stream (a queue of its own, same layout)

How the ``Bus`` semantics map onto Streams (all state changes are Lua scripts, see ``redis_lua``):

- receive = move due delayed messages back into the stream, then re-deliver entries whose lease
  deadline passed (XCLAIM), then new entries (XREADGROUP ``>``). Leases are per delivery: a
  deadline in ``leases`` (server clock), so each receive's ``lease_s`` and each ``extend`` count
  exactly, rather than one min-idle time for the whole queue as with XAUTOCLAIM;
- ``receive_count`` = the entry's ``rc`` field + the PEL delivery count; the delivery that would
  exceed ``max_receives`` moves the entry to ``<q>-dlq`` instead (XADD there, XACK + XDEL here);
- ack = XACK + XDEL; release = XACK + XDEL, then XADD again (delay 0) or park the entry in
  ``delayed`` (its ``rc`` now includes the deliveries so far, so the count survives the release);
- stale receipts (lease expired, message received again by someone else) make ack, extend and
  release silent no-ops, as on the SQLite bus;
- a long poll waits with XREAD BLOCK on the stream (≤ 1 s at a time, shorter when a lease or a
  delayed message falls due first), so it wakes at once on a publish from any process;
- retention (``QueueSpec.retention_s``, SQS's ``MessageRetentionPeriod``): a publish trims each
  stream it adds to, a receive its queue and the DLQ it moves to (XTRIM MINID: an entry's id is
  the ms it was added, so a released or dead-lettered entry counts from its move);
- a delayed message sits outside the stream (not in XLEN) until a ``receive`` or ``stats`` moves it
  back; ``stats`` counts it, and the chart's ``metrics-api`` trigger reads ``stats`` through the
  API's ops port, so KEDA sees it. Without that trigger keep release delays below KEDA's
  ``cooldownPeriod`` (the releasing agent is still polling then).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from sdfleet._redis import connect, describe, map_errors, text
from sdfleet.bus.backends import redis_lua as lua
from sdfleet.bus.base import (
    DLQ_RETENTION_S,
    Delivery,
    QueueStats,
    Subscription,
    Topology,
    dlq_name,
    wait_unless,
)
from sdfleet.errors import BusError, BusUnavailable, ConfigError, NotFound
from sdfleet.policy import matching_queues

log = logging.getLogger(__name__)

GROUP = "sdfleet"
CONSUMER = "agents"
MAX_BLOCK_S = 1.0


def stream_names(prefix: str, queue: str) -> tuple[str, str]:
    """The (stream key, consumer group) of ``queue``. For KEDA's ``redis-streams`` trigger:
    ``pendingEntriesCount`` counts only leased messages and ``lagCount`` only never-delivered ones
    (a redelivery whose lease expired is in neither); ``streamLength`` (XLEN, set without a
    ``consumerGroup``) counts both, as acks delete entries. The chart pairs it with a
    ``metrics-api`` trigger on ``stats()``, which adds the delayed retries (docs/redis.md)."""
    return f"{prefix}:queue:{queue}", GROUP


def queue_keys(prefix: str, queue: str) -> list[str]:
    """The keys a queue's scripts touch, in ``redis_lua``'s KEYS order."""
    stream, _ = stream_names(prefix, queue)
    dlq_stream, _ = stream_names(prefix, dlq_name(queue))
    return [stream, f"{stream}:leases", f"{stream}:delayed", f"{stream}:delayed-msgs", dlq_stream]


def _fields(flat: list[Any]) -> dict[str, bytes]:
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


class RedisBus:
    """``Bus`` on Redis Streams; see the module docstring for the key layout and fine print."""

    def __init__(self, client: aioredis.Redis, prefix: str = "sdfleet", *, consumer: str = CONSUMER) -> None:
        self.client = client
        self.prefix = prefix
        self.consumer = consumer
        self._where = f"redis bus ({describe(client)})"
        self._receive = client.register_script(lua.RECEIVE)
        self._publish = client.register_script(lua.PUBLISH)
        self._ack = client.register_script(lua.ACK)
        self._extend = client.register_script(lua.EXTEND)
        self._release = client.register_script(lua.RELEASE)
        self._stats = client.register_script(lua.STATS)
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RedisBus:
        client, prefix = connect(url)
        return cls(client, prefix)

    async def __aenter__(self) -> RedisBus:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _errors(self) -> AbstractContextManager[None]:
        if self._closed:
            raise BusUnavailable(f"{self._where} is closed")
        return map_errors(self._where, BusUnavailable, BusError)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def ensure(self, topology: Topology) -> None:
        """Create topics, queues, DLQs and subscriptions; idempotent, updates filter policies."""
        known = {q.name for q in topology.queues}
        with self._errors():
            for s in topology.subscriptions:
                if s.queue not in known and not await self.client.hexists(self._key("queues"), s.queue):
                    raise ConfigError(f"subscription of {s.topic!r} to unknown queue {s.queue!r}")
            await self._write_differences(*self._wanted(topology))
            for q in topology.queues:
                for name in (q.name, dlq_name(q.name)):
                    await self._create_group(name)

    def _wanted(self, topology: Topology) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """(hash key → field → value) of the topology, and each queue's DLQ spec (set if absent)."""
        topics, queues = self._key("topics"), self._key("queues")
        wanted: dict[str, dict[str, str]] = {topics: {}, queues: {}}
        for topic in {*topology.topics, *(s.topic for s in topology.subscriptions)}:
            wanted[topics][topic] = "{}"
        dlqs: dict[str, str] = {}
        for q in topology.queues:
            spec = {
                "lease_ms": int(q.lease_s * 1000),
                "max_receives": q.max_receives,
                "retention_ms": int(q.retention_s * 1000),
            }
            wanted[queues][q.name] = json.dumps(spec)
            dlq = {**spec, "max_receives": 0, "retention_ms": DLQ_RETENTION_S * 1000}
            dlqs[dlq_name(q.name)] = json.dumps(dlq)
        for s in topology.subscriptions:
            wanted.setdefault(self._key("subs", s.topic), {})[s.queue] = s.model_dump_json()
        return wanted, dlqs

    async def _write_differences(self, wanted: dict[str, dict[str, str]], dlqs: dict[str, str]) -> None:
        """Write only the fields that differ: a Redis at its maxmemory refuses every write, and an
        agent that starts then must still start, to drain the queues that filled it."""
        keys = list(wanted)
        read = self.client.pipeline(transaction=False)
        for key in keys:
            read.hgetall(key)
        have = {
            key: {text(k): text(v) for k, v in got.items()}
            for key, got in zip(keys, await read.execute(), strict=True)
        }
        write = self.client.pipeline(transaction=True)
        for key, fields in wanted.items():
            for field, value in fields.items():
                if have[key].get(field) != value:
                    write.hset(key, field, value)
        queues = self._key("queues")
        for name, spec in dlqs.items():
            if name not in have[queues]:
                write.hsetnx(queues, name, spec)
        if len(write):
            await write.execute()

    async def _create_group(self, queue: str) -> None:
        stream, group = stream_names(self.prefix, queue)
        try:
            if any(text(g["name"]) == group for g in await self.client.xinfo_groups(stream)):
                return  # read first: at its maxmemory Redis refuses even a create that exists
        except aioredis.ResponseError as e:
            if "no such key" not in str(e).lower():
                raise
        try:
            await self.client.xgroup_create(stream, group, id="0", mkstream=True)
        except aioredis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def publish(self, topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
        """Publish to a topic; returns the message id. Raises ``NotFound`` for an unknown topic."""
        message_id = uuid.uuid4().hex
        entry: dict[str, str | bytes] = {
            "mid": message_id,
            "body": body,
            "attrs": json.dumps(dict(attributes), sort_keys=True),
            "sent_at": f"{time.time():.6f}",
            "rc": "0",
        }
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.hexists(self._key("topics"), topic)
            pipe.hgetall(self._key("subs", topic))
            exists, subs = await pipe.execute()
            if not exists:
                raise NotFound(f"topic {topic!r} does not exist")
            subscriptions = [Subscription.model_validate_json(v) for v in subs.values()]
            queues = matching_queues(subscriptions, topic, attributes, body)
            if queues:
                streams = [stream_names(self.prefix, q)[0] for q in queues]
                fields: list[str | bytes] = [x for pair in entry.items() for x in pair]
                await self._publish(keys=[self._key("queues"), *streams], args=[*queues, *fields])
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
        (or until ``until`` is set: the wait is an ``XREAD``, which claims nothing)."""
        keys = [*queue_keys(self.prefix, queue), self._key("queues")]
        lease_ms = -1 if lease_s is None else int(lease_s * 1000)
        deadline = time.monotonic() + wait_s
        with self._errors():
            while True:
                res = await self._receive(
                    keys=keys, args=[queue, GROUP, self.consumer, max_messages, lease_ms]
                )
                if res[0] == -1:
                    raise NotFound(f"queue {queue!r} does not exist")
                _, wake_ms, last_id, got = res
                if got:
                    return [self._delivery(queue, row) for row in got]
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                wait = min(left, MAX_BLOCK_S) if wake_ms < 0 else min(left, MAX_BLOCK_S, wake_ms / 1000)
                # Wakes at once when anything is added after the newest entry the script saw.
                woken = self.client.xread({keys[0]: last_id}, count=1, block=max(1, int(wait * 1000)))
                if not await wait_unless(until, woken, None):
                    return []

    def _delivery(self, queue: str, row: list[Any]) -> Delivery:
        entry_id, flat, receive_count, pel = text(row[0]), row[1], int(row[2]), int(row[3])
        f = _fields(flat)
        return Delivery(
            queue=queue,
            message_id=text(f["mid"]),
            body=bytes(f["body"]),
            attributes=json.loads(f["attrs"]),
            receive_count=receive_count,
            receipt=f"{entry_id}:{pel}",
            sent_at=float(f["sent_at"]),
            raw={"stream": stream_names(self.prefix, queue)[0], "entry_id": entry_id},
        )

    def _receipt(self, d: Delivery) -> tuple[str, str]:
        entry_id, sep, pel = d.receipt.rpartition(":")
        if not sep or not entry_id or not pel.isdigit():
            raise NotFound(f"not a redis bus receipt: {d.receipt!r}")
        return entry_id, pel

    async def ack(self, d: Delivery) -> None:
        """Done with the message: delete it. Acking a delivery whose lease expired is harmless."""
        entry_id, pel = self._receipt(d)
        keys = queue_keys(self.prefix, d.queue)[:2]
        with self._errors():
            if not await self._ack(keys=keys, args=[GROUP, entry_id, pel]):
                log.debug("ack of a stale delivery of %s on %s ignored", d.message_id, d.queue)

    async def extend(self, d: Delivery, lease_s: float) -> None:
        """Heartbeat: the delivery stays invisible for ``lease_s`` more seconds from now."""
        entry_id, pel = self._receipt(d)
        keys = queue_keys(self.prefix, d.queue)[:2]
        with self._errors():
            if not await self._extend(keys=keys, args=[GROUP, entry_id, pel, int(lease_s * 1000)]):
                log.debug("extend of a stale delivery of %s on %s ignored", d.message_id, d.queue)

    async def release(self, d: Delivery, delay_s: float = 0.0) -> None:
        """Give the message back, visible again after ``delay_s`` seconds."""
        entry_id, pel = self._receipt(d)
        keys = [*queue_keys(self.prefix, d.queue)[:4], self._key("queues")]
        args: list[str | int] = [GROUP, entry_id, pel, int(max(0.0, delay_s) * 1000), d.queue]
        with self._errors():
            if not await self._release(keys=keys, args=args):
                log.debug("release of a stale delivery of %s on %s ignored", d.message_id, d.queue)

    async def stats(self, queue: str) -> QueueStats:
        """Depth of a queue: visible, in flight (leased), delayed, age of the oldest, DLQ depth."""
        keys = [*queue_keys(self.prefix, queue), self._key("queues")]
        with self._errors():
            res = await self._stats(keys=keys, args=[queue])
        if res[0] == -1:
            raise NotFound(f"queue {queue!r} does not exist")
        length, in_flight, n_delayed, oldest, dead, now_ms = res
        return QueueStats(
            queue=queue,
            visible=max(0, int(length) - int(in_flight)),
            in_flight=int(in_flight),
            delayed=int(n_delayed),
            oldest_age_s=None if oldest is None else max(0.0, now_ms / 1000 - float(oldest)),
            dead_letters=int(dead),
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()  # it owns its pool (_redis.connect): its connections close too
