"""The access store on Redis, under the task store's key prefix ``p``:

    p:key:<digest>         string  the ApiKey JSON
    p:keys                 hash    key id → digest (listing and revoking by id)
    p:rate:<bucket>        string  the bucket's theoretical arrival time (GCRA), expiring when idle
    p:rate-last:<bucket>   string  the token of the take that set it (a take sent again is not
                                   charged again), expiring with it
    p:claim:<name>         string  a lock, ``SET NX PX``; its value the holder's token

The GCRA step is one Lua script that reads the server's clock (``TIME``), so API replicas with
skewed clocks still share one rate. In-flight tasks are the tenant's ``queued`` and ``running``
state indexes of the task store (``ZCARD``).
"""

from __future__ import annotations

import math
import time
import uuid
from contextlib import AbstractContextManager

import redis.asyncio as aioredis

from sdfleet._redis import ADDS_WORK, connect, describe, map_errors, text
from sdfleet.errors import StoreError, StoreUnavailable
from sdfleet.store.access import ApiKey

# KEYS: bucket (its tat), the token of the last take admitted. ARGV: interval (s), burst, this
# take's token. Returns "0" when admitted, else the seconds to wait. A take whose token is the last
# one was admitted already: redis-py, its reply lost with the connection, sent it again. (The tat
# stays a bare number, as API replicas of earlier versions read it during a rolling update.)
_TAKE = (
    ADDS_WORK
    + """
if redis.call('GET', KEYS[2]) == ARGV[3] then return '0' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = tat + interval
local over = new - now - burst * interval
if over > 1e-9 then return tostring(over) end
local ttl = math.ceil((new - now) * 1000) + 1000
redis.call('SET', KEYS[1], tostring(new), 'PX', ttl)
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
return '0'
"""
)


class RedisAccessStore:
    """``AccessStore`` on Redis; any number of API processes may share it."""

    def __init__(self, client: aioredis.Redis, prefix: str = "sdfleet") -> None:
        self.client = client
        self.prefix = prefix
        self._where = f"redis access store ({describe(client)})"
        self._take = client.register_script(_TAKE)
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> RedisAccessStore:
        client, prefix = connect(url)
        return cls(client, prefix)

    def _errors(self) -> AbstractContextManager[None]:
        if self._closed:
            raise StoreUnavailable(f"{self._where} is closed")
        return map_errors(self._where, StoreUnavailable, StoreError)

    async def add_key(self, key: ApiKey) -> None:
        with self._errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(f"{self.prefix}:key:{key.digest}", key.model_dump_json())
            pipe.hset(f"{self.prefix}:keys", key.id, key.digest)
            await pipe.execute()

    async def find_key(self, key_digest: str) -> ApiKey | None:
        with self._errors():
            raw = await self.client.get(f"{self.prefix}:key:{key_digest}")
        return None if raw is None else ApiKey.model_validate_json(raw)

    async def keys(self) -> list[ApiKey]:
        with self._errors():
            digests = await self.client.hvals(f"{self.prefix}:keys")
            raws = (
                await self.client.mget([f"{self.prefix}:key:{text(d)}" for d in digests]) if digests else []
            )
        found = (ApiKey.model_validate_json(r) for r in raws if r is not None)
        return sorted(found, key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> ApiKey | None:
        with self._errors():
            key_digest = await self.client.hget(f"{self.prefix}:keys", key_id)
        if key_digest is None:
            return None
        key = await self.find_key(text(key_digest))
        if key is None or key.revoked_at is not None:
            return key
        key.revoked_at = time.time()
        with self._errors():
            await self.client.set(f"{self.prefix}:key:{key.digest}", key.model_dump_json())
        return key

    async def take(self, bucket: str, rate: float, burst: int) -> float:
        with self._errors():
            keys = [f"{self.prefix}:rate:{bucket}", f"{self.prefix}:rate-last:{bucket}"]
            wait = await self._take(keys=keys, args=[repr(1.0 / rate), burst, uuid.uuid4().hex])
        return float(text(wait))

    async def count_active(self, tenant: str, at_most: int) -> int:
        base = f"{self.prefix}:tenant:{tenant}:state"
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(f"{base}:queued")
            pipe.zcard(f"{base}:running")
            queued, running = await pipe.execute()
        return min(at_most, int(queued) + int(running))

    async def claim(self, name: str, ttl_s: float) -> bool:
        key, token = f"{self.prefix}:claim:{name}", uuid.uuid4().hex
        with self._errors():
            if await self.client.set(key, token, nx=True, px=max(1, math.ceil(ttl_s * 1000))):
                return True
            # redis-py sends a SET again when its connection dropped: the first may have won
            return text(await self.client.get(key)) == token

    async def release(self, name: str) -> None:
        with self._errors():
            await self.client.delete(f"{self.prefix}:claim:{name}")

    async def aclose(self) -> None:
        """Close the connection pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()  # it owns its pool (_redis.connect): its connections close too
