"""``GET /v1/models``: the models agents can load, from the models directory."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from sdfleet.api.deps import ApiContext, get_ctx

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelView(BaseModel):
    name: str
    kind: str
    tiny: bool


@router.get("", response_model=list[ModelView])
async def list_models(ctx: ApiContext = Depends(get_ctx)) -> list[ModelView]:
    if ctx.catalog is None:
        return []
    return [ModelView(name=m.name, kind=m.kind, tiny=m.tiny) for m in ctx.catalog.list()]
