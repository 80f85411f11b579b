"""Probes and metrics: ``/healthz`` (process alive), ``/readyz`` (engines reachable), ``/metrics``.

``/readyz`` reads the engines at most once per ``api.ready_check_s`` and unreadies a replica only
after three periods without a passing check: one upstream blip must not take every replica out of
the Service at once. ``/metrics`` moves to the ops listener when ``api.ops_port`` is set.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.errors import NotFound, SdfleetError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, response: Response, ctx: ApiContext = Depends(get_ctx)) -> dict[str, str]:
    state = request.app.state
    period = ctx.settings.ready_check_s
    now = time.monotonic()
    last_ok: float | None = getattr(state, "ready_ok_at", None)
    if last_ok is not None and now - last_ok < period:
        return {"status": "ready"}
    try:
        await ctx.bus.stats(ctx.fleet.queues[0].name)
        await ctx.store.get("readyz-probe")
    except SdfleetError as e:
        if last_ok is not None and now - last_ok < 3 * period:
            return {"status": "ready", "warning": str(e)}
        response.status_code = 503
        return {"status": "unavailable", "reason": str(e)}
    state.ready_ok_at = now
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(ctx: ApiContext = Depends(get_ctx)) -> Response:
    if ctx.settings.ops_port is not None:  # the ops listener serves it, never the public port
        raise NotFound("/metrics is served on the ops port (api.ops_port)")
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
