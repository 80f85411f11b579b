"""``sdfleet api`` with ``api.workers`` > 1: uvicorn's supervisor runs that many API processes on one
port, each with its own engines (the embedded SQLite engine is safe across processes).

The supervisor prepares what every worker must share and passes it in the environment the workers
inherit: the fleet file, the file-link signing key (a link made by one worker is served by any),
and a Prometheus multiprocess folder so that ``/metrics`` adds the workers' counters up. The
topology is ensured once, here, not by each worker. A worker builds its settings the usual way
(``load_settings``) and opens its engines in the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from sdfleet.serve import check_bindable
from sdfleet.settings import Settings, load_settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def app() -> FastAPI:
    """The uvicorn factory of one worker (``sdfleet.api.workers:app``)."""
    from sdfleet.api.app import build_app, serve_ctx
    from sdfleet.build import api_context, open_engines
    from sdfleet.telemetry import Metrics, setup_logging, setup_tracing

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_json)
    setup_tracing("sdfleet-api", settings.otlp_endpoint)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            engines = await open_engines(settings, stack)
            app.state.ctx = api_context(settings, engines, Metrics())
            async with serve_ctx(app):
                yield

    return build_app(settings.api, settings.fleet, lifespan)


async def _ensure_topology(settings: Settings) -> None:
    from sdfleet.build import open_engines

    async with AsyncExitStack() as stack:
        await open_engines(settings, stack)


def serve(settings: Settings) -> None:
    """Run ``settings.api.workers`` API processes on ``api.host:api.port`` until SIGTERM/SIGINT."""
    if settings.ensure_topology:
        asyncio.run(_ensure_topology(settings))
    shared = {
        "SDFLEET_API__SIGNING_KEY": settings.api.signing_key or secrets.token_hex(32),
        "SDFLEET_ENSURE_TOPOLOGY": "false",
        "SDFLEET_API__HOST": settings.api.host,
        "SDFLEET_API__PORT": str(settings.api.port),
    }
    if settings.config_file is not None:
        shared["SDFLEET_CONFIG_FILE"] = str(settings.config_file.resolve())
    metrics_dir = tempfile.mkdtemp(prefix="sdfleet-metrics-")
    shared[MULTIPROC_ENV] = metrics_dir
    os.environ.update(shared)  # the workers are spawned with this environment
    if settings.api.ops_port:  # the keyless scrape port: every worker's metrics, from the supervisor
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        start_http_server(settings.api.ops_port, addr=settings.api.host, registry=registry)
    check_bindable(settings.api.host, settings.api.port, "api")
    try:
        uvicorn.run(
            "sdfleet.api.workers:app",
            factory=True,
            host=settings.api.host,
            port=settings.api.port,
            workers=settings.api.workers,
            lifespan="on",
            log_config=None,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
