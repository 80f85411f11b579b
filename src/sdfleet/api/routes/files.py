"""``GET /v1/files/{key}``: stored files behind expiring signed links."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Depends, Query, Response

from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.links import verify
from sdfleet.errors import NotFound
from sdfleet.storage.base import check_key

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get("/{key:path}")
async def get_file(
    key: str, expires: int = Query(...), sig: str = Query(...), ctx: ApiContext = Depends(get_ctx)
) -> Response:
    # A bad or expired signature looks like a missing file: links must not reveal what exists.
    if not verify(ctx.signing_key, key, expires, sig):
        raise NotFound("file not found or link expired")
    data = await ctx.storage.get(check_key(key))
    media = mimetypes.guess_type(key)[0] or (
        "application/json" if key.endswith(".out") else "application/octet-stream"
    )
    return Response(content=data, media_type=media, headers={"Cache-Control": "private, max-age=300"})
