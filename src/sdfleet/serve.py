"""Running the API and agents in one asyncio process (``sdfleet up``, ``sdfleet demo``, ``sdfleet api``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Generator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
from prometheus_client import make_asgi_app

from sdfleet.agent.loop import Agent
from sdfleet.api.app import create_app
from sdfleet.api.ops import create_ops_app
from sdfleet.build import Engines, agent_parts, api_context, make_runtime, open_engines
from sdfleet.settings import Settings
from sdfleet.telemetry import Metrics

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the fleet owns SIGTERM (agents must drain too)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


KEEP_ALIVE_S = 75
"""How long an idle keep-alive connection stays open. uvicorn's default is 5 s; behind a load
balancer that keeps connections longer (an ALB: 60 s) the balancer then sends requests on
connections the server is closing (502s), and so may any client that pools connections."""


def _server(
    app: Callable[..., Any], host: str, port: int, lifespan: Literal["on", "off"] = "off"
) -> uvicorn.Server:
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, lifespan=lifespan, timeout_keep_alive=KEEP_ALIVE_S
    )
    return _Server(config)


def check_bindable(host: str, port: int, name: str) -> None:
    """Raise ``OSError`` naming the listener when ``host:port`` cannot be bound: uvicorn itself
    only logs it and calls ``sys.exit(3)`` from inside the event loop."""
    if port == 0:
        return
    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(e.errno, f"the {name} cannot listen on {host}:{port}: {why}") from e


async def _serve(server: uvicorn.Server, name: str) -> asyncio.Task[object]:
    """Start ``server`` and return once it listens (or has failed to start)."""
    check_bindable(server.config.host, server.config.port, name)
    task: asyncio.Task[object] = asyncio.create_task(server.serve(), name=name)
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    return task


@dataclass
class Fleet:
    """An API server and agents sharing one event loop and one set of engines."""

    settings: Settings
    queues: Sequence[str]
    with_api: bool = True
    burst: bool = False
    ready_dir: Path | None = None
    agents: list[Agent] = field(default_factory=list)
    server: uvicorn.Server | None = None
    metrics_server: uvicorn.Server | None = None
    """The agents' ``/metrics`` listener (``agent.metrics_port``)."""
    ops_server: uvicorn.Server | None = None
    """The API's ops listener (``api.ops_port``): ``/metrics`` and queue depth for KEDA."""
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        # A taken port fails the fleet before anything starts (agents would load their models
        # first, and log their bus closing under them); each listener is checked again as it starts.
        for listener in self._listeners():
            check_bindable(*listener)
        if self.queues:  # a heartbeat the lease outlives, said before any runtime loads its model
            self.settings.agent.heartbeat_period(self.settings.fleet.retry.lease_s)
        async with AsyncExitStack() as stack:
            engines = await open_engines(self.settings, stack)
            metrics = Metrics()
            jobs = [self._start_agent(stack, engines, q, metrics) for q in self.queues]
            if self.with_api:
                ctx = api_context(self.settings, engines, metrics)
                app = create_app(ctx)
                # lifespan on: the app's lifespan refreshes the queue gauges in the background
                self.server = _server(app, self.settings.api.host, self.settings.api.port, lifespan="on")
                jobs.append(await _serve(self.server, "api"))
                if self.settings.api.ops_port:
                    ops = create_ops_app(app.state.ctx)
                    self.ops_server = _server(ops, self.settings.api.host, self.settings.api.ops_port)
                    jobs.append(await _serve(self.ops_server, "api-ops"))
            # Not in ``jobs``: a burst agent ends the fleet, and this listener with it.
            extra: list[asyncio.Task[object]] = []
            port, host = self._metrics_listen()
            if port:
                registry_app = make_asgi_app(registry=metrics.registry)
                self.metrics_server = _server(registry_app, host, port)
                extra.append(await _serve(self.metrics_server, "metrics"))
            self.started.set()
            try:
                await asyncio.gather(*jobs)
            finally:
                self.stop()
                for job in (*jobs, *extra):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await job

    def _listeners(self) -> list[tuple[str, int, str]]:
        api = self.settings.api
        found = [(api.host, api.port, "api")] if self.with_api else []
        if self.with_api and api.ops_port:
            found.append((api.host, api.ops_port, "api-ops"))
        port, host = self._metrics_listen()
        if port:
            found.append((host, port, "metrics"))
        return found

    def _metrics_listen(self) -> tuple[int | None, str]:
        agent = self.settings.agent
        if self.queues and agent.metrics_port:
            return agent.metrics_port, agent.metrics_host
        return None, ""

    def _start_agent(
        self, stack: AsyncExitStack, engines: Engines, q: str, metrics: Metrics
    ) -> asyncio.Task[object]:
        runtime = make_runtime(self.settings, q)
        stack.push_async_callback(runtime.aclose)
        parts = agent_parts(self.settings, engines, q, runtime, metrics)
        stack.push_async_callback(parts.fetcher.aclose)
        for notifier in parts.notifiers:
            stack.push_async_callback(notifier.aclose)
        ready = self.ready_dir / f"{q}.ready" if self.ready_dir else None
        agent = Agent(parts, burst=self.burst, ready_file=ready)
        self.agents.append(agent)
        return asyncio.create_task(agent.run(), name=f"agent-{q}")

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for server in (self.server, self.metrics_server, self.ops_server):
            if server is not None:
                server.should_exit = True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
