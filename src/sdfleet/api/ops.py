"""The API's operations listener (``api.ops_port``): ``/metrics`` and per-queue depth, off the public port.

Kept off the port an Ingress exposes: Prometheus scrapes ``/metrics`` here, and KEDA's
``metrics-api`` scaler reads ``/queues/<name>/depth`` here, the one number that counts every task
a queue still owes (visible + in flight + delayed), on every engine, from the bus's own ``stats``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from sdfleet import errors
from sdfleet.api.deps import ApiContext, get_ctx
from sdfleet.api.routes.health import registry_of

router = APIRouter(tags=["operations"])


class QueueDepth(BaseModel):
    queue: str
    depth: int
    """visible + in_flight + delayed: tasks that still need a worker (what KEDA scales on)."""
    visible: int
    in_flight: int
    delayed: int


@router.get("/queues/{name}/depth", response_model=QueueDepth)
async def queue_depth(name: str, ctx: ApiContext = Depends(get_ctx)) -> QueueDepth:
    if ctx.fleet.queue(name) is None:
        raise errors.NotFound(f"queue {name!r} is not in the fleet")
    s = await ctx.bus.stats(name)
    ctx.metrics.set_queue(name, s)
    return QueueDepth(
        queue=name,
        depth=s.visible + s.in_flight + s.delayed,
        visible=s.visible,
        in_flight=s.in_flight,
        delayed=s.delayed,
    )


@router.get("/metrics")
async def metrics(ctx: ApiContext = Depends(get_ctx)) -> Response:
    return Response(generate_latest(registry_of(ctx)), media_type=CONTENT_TYPE_LATEST)


def create_ops_app(ctx: ApiContext) -> FastAPI:
    """The operations app over the same context (and engines) as the public one."""
    from sdfleet.api.app import _sdfleet_error
    from sdfleet.api.head import HeadAsGet

    app = FastAPI(title="sdfleet operations", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.add_exception_handler(errors.SdfleetError, _sdfleet_error)
    app.add_middleware(HeadAsGet)
    app.include_router(router)
    return app
