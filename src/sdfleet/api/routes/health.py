"""Probes and metrics: ``/healthz`` (process alive), ``/readyz`` (engines reachable), ``/metrics``.

``/metrics`` shows every tenant's traffic and every queue, so once API keys are in use it needs
``api.metrics_key`` as a bearer token (a tenant's key does not open it); Prometheus can instead
scrape ``api.metrics_port``, a listener that serves nothing else.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel

from sdfleet.api.auth import request_key
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.openapi import errors
from sdfleet.errors import SdfleetError, Unauthorized

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    reason: str | None = None


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
async def readyz(response: Response, ctx: ApiContext = Depends(get_ctx)) -> Health:
    """The bus and the task store answer."""
    try:
        await ctx.bus.stats(ctx.fleet.queues[0].name)
        await ctx.store.get("readyz", "probe")
    except SdfleetError as e:
        response.status_code = 503
        return Health(status="unavailable", reason=e.code)  # the details are for the log
    return Health(status="ready")


async def check_metrics_key(ctx: ApiContext, request: Request) -> None:
    if not await ctx.keys.required():
        return
    wanted = ctx.settings.metrics_key
    given = request_key(request)
    if (
        wanted is None
        or given is None
        or not hmac.compare_digest(given.encode(), wanted.get_secret_value().encode())
    ):
        raise Unauthorized("/metrics needs the metrics key (api.metrics_key) while API keys are in use")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text",
        },
        **errors(401),
    },
)
async def metrics(request: Request, ctx: ApiContext = Depends(get_ctx)) -> Response:
    """Prometheus metrics of this API process (with API keys in use: `Bearer <api.metrics_key>`)."""
    await check_metrics_key(ctx, request)
    registry = ctx.metrics.registry
    if ctx.settings.workers > 1:  # every worker's values, from the multiprocess folder
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
