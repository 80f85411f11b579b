"""Metrics without anyone asking: the API refreshes the queue gauges in the background (its lifespan
runs under uvicorn), and agents without the API serve ``/metrics`` on ``agent.metrics_port``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

from conftest import Engine, fleet_settings, free_port
from sdfleet.serve import Fleet
from sdfleet.settings import QueueConfig, Settings
from sdfleet.telemetry import JsonFormatter, TraceIdFilter

pytestmark = pytest.mark.timeout(60)

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
RUNTIMES = {"synthetic": {"latency_s": 0.05}}
BODY = {"params": {"prompt": "a kite", "steps": 2, "width": 64, "height": 64, "seed": 1}}

Start = Callable[..., Any]


@pytest.fixture
async def start(sqlite_engine: Engine, tmp_path: Path) -> AsyncIterator[Start]:
    """``await start(queues, with_api=..., burst=..., **agent_settings)`` → (fleet, task, settings)."""
    running: list[tuple[Fleet, asyncio.Task[None]]] = []

    async def run(
        agents: list[str], *, with_api: bool, queue_stats_s: float = 15.0, burst: bool = False, **agent: Any
    ) -> tuple[Fleet, asyncio.Task[None], Settings]:
        settings = fleet_settings(sqlite_engine, tmp_path, QUEUE, runtimes=RUNTIMES, **agent)
        settings.api.queue_stats_s = queue_stats_s
        fleet = Fleet(settings, agents, with_api=with_api, burst=burst)
        task = asyncio.create_task(fleet.run())
        started = asyncio.create_task(fleet.started.wait())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        running.append((fleet, task))
        return fleet, task, settings

    yield run
    for fleet, task in running:
        fleet.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)


async def _scrape_until(url: str, line: str, timeout_s: float = 10.0) -> str:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            text = (await http.get(url)).text
            if line in text or asyncio.get_running_loop().time() > deadline:
                return text
            await asyncio.sleep(0.05)


async def test_queue_gauges_refresh_without_get_queues(start: Start) -> None:
    _, _, settings = await start([], with_api=True, queue_stats_s=0.1)
    api = f"http://127.0.0.1:{settings.api.port}"
    async with httpx.AsyncClient(base_url=api) as http:
        assert (await http.post("/v1/tasks", json=BODY)).status_code == 202
    # no agent takes it and nobody calls GET /v1/queues: only the background refresh can see it
    text = await _scrape_until(f"{api}/metrics", 'sdfleet_queue_visible{queue="q"} 1.0')
    assert 'sdfleet_queue_visible{queue="q"} 1.0' in text
    assert 'sdfleet_queue_in_flight{queue="q"} 0.0' in text
    age = next(x for x in text.splitlines() if x.startswith("sdfleet_queue_oldest_age_seconds{"))
    assert float(age.split()[-1]) >= 0.0


async def test_queue_gauges_stay_unset_when_refresh_is_off(start: Start) -> None:
    _, _, settings = await start([], with_api=True, queue_stats_s=0)
    api = f"http://127.0.0.1:{settings.api.port}"
    async with httpx.AsyncClient(base_url=api) as http:
        assert (await http.post("/v1/tasks", json=BODY)).status_code == 202
        await asyncio.sleep(0.3)
        assert "sdfleet_queue_visible{" not in (await http.get("/metrics")).text
        await http.get("/v1/queues")  # the route still refreshes them
        assert 'sdfleet_queue_visible{queue="q"} 1.0' in (await http.get("/metrics")).text


async def test_agent_without_api_serves_metrics(start: Start) -> None:
    port = free_port()
    _, _, api_settings = await start([], with_api=True)
    agent, _, _ = await start(["q"], with_api=False, metrics_port=port)
    assert agent.server is None and agent.metrics_server is not None
    api = f"http://127.0.0.1:{api_settings.api.port}"
    async with httpx.AsyncClient(base_url=api) as http:
        task_id = (await http.post("/v1/tasks", json=BODY)).json()["id"]
        for _ in range(200):
            if (await http.get(f"/v1/tasks/{task_id}")).json()["state"] == "succeeded":
                break
            await asyncio.sleep(0.05)
    done = 'sdfleet_tasks_total{queue="q",state="succeeded"} 1.0'
    text = await _scrape_until(f"http://127.0.0.1:{port}/metrics", done)
    assert done in text
    for stage in ("queue_wait", "inputs_fetch", "runtime_run", "storage_put"):
        assert f'sdfleet_stage_seconds_count{{queue="q",stage="{stage}"}} 1.0' in text, stage
    assert 'sdfleet_runtime_busy{queue="q"} 0.0' in text
    assert "sdfleet_submitted_total{" not in text, "the API's counters live in the API process"


async def test_burst_agent_with_metrics_port_still_exits(start: Start) -> None:
    port = free_port()
    agent, task, _ = await start(["q"], with_api=False, burst=True, metrics_port=port)
    assert agent.metrics_server is not None and agent.metrics_server.started
    await asyncio.wait_for(task, timeout=20)  # the queue is empty: burst drains and returns
    assert agent.metrics_server.should_exit
    with pytest.raises(httpx.ConnectError):  # and the listener is gone with it
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/metrics")


def test_log_lines_under_a_task_span_carry_its_task_and_trace_ids() -> None:
    provider = TracerProvider()  # local: the process-wide provider is the CLI's business
    record = logging.makeLogRecord({"name": "sdfleet.agent", "msg": "attempt failed"})
    with provider.get_tracer("test").start_as_current_span(
        "runtime.run", attributes={"sdfleet.task_id": "t-42"}
    ) as span:
        assert TraceIdFilter().filter(record)
        line = json.loads(JsonFormatter().format(record))
    assert line["task_id"] == "t-42"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    given = logging.makeLogRecord({"msg": "x", "task_id": "explicit"})
    with provider.get_tracer("test").start_as_current_span("s", attributes={"sdfleet.task_id": "t"}):
        TraceIdFilter().filter(given)
    assert given.task_id == "explicit"
