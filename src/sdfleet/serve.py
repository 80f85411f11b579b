"""Running the API and agents in one asyncio process (``sdfleet up``, ``sdfleet demo``, ``sdfleet api``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from sdfleet.agent.loop import Agent
from sdfleet.api.app import create_app
from sdfleet.build import agent_parts, api_context, make_runtime, open_engines
from sdfleet.settings import Settings
from sdfleet.telemetry import Metrics

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the fleet owns SIGTERM (agents must drain too)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


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
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            engines = await open_engines(self.settings, stack)
            metrics = Metrics()
            jobs: list[asyncio.Task[object]] = []
            for q in self.queues:
                runtime = make_runtime(self.settings, q)
                stack.push_async_callback(runtime.aclose)
                parts = agent_parts(self.settings, engines, q, runtime, metrics)
                stack.push_async_callback(parts.fetcher.aclose)
                for notifier in parts.notifiers:
                    stack.push_async_callback(notifier.aclose)
                ready = self.ready_dir / f"{q}.ready" if self.ready_dir else None
                agent = Agent(parts, burst=self.burst, ready_file=ready)
                self.agents.append(agent)
                jobs.append(asyncio.create_task(agent.run(), name=f"agent-{q}"))
            if self.with_api:
                app = create_app(api_context(self.settings, engines, metrics))
                config = uvicorn.Config(
                    app,
                    host=self.settings.api.host,
                    port=self.settings.api.port,
                    log_config=None,
                    lifespan="off",
                )
                self.server = _Server(config)
                jobs.append(asyncio.create_task(self.server.serve(), name="api"))
                while not self.server.started and not jobs[-1].done():
                    await asyncio.sleep(0.02)
            self.started.set()
            try:
                await asyncio.gather(*jobs)
            finally:
                self.stop()
                for job in jobs:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await job

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.server is not None:
            self.server.should_exit = True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
