"""``create_app``: the FastAPI app over already-built parts; errors mapped to HTTP in one place."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from sdfleet import errors
from sdfleet.api import docs, openapi, openapi_rules
from sdfleet.api.deps import ApiContext
from sdfleet.api.head import HeadAsGet
from sdfleet.api.queue_stats import queue_stats_refresher
from sdfleet.api.retention import files_expiry
from sdfleet.api.routes import compat, events, files, health, models, queues, tasks, ui
from sdfleet.api.seed_schemas import V1alpha1Body, V1alpha2Body
from sdfleet.settings import ApiSettings, FleetConfig
from sdfleet.tasks import TaskEvent
from sdfleet.telemetry import fastapi_options

log = logging.getLogger(__name__)

STATUS: list[tuple[type[errors.SdfleetError], int]] = [
    (errors.PayloadTooLarge, 413),
    (errors.UnsupportedMediaType, 415),
    (errors.RequestTimeout, 408),
    (errors.ValidationFailed, 422),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.RateLimited, 429),
    (errors.BusUnavailable, 503),
    (errors.StoreUnavailable, 503),
    (errors.StorageUnavailable, 503),
    (errors.InputUnavailable, 503),  # a webhook host the resolver could not look up just now
]
# What a client is told when we fail: the details (engine addresses, file paths) go to the log.
_SERVER_SIDE = {
    errors.BusUnavailable: "the task bus is unavailable; retry later",
    errors.StoreUnavailable: "the task store is unavailable; retry later",
    errors.StorageUnavailable: "the storage is unavailable; retry later",
    errors.InputUnavailable: "a host the request names could not be looked up just now; retry later",
}
_FULL = {  # Redis at its maxmemory (see sdfleet._redis.ADDS_WORK): full until agents drain it
    "bus_full": "the task bus is full; retry later",
    "store_full": "the task store is full; retry later",
}


def status_for(e: errors.SdfleetError) -> int:
    if e.code == "malformed_json":
        return 400
    return next((code for cls, code in STATUS if isinstance(e, cls)), 500)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


async def _sdfleet_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, errors.SdfleetError)
    status = status_for(e)
    message = e.message or str(e)
    if status >= 500:
        log.warning("%s %s: %s: %s", request.method, request.url.path, e.code, message)
        message = _FULL.get(e.code) or next(
            (m for cls, m in _SERVER_SIDE.items() if isinstance(e, cls)), "internal error"
        )
    headers = {}
    if isinstance(e, errors.RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    elif isinstance(e, errors.Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="sdfleet"'  # RFC 9110 §11.6.1: a 401 names its scheme
    return JSONResponse(error_body(e.code, message), status_code=status, headers=headers)


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    # A bug or an unreadable record fails this one request with the usual error shape; the
    # process serves on (Starlette re-raises it after answering, so uvicorn logs the traceback).
    return JSONResponse(error_body("internal", f"internal error ({type(e).__name__})"), status_code=500)


async def _request_validation(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return JSONResponse(error_body("invalid_request", errors.validation_errors(e)), status_code=422)


_ROUTING = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, e: Exception) -> JSONResponse:
    """Starlette's own answers (no route, wrong method) in our error shape; a 405 lists every
    method of the path, not only those of the first route that matched it."""
    assert isinstance(e, HTTPException)
    headers = dict(e.headers or {})
    if e.status_code == 405:
        methods: set[str] = set()
        for route in request.app.state.api_routes:
            match, _ = route.matches(request.scope)  # PARTIAL: the path is the route's, not the method
            if match is not Match.NONE:
                methods |= set(route.methods or ())
        if "GET" in methods:
            methods.add("HEAD")  # answered by HeadAsGet
        headers["Allow"] = ", ".join(sorted(methods))
    code = _ROUTING.get(e.status_code, "http_error")
    return JSONResponse(error_body(code, str(e.detail)), status_code=e.status_code, headers=headers)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Refresh the queue gauges, and delete expired local result files, in the background while
    serving."""
    ctx: ApiContext = app.state.ctx
    async with (
        queue_stats_refresher(ctx.bus, ctx.fleet, ctx.metrics, ctx.settings.queue_stats_s),
        files_expiry(ctx.storage, ctx.fleet.retain_s),
    ):
        yield


BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/tasks", "post"): tasks.TaskRequest,
    ("/v1alpha1/", "post"): V1alpha1Body,
    ("/v1alpha2/", "post"): V1alpha2Body,
}


def create_app(ctx: ApiContext) -> FastAPI:
    """The API over ``ctx``; its lifespan (run by uvicorn) refreshes the queue gauges."""
    app = build_app(ctx.settings, ctx.fleet, _lifespan)
    app.state.ctx = ctx
    return app


def build_app(
    settings: ApiSettings,
    fleet: FleetConfig,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
) -> FastAPI:
    """The app without its ``ApiContext``: ``lifespan`` must put one in ``app.state.ctx``. Traced:
    only ``api.submit`` (FastAPI's own request spans are off, see ``fastapi_options``)."""
    app = FastAPI(
        **fastapi_options(),
        title="sdfleet",
        version="0.1.0",
        description="Asynchronous Stable Diffusion generation: submit, get a task id at once, fetch results.",
        lifespan=lifespan,
        docs_url=None,  # docs.install: the same pages with their assets served here, not from a CDN
        redoc_url=None,
    )
    docs.install(app, app.title)
    app.add_exception_handler(errors.SdfleetError, _sdfleet_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(HeadAsGet)
    modules = (tasks, events, compat, queues, files, models, health, ui)
    routers = [*(module.router for module in modules), ui.home]  # ui.home: `/`, outside `/ui`
    for router in routers:
        app.include_router(router)
    app.state.api_routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    openapi.install(app, settings, fleet, BODIES, openapi_rules.tighten, also=(TaskEvent,))
    return app


serve_ctx = _lifespan
"""The part of the lifespan that needs ``app.state.ctx`` (for apps made with ``build_app``)."""

__all__ = ["build_app", "create_app", "serve_ctx", "status_for"]
