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
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import uvicorn
from fastapi import FastAPI

from sdfleet.serve import KEEP_ALIVE_S, check_bindable
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
    check_bindable(settings.api.host, settings.api.port, "api")
    ops = OpsListener(settings.model_copy(update={"ensure_topology": False}))
    if settings.api.ops_port:  # every worker's metrics, and the queue depths KEDA reads
        ops.start()
    try:
        uvicorn.run(
            "sdfleet.api.workers:app",
            factory=True,
            host=settings.api.host,
            port=settings.api.port,
            workers=settings.api.workers,
            lifespan="on",
            log_config=None,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    finally:
        ops.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


class OpsListener:
    """The operations app (``api.ops``: ``/metrics``, ``/queues/<name>/depth``) in the supervisor,
    on a thread with its own event loop and engines. The depth route is what the chart's KEDA
    ``metrics-api`` trigger reads: with only a metrics server here it answered Prometheus text on
    every path, which KEDA cannot read. ``/metrics`` adds every worker's counters up (the workers
    write them to ``PROMETHEUS_MULTIPROC_DIR``)."""

    def __init__(self, settings: Settings, start_timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.port = settings.api.ops_port or 0
        self.start_timeout_s = start_timeout_s
        self._server: uvicorn.Server | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sdfleet-ops", daemon=True)

    def start(self) -> None:
        """Serve, or raise what kept it from serving (the port taken, an engine unreachable)."""
        check_bindable(self.settings.api.host, self.port, "ops listener")
        self._thread.start()
        if not self._started.wait(self.start_timeout_s) or self._error is not None:
            self.stop()
            raise self._error or TimeoutError(f"the ops listener did not start in {self.start_timeout_s:g} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # told to start(); a failure after that ends only this listener
            self._error = e
        finally:
            self._started.set()

    async def _serve(self) -> None:
        from sdfleet.api.ops import create_ops_app
        from sdfleet.build import api_context, open_engines
        from sdfleet.telemetry import Metrics

        async with AsyncExitStack() as stack:
            engines = await open_engines(self.settings, stack)
            app = create_ops_app(api_context(self.settings, engines, Metrics()))
            config = uvicorn.Config(
                app,
                host=self.settings.api.host,
                port=self.port,
                log_config=None,
                lifespan="off",
                timeout_keep_alive=KEEP_ALIVE_S,
            )
            self._server = uvicorn.Server(config)
            serving = asyncio.create_task(self._server.serve())
            while not self._server.started and not serving.done():
                await asyncio.sleep(0.05)
            self._started.set()
            await serving
