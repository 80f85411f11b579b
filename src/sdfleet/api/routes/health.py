"""Probes and metrics: ``/healthz`` (process alive), ``/readyz`` (engines reachable), ``/metrics``.

``/readyz`` reads the engines at most once per ``api.ready_check_s`` and unreadies a replica only
after three periods without a passing check: one upstream blip must not take every replica out of
the Service at once.

``/metrics`` shows every tenant's traffic and every queue, so once API keys are in use it needs
``api.metrics_key`` as a bearer token (a tenant's key does not open it). With ``api.ops_port`` set
it moves to the ops listener (no key there; keep that port off the public network) and the public
port answers 404.
"""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel

from sdfleet.api.auth import request_key
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.openapi import errors
from sdfleet.errors import NotFound, SdfleetError, Unauthorized

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    reason: str | None = None
    warning: str | None = None


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "Not ready"}},
)
async def readyz(request: Request, response: Response, ctx: ApiContext = Depends(get_ctx)) -> Health:
    """The bus and the task store answer (checked at most once per `api.ready_check_s`; ready until
    three periods pass without a passing check)."""
    state = request.app.state
    period = ctx.settings.ready_check_s
    now = time.monotonic()
    last_ok: float | None = getattr(state, "ready_ok_at", None)
    if last_ok is not None and now - last_ok < period:
        return Health(status="ready")
    try:
        await ctx.bus.stats(ctx.fleet.queues[0].name)
        await ctx.store.get("readyz", "probe")
    except SdfleetError as e:  # the details are for the log
        if last_ok is not None and now - last_ok < 3 * period:
            return Health(status="ready", warning=e.code)
        response.status_code = 503
        return Health(status="unavailable", reason=e.code)
    state.ready_ok_at = now
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


def registry_of(ctx: ApiContext) -> CollectorRegistry:
    """This process's metrics, or every worker's (added up) when ``api.workers`` > 1."""
    if ctx.settings.workers > 1:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return ctx.metrics.registry


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text",
        },
        **errors(401, 404),
    },
)
async def metrics(request: Request, ctx: ApiContext = Depends(get_ctx)) -> Response:
    """Prometheus metrics of this API (with API keys in use: `Bearer <api.metrics_key>`; with
    `api.ops_port` set: 404 here, served on the ops port)."""
    if ctx.settings.ops_port is not None:  # the ops listener serves it, never the public port
        raise NotFound("/metrics is served on the ops port (api.ops_port)")
    await check_metrics_key(ctx, request)
    return Response(generate_latest(registry_of(ctx)), media_type=CONTENT_TYPE_LATEST)
