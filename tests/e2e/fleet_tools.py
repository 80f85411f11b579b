"""Helpers the e2e tests share: reading storage and the bus, fleet files, ``sdfleet agent`` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from PIL import Image

from conftest import Engine, RunningFleet, free_port, subprocess_env
from sdfleet.bus import open_bus
from sdfleet.storage import open_storage


async def wait_adopted(fleet: RunningFleet, task_id: str) -> dict[str, Any]:
    """The end of a task published straight to the bus (as the seed's Lambda does): the API knows
    it once an agent has received it."""
    for _ in range(300):
        if (await fleet.http.get(f"/v1/tasks/{task_id}")).status_code == 200:
            return await fleet.wait(task_id)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no agent picked up {task_id}")


async def published_past_the_api(
    fleet: RunningFleet, engine: Engine, version: str, body: dict[str, Any], task_id: str
) -> dict[str, Any]:
    """The end of ``body`` published straight to the bus as the seed's Lambda publishes it."""
    from seed_payloads import lambda_message

    message, attributes = lambda_message(version, body)
    bus = open_bus(engine.bus_url)
    try:
        await bus.publish("tasks", message.encode(), attributes)
    finally:
        await bus.aclose()
    return await wait_adopted(fleet, task_id)


async def read_json(engine: Engine, key: str) -> dict[str, Any]:
    storage = open_storage(engine.storage_url)
    try:
        data: dict[str, Any] = json.loads(await storage.get(key))
    finally:
        await storage.aclose()
    return data


async def exists(engine: Engine, key: str) -> bool:
    storage = open_storage(engine.storage_url)
    try:
        return await storage.exists(key)
    finally:
        await storage.aclose()


async def drain(
    engine: Engine, queue: str, *, quiet_s: float = 2.0, max_s: float = 20.0
) -> list[dict[str, Any]]:
    """Every message on ``queue`` (acked), until it stays empty for ``quiet_s``."""
    bus = open_bus(engine.bus_url)
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline, quiet_until = loop.time() + max_s, loop.time() + quiet_s
    try:
        while loop.time() < min(deadline, quiet_until):
            for d in await bus.receive(queue, max_messages=10, wait_s=0.5, lease_s=30):
                out.append(json.loads(d.body))
                await bus.ack(d)
                quiet_until = loop.time() + quiet_s
    finally:
        await bus.aclose()
    return out


def write_fleet_file(path: Path, fleet: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(fleet))
    return path


@contextmanager
def agent_process(
    engine: Engine, config: Path, queue: str, *args: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``sdfleet agent --queue <queue> [args]`` in its own process; killed at exit if still running."""
    full_env = {**subprocess_env(engine, config), "SDFLEET_LOG_JSON": "false", **env}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sdfleet.cli import main; main()", "agent", "--queue", queue, *args],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def receive_json(engine: Engine, queue: str, count: int, *, rounds: int = 30) -> list[dict[str, Any]]:
    """Up to ``count`` JSON messages from ``queue`` (acked), waiting up to about ``rounds`` seconds."""
    bus = open_bus(engine.bus_url)
    out: list[dict[str, Any]] = []
    try:
        for _ in range(rounds):
            for d in await bus.receive(queue, max_messages=10, wait_s=1):
                out.append(json.loads(d.body))
                await bus.ack(d)
            if len(out) >= count:
                break
    finally:
        await bus.aclose()
    return out


async def png_size(engine: Engine, key: str) -> tuple[int, int]:
    """Width and height of the PNG stored at ``key``."""
    storage = open_storage(engine.storage_url)
    try:
        data = await storage.get(key)
    finally:
        await storage.aclose()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.size


async def submit_all(fleet: RunningFleet, bodies: list[dict[str, Any]]) -> list[str]:
    """``POST /v1/tasks`` each body (each must be accepted); the task ids."""
    ids = []
    for body in bodies:
        r = await fleet.http.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


async def cancel_while_running(fleet: RunningFleet, task_id: str, settle_s: float, bound_s: float) -> float:
    """Cancel ``task_id`` ``settle_s`` after it started running; seconds until the agent's runtime
    call for it ended (the server stopped it), asserted within ``bound_s``."""
    await fleet.wait(task_id, states=("running",), timeout_s=120)
    await asyncio.sleep(settle_s)
    asked = time.monotonic()
    assert (await fleet.http.post(f"/v1/tasks/{task_id}/cancel")).status_code == 200
    agent = fleet.fleet.agents[0]
    while any(p.task.id == task_id for p in agent._running):
        assert time.monotonic() - asked < bound_s, f"{task_id} still running {bound_s} s after its cancel"
        await asyncio.sleep(0.05)
    stopped_s = time.monotonic() - asked
    assert (await fleet.wait(task_id, timeout_s=60))["state"] == "cancelled"
    return stopped_s


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` on a free port of 127.0.0.1 until the block ends; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    job = asyncio.create_task(server.serve())
    while not server.started:
        assert not job.done(), job
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(job, timeout=5)


def task_records(caplog: Any, task_id: str) -> list[logging.LogRecord]:
    """The agent's event lines of ``task_id`` (``agent/tasklog.py``), in order; not the API's."""
    return [r for r in caplog.records if r.name == "sdfleet.agent.task" and r.task_id == task_id]


def task_events(caplog: Any, task_id: str) -> list[str]:
    """The agent's events of ``task_id`` (received, started, succeeded …), in order."""
    return [r.event for r in task_records(caplog, task_id)]


async def dead_letters(engine: Engine) -> list[bytes]:
    """What reached ``q-dlq`` (released on each receive, moved there after max_receives)."""
    bus = open_bus(engine.bus_url)
    try:
        for _ in range(60):
            dead = await bus.receive("q-dlq", max_messages=10, wait_s=0.5, lease_s=30)
            if dead:
                return [d.body for d in dead]
        return []
    finally:
        await bus.aclose()
