"""API keys → tenants.

A key is looked up by its SHA-256 digest, first among ``sdfleet.yaml``'s ``tenants``, then among
the keys stored with ``sdfleet keys create`` (the access store, shared by every replica). Keys are
required as soon as either holds one (or ``api.require_key`` is set); before that every caller is
tenant ``default`` (one-machine use).

What a replica read about a key (or about there being keys at all) is trusted for
``api.key_cache_s`` seconds, so a revoked key stops working everywhere within that time while a
busy API does not read the store on every request. Concurrent requests with one key share a read.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi import Depends, Request

from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.errors import Unauthorized
from sdfleet.settings import FleetConfig, TenantConfig
from sdfleet.store.access import AccessStore, ApiKey, digest
from sdfleet.tasks import PRIORITY_MAX

V = TypeVar("V")
_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Caller:
    tenant: str
    tier: str
    rate_limit: float | None = None
    burst: int | None = None
    max_in_flight: int | None = None
    max_priority: int = PRIORITY_MAX
    authenticated: bool = False
    """Came with a valid key: its tenant's storage prefixes are scoped under the tenant's name."""


ANONYMOUS = Caller(tenant="default", tier="standard")


class TtlCache(Generic[V]):
    """Values by key for ``ttl_s`` seconds (LRU-bounded); concurrent misses share one load."""

    def __init__(self, ttl_s: float, size: int = _CACHE_SIZE) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[V]]] = OrderedDict()

    async def get(self, key: str, load: Callable[[], Awaitable[V]]) -> V:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and (entry[0] > now or not entry[1].done()):
            return await asyncio.shield(entry[1])
        future: asyncio.Future[V] = asyncio.ensure_future(load())
        self._entries[key] = (now + self.ttl_s, future)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        try:
            return await asyncio.shield(future)
        except BaseException:
            if self._entries.get(key, (0, None))[1] is future:
                del self._entries[key]  # an outage is not remembered: the next request retries
            raise


class KeyRing:
    """Resolves the key of a request to a ``Caller``."""

    def __init__(self, fleet: FleetConfig, access: AccessStore, *, cache_s: float, require_key: bool) -> None:
        self.fleet = fleet
        self.access = access
        self.require_key = require_key
        self._stored: TtlCache[ApiKey | None] = TtlCache(cache_s)
        self._any: TtlCache[bool] = TtlCache(cache_s, size=1)

    async def required(self) -> bool:
        """Whether requests need a key: configured tenants, stored keys (revoked ones too: revoking
        the last key must not open the API), or ``require_key``."""
        if self.require_key or self.fleet.tenants:
            return True
        return await self._any.get("", self._any_stored)

    async def _any_stored(self) -> bool:
        return bool(await self.access.keys())

    async def caller(self, key: str | None) -> Caller:
        if not await self.required():
            return ANONYMOUS
        if key is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        hashed = digest(key)
        tenant = self.fleet.tenants.get(hashed)
        if tenant is not None:
            return _caller(tenant.name, tenant)
        stored = await self._stored.get(hashed, lambda: self.access.find_key(hashed))
        if stored is None or not stored.active:
            raise Unauthorized("unknown API key")
        return _caller(stored.tenant, stored)


def _caller(tenant: str, grant: TenantConfig | ApiKey) -> Caller:
    """The caller a key makes, from the fleet file's tenant or a stored key: the same limits."""
    return Caller(
        tenant,
        grant.tier,
        grant.rate_limit,
        grant.burst,
        grant.max_in_flight,
        grant.max_priority,
        authenticated=True,
    )


def request_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


async def caller(request: Request, ctx: ApiContext = Depends(get_ctx)) -> Caller:
    """The FastAPI dependency of every route that acts for a tenant."""
    return await ctx.keys.caller(request_key(request))
