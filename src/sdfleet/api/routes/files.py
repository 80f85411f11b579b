"""``GET /v1/files/{key}``: stored files behind expiring signed links, bound to their tenant."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Depends, Query, Request, Response

from sdfleet.api.auth import request_key
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import linked_out, verify
from sdfleet.api.openapi import errors
from sdfleet.errors import NotFound
from sdfleet.storage.base import check_key

router = APIRouter(prefix="/v1/files", tags=["files"])


async def _for_tenant(ctx: ApiContext, request: Request, tenant: str, key: str) -> bool:
    """Whether ``key`` may be served on a link of ``tenant``: with API keys in use, only under the
    tenant's own prefix, and not to a caller who shows another tenant's key."""
    if not await ctx.keys.required():
        return True
    if not key.startswith(f"{tenant}/"):
        return False
    presented = request_key(request)
    return presented is None or (await ctx.keys.caller(presented)).tenant == tenant


@router.get(
    "/{key:path}",
    responses={
        200: {"content": {"image/png": {}, "application/json": {}}, "description": "The file"},
        **errors(401, 404),
    },
)
async def get_file(
    key: str,
    request: Request,
    tenant: str = Query(..., max_length=64),
    expires: int = Query(..., ge=0, le=2**62),
    sig: str = Query(..., max_length=64),
    ctx: ApiContext = Depends(get_ctx),
) -> Response:
    """A file of a task's results. Links come from the task's view; they expire."""
    # A bad or expired signature looks like a missing file: links must not reveal what exists.
    if not verify(ctx.signing_key, tenant, key, expires, sig) or not await _for_tenant(
        ctx, request, tenant, key
    ):
        raise NotFound("file not found or link expired")
    data = await ctx.storage.get(check_key(key))
    if key.endswith(".out"):
        data = await linked_out(ctx, request, tenant, key, data)
    media = mimetypes.guess_type(key)[0] or (
        "application/json" if key.endswith(".out") else "application/octet-stream"
    )
    return Response(content=data, media_type=media, headers={"Cache-Control": "private, max-age=300"})
