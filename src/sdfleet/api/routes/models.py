"""``GET /v1/models``: the models agents can load, from the models directory."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from sdfleet.api.auth import Caller, caller
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.openapi import errors

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelView(BaseModel):
    name: str
    kind: str
    tiny: bool


@router.get("", response_model=list[ModelView], responses=errors(401))
async def list_models(ctx: ApiContext = Depends(get_ctx), _: Caller = Depends(caller)) -> list[ModelView]:
    """The models agents can load (any API key of the fleet)."""
    if ctx.catalog is None:
        return []
    return [ModelView(name=m.name, kind=m.kind, tiny=m.tiny) for m in ctx.catalog.list()]
