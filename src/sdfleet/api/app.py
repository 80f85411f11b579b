"""``create_app``: the FastAPI app over already-built parts; errors mapped to HTTP in one place."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sdfleet import errors
from sdfleet.api.body import validation_message
from sdfleet.api.deps import ApiContext
from sdfleet.api.queue_stats import queue_stats_refresher
from sdfleet.api.routes import compat, events, files, health, models, queues, tasks, ui

STATUS: list[tuple[type[errors.SdfleetError], int]] = [
    (errors.PayloadTooLarge, 413),
    (errors.ValidationFailed, 422),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Unauthorized, 401),
    (errors.BusUnavailable, 503),
    (errors.StoreUnavailable, 503),
    (errors.StorageUnavailable, 503),
]


def status_for(e: errors.SdfleetError) -> int:
    if e.code == "malformed_json":
        return 400
    return next((code for cls, code in STATUS if isinstance(e, cls)), 500)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


async def _sdfleet_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, errors.SdfleetError)
    return JSONResponse(error_body(e.code, e.message or str(e)), status_code=status_for(e))


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    # A bug or an unreadable record fails this one request with the usual error shape; the
    # process serves on (Starlette re-raises it after answering, so uvicorn logs the traceback).
    return JSONResponse(error_body("internal", f"internal error ({type(e).__name__})"), status_code=500)


async def _request_validation(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5]]
    return JSONResponse(error_body("invalid_request", "; ".join(parts)), status_code=422)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: ApiContext = app.state.ctx
    async with queue_stats_refresher(ctx.bus, ctx.fleet, ctx.metrics, ctx.settings.queue_stats_s):
        yield


def create_app(ctx: ApiContext) -> FastAPI:
    """The API over ``ctx``; its lifespan (run by uvicorn) refreshes the queue gauges."""
    app = FastAPI(
        title="sdfleet",
        version="0.1.0",
        description="Asynchronous Stable Diffusion generation: submit, get a task id at once, fetch results.",
        lifespan=_lifespan,
    )
    app.state.ctx = ctx
    app.add_exception_handler(errors.SdfleetError, _sdfleet_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(Exception, _unexpected)
    for module in (tasks, events, compat, queues, files, models, health, ui):
        app.include_router(module.router)
    return app


__all__ = ["create_app", "status_for", "validation_message"]
