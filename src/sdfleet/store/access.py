"""API access state shared by every API replica: stored API keys and admission control.

It lives in the task store's engine (the same SQLite file, Redis prefix or DynamoDB table), never
in process memory, so limits hold across replicas and a revoked key stops working everywhere:

- **keys**: ``sdfleet keys create`` stores an ``ApiKey`` under the SHA-256 of the key (the key
  itself is shown once and never stored);
- **rate**: one GCRA bucket per tenant (``take``), atomic in the engine;
- **in flight**: the tenant's queued and running tasks, counted from the task records;
- **claims**: a short-lived lock on a name (``claim``), so that of two concurrent submits of one
  client id only one publishes.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Protocol

from pydantic import BaseModel, Field

from sdfleet.registry import load_backend
from sdfleet.tasks import PRIORITY_MAX, TENANT_PATTERN

KEY_PREFIX = "sdf_"


class ApiKey(BaseModel):
    """A stored API key: what it grants, never the key itself."""

    id: str = Field(pattern=r"^[0-9a-f]{8,32}$")
    """Public handle of the key (listed, used to revoke it); also the key's first characters."""
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 hex digest of the key."""
    tenant: str = Field(pattern=TENANT_PATTERN)
    tier: str = "standard"
    rate_limit: float | None = Field(None, gt=0)
    """Accepted submissions per second (sustained) for the key's tenant; None: unlimited."""
    burst: int | None = Field(None, ge=1)
    """Submissions accepted at once before ``rate_limit`` applies; default one second's worth."""
    max_in_flight: int | None = Field(None, ge=1)
    """Most queued plus running tasks of the tenant; None: unlimited."""
    max_priority: int = Field(PRIORITY_MAX, ge=0, le=PRIORITY_MAX)
    """Highest task ``priority`` the key may ask for."""
    created_at: float = Field(default_factory=time.time)
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def digest(key: str) -> str:
    """How keys are stored and looked up (the same for keys in ``sdfleet.yaml``)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its id: ``sdf_<id>_<secret>`` with a 12-hex id and 256 random bits."""
    key_id = secrets.token_hex(6)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}", key_id


class AccessStore(Protocol):
    async def add_key(self, key: ApiKey) -> None:
        """Store ``key`` (by its digest)."""

    async def find_key(self, key_digest: str) -> ApiKey | None:
        """The key with this digest, revoked or not; None if there is none."""

    async def keys(self) -> list[ApiKey]:
        """Every stored key, revoked ones included, oldest first."""

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Mark the key ``key_id`` revoked now (idempotent); None if there is no such key."""

    async def take(self, bucket: str, rate: float, burst: int) -> float:
        """Admit one request to ``bucket`` (GCRA: ``rate`` per second, ``burst`` at once).
        Returns 0 when admitted, else the seconds until one would be (nothing taken)."""

    async def count_active(self, tenant: str, at_most: int) -> int:
        """The tenant's queued plus running tasks, counted up to ``at_most``."""

    async def claim(self, name: str, ttl_s: float) -> bool:
        """Take the lock ``name`` for ``ttl_s`` seconds; False while someone else holds it."""

    async def release(self, name: str) -> None:
        """Give the lock ``name`` back before its time."""

    async def aclose(self) -> None: ...


_BACKENDS = {
    "sqlite": ("sdfleet.store.backends.access_sqlite", "SqliteAccessStore", None),
    "aws": ("sdfleet.store.backends.access_dynamodb", "DynamoAccessStore", "aws"),
    "redis": ("sdfleet.store.backends.access_redis", "RedisAccessStore", "redis"),
    "rediss": ("sdfleet.store.backends.access_redis", "RedisAccessStore", "redis"),
}


def open_access(store_url: str) -> AccessStore:
    """The access store in the engine of the task store at ``store_url``."""
    store: AccessStore = load_backend("access store", _BACKENDS, store_url)
    return store


def gcra(tat: float, now: float, rate: float, burst: int) -> tuple[float | None, float]:
    """One GCRA step on a bucket whose theoretical arrival time is ``tat``: (new tat when admitted
    else None, seconds to wait when refused else 0). The backends that cannot run it inside the
    engine (DynamoDB) run it here and write the result conditionally."""
    interval = 1.0 / rate
    new_tat = max(tat, now) + interval
    over = new_tat - now - burst * interval
    if over > 1e-9:
        return None, over
    return new_tat, 0.0
