"""The Redis task store: one hash per task, compare-and-set by a Lua script on its version.

URL: ``redis://[:password@]host:port/db?prefix=sdfleet`` (``rediss://`` for TLS; see ``sdfleet._redis``).
Keys, with ``p`` the prefix:

    p:task:<tenant>/<id>          hash  v (version), state, created (epoch s), data (the record's JSON),
                                        w (a token of the write that put it there)
    p:tenant:<t>:tasks            zset  task id, score created_at: the tenant's list, newest first
    p:tenant:<t>:state:<state>    zset  the same, per state: ``list(state=...)`` without scanning
    p:expiring                    zset  ``<tenant>/<id>``, score when it expires (epoch ms)

With ``retain_s`` a finished record's hash gets an expiry (``PEXPIREAT``: Redis removes it on
time) and an entry in ``p:expiring``; each compare-and-set that finishes a task also removes the
index entries of up to ``SWEEP`` expired records, so the indexes shrink with the hashes. A record
reopened for another run loses its expiry; one created under an expired id drops the old one's
index entries first.

Ties in ``created_at`` are broken by id (descending), the order a sorted set keeps for equal scores.
Create, compare-and-set and delete, each with its index updates, are one script apiece, so the
indexes never disagree with the records. Ids are per tenant: a tenant name has no ``/`` and an id
none either, so ``<tenant>/<id>`` names one record. (Records written before ids were per tenant, under
``p:task:<id>``, are not read.)
"""

from __future__ import annotations

import math
import uuid
from contextlib import AbstractContextManager
from typing import Any

import redis.asyncio as aioredis

from sdfleet._redis import MOVES_WORK, connect, describe, map_errors, text
from sdfleet.errors import StoreError, StoreUnavailable, ValidationFailed
from sdfleet.store.backends.sqlite import MAX_PAGE, decode_cursor, encode_cursor
from sdfleet.store.base import SWEEP, expires_at, read_record
from sdfleet.tasks import TaskRecord, TaskState

STATES = list(TaskState)
Rows = list[tuple[str, float]]
"""(task id, created_at) pairs of an index, newest first."""

# KEYS: task, tenant index, expiring, then one state index per state (ARGV[8..] names them, same
# order). ARGV: data, version, state, created_at, id, expires (epoch ms, '' = never), member
# (tenant/id), state names..., then this write's token (the hash's 'w'). Returns nil when
# created, else the stored record's JSON. A hash that holds this token is "created": the first
# try of this call landed and redis-py, its reply lost with the connection, sent it again.
_CREATE = (
    MOVES_WORK
    + """
local w = ARGV[#ARGV]
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'w') == w then return false end
  return redis.call('HGET', KEYS[1], 'data')
end
redis.call('ZREM', KEYS[3], ARGV[7])
for i = 8, #ARGV - 1 do redis.call('ZREM', KEYS[i - 4], ARGV[5]) end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'v', ARGV[2], 'state', ARGV[3], 'created', ARGV[4], 'w', w)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
for i = 8, #ARGV - 1 do
  if ARGV[i] == ARGV[3] then redis.call('ZADD', KEYS[i - 4], ARGV[4], ARGV[5]) end
end
if ARGV[6] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
end
return false
"""
)

# KEYS: task, expiring, then one state index per state (ARGV[9..] names them, same order).
# ARGV: expected version, data, new version, new state, id, expires (epoch ms, '' = never),
# member (tenant/id), key prefix, state names..., then this write's token (the hash's 'w').
# Returns 1 if replaced, or if the hash holds this token already (the first try of this call
# landed, its reply was lost with the connection, redis-py sent it again).
_CAS = (
    MOVES_WORK
    + f"""
local w = ARGV[#ARGV]
local v, stored_w = unpack(redis.call('HMGET', KEYS[1], 'v', 'w'))
if v == ARGV[3] and stored_w == w then return 1 end
if (not v) or v ~= ARGV[1] then return 0 end
local old = redis.call('HGET', KEYS[1], 'state')
local created = redis.call('HGET', KEYS[1], 'created')
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'v', ARGV[3], 'state', ARGV[4], 'w', w)
if old ~= ARGV[4] then
  for i = 9, #ARGV - 1 do
    if ARGV[i] == old then redis.call('ZREM', KEYS[i - 6], ARGV[5]) end
    if ARGV[i] == ARGV[4] then redis.call('ZADD', KEYS[i - 6], created, ARGV[5]) end
  end
end
if ARGV[6] == '' then
  redis.call('PERSIST', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[7])
  return 1
end
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
-- A task ended: drop the index entries of a few records that expired.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, {SWEEP})) do
  local slash = string.find(m, '/', 1, true)
  local base = ARGV[8] .. ':tenant:' .. string.sub(m, 1, slash - 1)
  local id = string.sub(m, slash + 1)
  redis.call('ZREM', base .. ':tasks', id)
  for i = 9, #ARGV - 1 do redis.call('ZREM', base .. ':state:' .. ARGV[i], id) end
  redis.call('DEL', ARGV[8] .. ':task:' .. m)
  redis.call('ZREM', KEYS[2], m)
end
return 1
"""
)


# KEYS: task, tenant index, expiring, then one state index per state. ARGV: expected version, id,
# member (tenant/id). Returns 1 if deleted.
_DELETE = (
    MOVES_WORK
    + """
local v = redis.call('HGET', KEYS[1], 'v')
if (not v) or v ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[2])
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
return 1
"""
)


class RedisTaskStore:
    """``TaskStore`` on Redis hashes and sorted sets; any number of processes may share it."""

    def __init__(
        self, client: aioredis.Redis, prefix: str = "sdfleet", *, retain_s: float | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.retain_s = retain_s
        self._where = f"redis task store ({describe(client)})"
        self._create = client.register_script(_CREATE)
        self._cas = client.register_script(_CAS)
        self._delete = client.register_script(_DELETE)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, retain_s: float | None = None) -> RedisTaskStore:
        client, prefix = connect(url)
        return cls(client, prefix, retain_s=retain_s)

    async def __aenter__(self) -> RedisTaskStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _errors(self) -> AbstractContextManager[None]:
        if self._closed:
            raise StoreUnavailable(f"{self._where} is closed")
        return map_errors(self._where, StoreUnavailable, StoreError)

    def _task_key(self, tenant: str, task_id: str) -> str:
        return f"{self.prefix}:task:{tenant}/{task_id}"

    @property
    def _expiring(self) -> str:
        return f"{self.prefix}:expiring"

    def _expires_ms(self, record: TaskRecord) -> str:
        at = expires_at(record, self.retain_s)
        return "" if at is None else str(math.ceil(at * 1000))

    def _index(self, tenant: str, state: TaskState | None = None) -> str:
        base = f"{self.prefix}:tenant:{tenant}"
        return f"{base}:tasks" if state is None else f"{base}:state:{state.value}"

    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        """Insert ``record`` unless its tenant already has its id; returns (stored record, created?)."""
        keys = [
            self._task_key(record.tenant, record.id),
            self._index(record.tenant),
            self._expiring,
            *(self._index(record.tenant, s) for s in STATES),
        ]
        args: list[str | int] = [
            record.model_dump_json(by_alias=True),
            record.version,
            record.state.value,
            repr(record.task.created_at),
            record.id,
            self._expires_ms(record),
            f"{record.tenant}/{record.id}",
            *(s.value for s in STATES),
            uuid.uuid4().hex,
        ]
        with self._errors():
            existing = await self._create(keys=keys, args=args)
        if existing is None:
            return record, True  # what is stored is its JSON: the caller's object is theirs
        return read_record(existing), False

    async def get(self, tenant: str, task_id: str) -> TaskRecord | None:
        """The record of ``tenant``'s task ``task_id``, or None."""
        with self._errors():
            data = await self.client.hget(self._task_key(tenant, task_id), "data")
        return None if data is None else read_record(data)

    async def compare_and_set(self, record: TaskRecord, expected_version: int) -> bool:
        """Replace the record iff the stored one still has ``expected_version``."""
        if record.version != expected_version + 1:
            raise ValueError(f"record.version must be {expected_version + 1}, got {record.version}")
        keys = [
            self._task_key(record.tenant, record.id),
            self._expiring,
            *(self._index(record.tenant, s) for s in STATES),
        ]
        args: list[str | int] = [
            expected_version,
            record.model_dump_json(by_alias=True),
            record.version,
            record.state.value,
            record.id,
            self._expires_ms(record),
            f"{record.tenant}/{record.id}",
            self.prefix,
            *(s.value for s in STATES),
            uuid.uuid4().hex,
        ]
        with self._errors():
            return bool(await self._cas(keys=keys, args=args))

    async def delete(self, tenant: str, task_id: str, expected_version: int) -> bool:
        """Remove the record and its index entries iff it still has ``expected_version``."""
        keys = [
            self._task_key(tenant, task_id),
            self._index(tenant),
            self._expiring,
            *(self._index(tenant, s) for s in STATES),
        ]
        with self._errors():
            return bool(
                await self._delete(keys=keys, args=[expected_version, task_id, f"{tenant}/{task_id}"])
            )

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
        index = self._index(tenant, state)
        with self._errors():
            rows = await self._page(index, cursor, limit + 1)
            page = rows[:limit]
            pipe = self.client.pipeline(transaction=False)
            for task_id, _ in page:
                pipe.hget(self._task_key(tenant, task_id), "data")
            found = await pipe.execute() if page else []
        records = [read_record(d) for d in found if d is not None]
        next_cursor = encode_cursor(page[-1][1], page[-1][0]) if len(rows) > limit else None
        return records, next_cursor

    async def _page(self, index: str, cursor: str | None, count: int) -> Rows:
        """Up to ``count`` (id, created_at) of ``index`` after ``cursor``, newest first."""
        if cursor is None:
            rows: list[Any] = await self.client.zrange(
                index, "+inf", "-inf", desc=True, byscore=True, offset=0, num=count, withscores=True
            )
            return [(text(m), float(s)) for m, s in rows]
        after_ts, after_id = decode_cursor(cursor)
        pipe = self.client.pipeline(transaction=False)
        # Entries sharing the cursor's created_at: few, so read them all and filter by id.
        pipe.zrange(index, after_ts, after_ts, byscore=True)
        pipe.zrange(
            index, f"({after_ts!r}", "-inf", desc=True, byscore=True, offset=0, num=count, withscores=True
        )
        ties, older = await pipe.execute()
        same = sorted((i for i in map(text, ties) if i < after_id), reverse=True)
        merged = [(i, after_ts) for i in same] + [(text(m), float(s)) for m, s in older]
        return merged[:count]

    async def aclose(self) -> None:
        """Close the connection pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()  # it owns its pool (_redis.connect): its connections close too
