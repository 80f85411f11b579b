"""Defects 1 and 2 of issue 14 on a live redis-server: the rendered KEDA triggers, evaluated as KEDA
computes them, ask for a worker per task the queue still owes in every state (none received,
all running, workers dead with leases expired, a delayed retry), and ``sdfleet ensure`` (the
chart's hook Job) makes the topology the agents need."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from k8s_checks import CLUSTER, merge, of_kind, render
from keda_eval import Reading, desired, evaluate
from local_services import free_port
from typer.testing import CliRunner

from sdfleet.api.ops import create_ops_app
from sdfleet.build import Engines, api_context
from sdfleet.bus.backends.redis import RedisBus, stream_names
from sdfleet.cli import app
from sdfleet.cli_ensure import ensure_topology
from sdfleet.deploy import chart_values
from sdfleet.errors import NotFound
from sdfleet.settings import ApiSettings, FleetConfig, Settings

pytestmark = pytest.mark.timeout(60)
TASKS = 3


def _fleet() -> FleetConfig:
    return FleetConfig.model_validate(
        {"queues": [{"name": "sd15", "scaling": {"target_backlog": 1}}], "retry": {"lease_s": 60}}
    )


def _settings(server: Any, prefix: str, tmp_path: Path, ops_port: int) -> Settings:
    url = f"{server.url}?prefix={prefix}"
    return Settings(
        bus_url=url,
        store_url=url,
        storage_url=f"file://{tmp_path}/files",
        fleet=_fleet(),
        api=ApiSettings(ops_port=ops_port, queue_stats_s=0),
    )


@contextlib.asynccontextmanager
async def _ops_listener(settings: Settings) -> AsyncIterator[None]:
    """The API's ops app over real HTTP on 127.0.0.1, as the api-ops Service would serve it."""
    engines = Engines(settings)
    assert settings.api.ops_port is not None
    config = uvicorn.Config(
        create_ops_app(api_context(settings, engines)),
        host="127.0.0.1",
        port=settings.api.ops_port,
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task
        await engines.aclose()


def _triggers(server: Any, prefix: str) -> list[dict[str, Any]]:
    values = chart_values(_fleet(), engine="redis", prefix=prefix, redis_address=f"127.0.0.1:{server.port}")
    (so,) = of_kind(render(merge(values, CLUSTER)), "ScaledObject")
    return so["spec"]["triggers"]  # type: ignore[no-any-return]


async def test_scalers_count_every_task_the_queue_owes(redis_server: Any, tmp_path: Path) -> None:
    prefix = f"keda{uuid.uuid4().hex[:6]}"
    port = free_port()
    settings = _settings(redis_server, prefix, tmp_path, port)
    triggers = _triggers(redis_server, prefix)
    assert {t["type"] for t in triggers} == {"metrics-api", "redis-streams"}
    client = redis.Redis.from_url(redis_server.url)
    stream, group = stream_names(prefix, "sd15")
    lag_trigger = {
        "type": "redis-streams",
        "metadata": {"stream": stream, "consumerGroup": group, "lagCount": "1"},
    }
    pending_trigger = {**lag_trigger, "metadata": {"stream": stream, "consumerGroup": group}}

    async def read(extra: list[dict[str, Any]] | None = None) -> list[Reading]:
        here = lambda url: url.replace(url.split("/")[2], f"127.0.0.1:{port}")  # noqa: E731
        return await asyncio.to_thread(evaluate, [*triggers, *(extra or [])], client, here)

    await ensure_topology(settings)
    async with _ops_listener(settings), RedisBus.from_url(settings.bus) as bus:
        for i in range(TASKS):
            await bus.publish("tasks", f'{{"n": {i}}}'.encode(), {"task_id": str(i)})
        # No worker yet: scale from zero to one worker per task (target_backlog 1).
        readings = await read([pending_trigger])
        assert desired(readings[:2]) == TASKS
        assert not readings[2].active, "pendingEntriesCount alone would never wake the queue"

        running = await bus.receive("sd15", max_messages=TASKS, lease_s=2)
        assert len(running) == TASKS
        readings = await read([lag_trigger])
        assert desired(readings[:2]) == TASKS, "busy workers must not be scaled in"
        assert readings[2].metric == 0, "lagCount alone would scale the running workers in"

        await asyncio.sleep(2.2)  # the workers died: their leases ran out, nobody holds the tasks
        readings = await read([lag_trigger])
        assert desired(readings[:2]) == TASKS, "tasks of dead workers need workers again"
        assert readings[2].metric == 0
        stranded = await bus.receive("sd15", max_messages=TASKS, lease_s=60)
        assert len(stranded) == TASKS

        retry, *done = stranded
        await bus.release(retry, delay_s=30)
        for d in done:
            await bus.ack(d)
        readings = await read()
        assert [r.metric for r in readings] == [1, 0], "the delayed retry is counted by depth only"
        assert desired(readings) == 1

        got = await _take_delayed(bus, client, stream)
        await bus.ack(got)
        assert desired(await read()) == 0, "an empty queue scales to zero"
    client.close()


async def _take_delayed(bus: RedisBus, client: redis.Redis, stream: str) -> Any:
    """Make the delayed retry due now (as time would) and receive it."""
    for mid in client.zrange(f"{stream}:delayed", 0, -1):
        client.zadd(f"{stream}:delayed", {mid: 0})
    (got,) = await bus.receive("sd15", max_messages=1, lease_s=60)
    return got


async def test_ensure_makes_the_topology_agents_need(redis_server: Any, tmp_path: Path) -> None:
    prefix = f"ens{uuid.uuid4().hex[:6]}"
    settings = _settings(redis_server, prefix, tmp_path, free_port())
    async with RedisBus.from_url(settings.bus) as bus:
        with pytest.raises(NotFound):
            await bus.receive("sd15")  # what agents hit without it
        config = tmp_path / "sdfleet.yaml"
        config.write_text(_fleet().model_dump_json())
        env = {"SDFLEET_BUS_URL": settings.bus, "SDFLEET_LOG_JSON": "false"}
        args = ["ensure", "--config", str(config), "--wait", "0"]
        result = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "2 queues (sd15, results)" in result.output
        assert await bus.receive("sd15") == []
        await bus.publish("tasks", b"{}", {"task_id": "t"})
        assert len(await bus.receive("sd15")) == 1


def test_ensure_fails_cleanly_when_the_engine_is_away(tmp_path: Path) -> None:
    config = tmp_path / "sdfleet.yaml"
    config.write_text(_fleet().model_dump_json())
    env = {"SDFLEET_BUS_URL": f"redis://127.0.0.1:{free_port()}/0", "SDFLEET_LOG_JSON": "false"}
    result = CliRunner().invoke(app, ["ensure", "--config", str(config), "--wait", "0"], env=env)
    assert result.exit_code == 2 and "error" in result.output
