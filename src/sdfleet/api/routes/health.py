"""Probes and metrics: ``/healthz`` (process alive), ``/readyz`` (engines reachable), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.errors import SdfleetError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(response: Response, ctx: ApiContext = Depends(get_ctx)) -> dict[str, str]:
    try:
        await ctx.bus.stats(ctx.fleet.queues[0].name)
        await ctx.store.get("readyz-probe")
    except SdfleetError as e:
        response.status_code = 503
        return {"status": "unavailable", "reason": str(e)}
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(ctx: ApiContext = Depends(get_ctx)) -> Response:
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
