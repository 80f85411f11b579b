"""Expiring signed links to stored files (local storage); presigned URLs where the store has them (S3).

A link is bound to the tenant whose task made the file: the signature covers tenant, key and
expiry, so a link cannot be re-pointed at another key or another tenant. Like a presigned S3 URL
it is a bearer capability until it expires (``api.link_ttl_s``): whoever holds it can download
that one file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import quote, unquote, urlencode, urlsplit

from fastapi import Request

from sdfleet.api.deps import ApiContext


def signature(secret: str, tenant: str, key: str, expires: int) -> str:
    message = f"{tenant}\n{key}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secret: str, tenant: str, key: str, expires: int, sig: str) -> bool:
    return expires >= time.time() and hmac.compare_digest(
        signature(secret, tenant, key, expires).encode(), sig.encode()
    )


def base_url(ctx: ApiContext, request: Request) -> str:
    return (ctx.settings.public_url or str(request.base_url)).rstrip("/")


async def file_url(ctx: ApiContext, request: Request, tenant: str, key: str) -> str:
    """A link to ``key``, made by a task of ``tenant``."""
    presigned = await ctx.storage.presign(key, ctx.settings.link_ttl_s)
    if presigned is not None:
        return presigned
    expires = int(time.time()) + ctx.settings.link_ttl_s
    query = urlencode(
        {"tenant": tenant, "expires": expires, "sig": signature(ctx.signing_key, tenant, key, expires)}
    )
    return f"{base_url(ctx, request)}/v1/files/{quote(key)}?{query}"


def public_location(ctx: ApiContext, request: Request, key: str) -> str:
    """Where ``key`` lives, as an answer may show it: ``s3://bucket/key`` on S3 (what the seed
    answers), the API's own ``/v1/files/<key>`` for local storage (never a path on the server)."""
    location = ctx.storage.location(key)
    if location.startswith("file:"):
        return f"{base_url(ctx, request)}/v1/files/{quote(key)}"
    return location


async def linked_out(ctx: ApiContext, request: Request, tenant: str, key: str, data: bytes) -> bytes:
    """The ``.out`` JSON ``key`` as a client downloads it. The agent lists the task's images by
    storage location, the seed's way: on local storage that is a ``file://`` path on the server,
    here replaced by a link to the image (a sibling of the ``.out``), as the task view gives."""
    try:
        out = json.loads(data)
    except ValueError:
        return data
    images = out.get("images") if isinstance(out, dict) else None
    if not isinstance(images, list):
        return data
    folder = key.rpartition("/")[0]
    for n, location in enumerate(images):
        if isinstance(location, str) and location.startswith("file:"):
            name = unquote(urlsplit(location).path).rpartition("/")[2]
            images[n] = await file_url(ctx, request, tenant, f"{folder}/{name}" if folder else name)
    return json.dumps(out, indent=2).encode()
