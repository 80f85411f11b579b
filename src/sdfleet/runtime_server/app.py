"""``sdfleet runtime serve``: a runtime (diffusers) behind an AUTOMATIC1111-compatible HTTP API.

Tools written for SD WebUI 1.10 (its ``/sdapi/v1`` endpoints, the ``webuiapi`` client, the seed's
queue agent) work against it unchanged: it starts with a checkpoint loaded, answers with SD WebUI's
fields, and errors use SD WebUI's body ``{"error", "detail", "body", "errors"}``. Where it differs
on purpose is listed in docs/runtimes.md.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from sdfleet.models.catalog import ModelCatalog
from sdfleet.runtime_server import errors, routes, routes_info
from sdfleet.runtime_server.checkpoints import Checkpoints
from sdfleet.runtime_server.state import ServerState
from sdfleet.runtimes.base import Runtime
from sdfleet.telemetry import fastapi_options

log = logging.getLogger(__name__)


def create_app(
    runtime: Runtime,
    catalog: ModelCatalog,
    *,
    model: str | None = None,
    start: bool = True,
    cmd_flags: dict[str, Any] | None = None,
    sdwebui_status: bool = False,
) -> FastAPI:
    """The app. With ``start`` its lifespan loads ``model``, else the first model of the folder (as
    SD WebUI starts with a checkpoint loaded), and closes the runtime at the end. ``cmd_flags``:
    values ``/cmd-flags`` reports over SD WebUI's defaults (port, listen address, models folder).
    ``sdwebui_status``: answer client mistakes with SD WebUI's own status codes (often 500) instead
    of 4xx, for clients that match on them; the bodies are the same either way."""
    state = ServerState(runtime, Checkpoints(catalog))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start:
            await state.start(model)
        try:
            yield
        finally:
            await runtime.aclose()

    app = FastAPI(
        title="sdfleet (AUTOMATIC1111-compatible API)",
        lifespan=lifespan,
        **fastapi_options(),
        **_any_content_type(),
    )
    app.state.sd = state
    app.state.cmd_flags = {"api": True, "nowebui": True, "ckpt_dir": str(catalog.models_dir.absolute())}
    app.state.cmd_flags.update(cmd_flags or {})
    errors.install(app, sdwebui_status=sdwebui_status)
    app.include_router(routes.router)
    app.include_router(routes_info.router)
    return app


def _any_content_type() -> dict[str, Any]:
    """SD WebUI 1.10 (FastAPI 0.94) reads a JSON body sent without a ``Content-Type``, as
    ``requests.post(url, data=json.dumps(body))`` sends it; newer FastAPI refuses such a body (422)
    unless told not to (``strict_content_type``, where the installed FastAPI has it)."""
    if "strict_content_type" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"strict_content_type": False}
