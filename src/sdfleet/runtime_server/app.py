"""``sdfleet runtime serve``: a runtime (diffusers) behind an AUTOMATIC1111-compatible HTTP API.

Tools written for SD WebUI (its ``/sdapi/v1`` endpoints, the ``webuiapi`` client, the seed's queue
agent) work against it unchanged. Errors use SD WebUI's body: ``{"error", "detail", "body", "errors"}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sdfleet.errors import Reject as RejectError
from sdfleet.errors import RuntimeFailure, SdfleetError, ValidationFailed
from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtime_server.routes import router
from sdfleet.runtime_server.state import Checkpoints, ServerState
from sdfleet.runtimes.base import Runtime
from sdfleet.telemetry import fastapi_options

log = logging.getLogger(__name__)

# Reject codes that SD WebUI answers with 404 (it says "Sampler not found", "model not found").
_NOT_FOUND = {"unknown_sampler", "unknown_model", "unknown_upscaler"}


def _error(status: int, exc: Exception, detail: Any) -> JSONResponse:
    body = {"error": type(exc).__name__, "detail": detail, "body": "", "errors": str(detail)}
    return JSONResponse(status_code=status, content=body)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RejectError)
    async def reject(_: Request, e: RejectError) -> JSONResponse:
        return _error(404 if e.code in _NOT_FOUND else 422, e, e.reason)

    @app.exception_handler(ValidationFailed)
    async def invalid(_: Request, e: ValidationFailed) -> JSONResponse:
        return _error(422, e, e.message)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(422, e, json.loads(json.dumps(e.errors(), default=str)))

    @app.exception_handler(SdfleetError)
    async def failed(_: Request, e: SdfleetError) -> JSONResponse:
        status = 500 if isinstance(e, RuntimeFailure) else 400
        return _error(status, e, e.message or str(e))


def create_app(runtime: Runtime, catalog: ModelCatalog, *, start: bool = True) -> FastAPI:
    """The app; with ``start`` its lifespan starts the runtime (loads the default model) and closes it."""
    state = ServerState(runtime, Checkpoints(catalog))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start:
            await runtime.start()
            state.selected = runtime.loaded_model
        try:
            yield
        finally:
            await runtime.aclose()

    app = FastAPI(title="sdfleet (AUTOMATIC1111-compatible API)", lifespan=lifespan, **fastapi_options())
    app.state.sd = state
    _install_errors(app)
    app.include_router(router)
    return app
