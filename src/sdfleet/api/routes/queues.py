"""``GET /v1/queues``: the fleet's queues with their depth, straight from the bus."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from sdfleet.api.auth import Caller, caller
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.openapi import errors

router = APIRouter(prefix="/v1/queues", tags=["queues"])


class QueueView(BaseModel):
    name: str
    runtime: str
    model: str | None
    filter: dict[str, Any] | None
    visible: int
    in_flight: int
    delayed: int
    oldest_age_s: float | None
    dead_letters: int


@router.get("", response_model=list[QueueView], responses=errors(401, 503))
async def list_queues(ctx: ApiContext = Depends(get_ctx), _: Caller = Depends(caller)) -> list[QueueView]:
    """The fleet's queues and their depth, read from the bus (any API key of the fleet)."""
    out = []
    for q in ctx.fleet.queues:
        s = await ctx.bus.stats(q.name)
        ctx.metrics.set_queue(q.name, s)
        out.append(
            QueueView(
                name=q.name,
                runtime=q.runtime,
                model=q.model,
                filter=q.filter,
                visible=s.visible,
                in_flight=s.in_flight,
                delayed=s.delayed,
                oldest_age_s=s.oldest_age_s,
                dead_letters=s.dead_letters,
            )
        )
    return out
