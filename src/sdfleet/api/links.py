"""Expiring signed links to stored files (local storage); presigned URLs where the store has them (S3)."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote

from fastapi import Request

from sdfleet.api.deps import ApiContext


def signature(secret: str, key: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def verify(secret: str, key: str, expires: int, sig: str) -> bool:
    return expires >= time.time() and hmac.compare_digest(signature(secret, key, expires), sig)


def base_url(ctx: ApiContext, request: Request) -> str:
    return (ctx.settings.public_url or str(request.base_url)).rstrip("/")


async def file_url(ctx: ApiContext, request: Request, key: str) -> str:
    presigned = await ctx.storage.presign(key, ctx.settings.link_ttl_s)
    if presigned is not None:
        return presigned
    expires = int(time.time()) + ctx.settings.link_ttl_s
    sig = signature(ctx.signing_key, key, expires)
    return f"{base_url(ctx, request)}/v1/files/{quote(key)}?expires={expires}&sig={sig}"
