"""API keys → tenants. With no tenants configured every caller is tenant ``default`` (one-machine use)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.errors import Unauthorized


@dataclass(frozen=True)
class Caller:
    tenant: str
    tier: str


def _key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key")


def caller(request: Request, ctx: ApiContext = Depends(get_ctx)) -> Caller:
    if not ctx.fleet.tenants:
        return Caller(tenant="default", tier="standard")
    key = _key(request)
    if key is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
    tenant = ctx.fleet.tenant_for_key(key)
    if tenant is None:
        raise Unauthorized("unknown API key")
    return Caller(tenant=tenant.name, tier=tenant.tier)
