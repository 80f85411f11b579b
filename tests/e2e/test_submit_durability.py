"""A 202 is never an orphan: the API publishes before it records, agents adopt a task whose record
is missing, and a publish that fails leaves nothing behind (the client gets a 503 and retries)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SD15, Engine, StartFleet, dedicated_and_dynamic, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.routing import stamp, task_attributes
from sdfleet.tasks import Task, TaskParams

PARAMS = {"prompt": "a bridge", "steps": 2, "width": 64, "height": 64}


async def test_agent_adopts_a_task_the_api_published_but_never_recorded(
    start_fleet: StartFleet, engine: Engine
) -> None:
    # What an API that died right after its publish leaves: a message on the topic and no record.
    fleet = await start_fleet()
    task = Task(model=SD15, params=TaskParams.model_validate(PARAMS), queue="sd15", tenant="default")
    bus = open_bus(engine.bus_url)
    try:
        await bus.publish("tasks", task.to_message(), stamp(task_attributes(task)))
    finally:
        await bus.aclose()
    for _ in range(300):  # no record until an agent adopts the task
        if (await fleet.http.get(f"/v1/tasks/{task.id}")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    view = await fleet.wait(task.id)
    assert view["state"] == "succeeded" and view["queue"] == "sd15" and view["tenant"] == "default"
    assert len(view["images"]) == 1


@pytest.fixture
def redis_bus_sqlite_store(redis_server: Any, tmp_path: Path) -> Iterator[tuple[Engine, Any]]:
    """A bus we can take down (a private redis-server) beside a store that stays up (SQLite)."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = type(redis_server)(workdir, appendonly=True)
    db = f"sqlite:///{tmp_path}/store.db"
    bus = f"{server.url}?prefix=d{uuid.uuid4().hex[:8]}"
    yield Engine("redis-bus", bus, db, f"file://{tmp_path}/files"), server
    server.stop()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # it brings its own engines
async def test_failed_publish_records_nothing_and_a_retry_goes_through(
    start_fleet: StartFleet, models_dir: Path, redis_bus_sqlite_store: tuple[Engine, Any]
) -> None:
    engine, server = redis_bus_sqlite_store
    settings = fleet_settings(engine, models_dir, dedicated_and_dynamic())
    fleet = await start_fleet(settings=settings)
    body = {"id": "retry-me", "model": SD15, "params": PARAMS}
    server.stop()
    r = await fleet.http.post("/v1/tasks", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "bus_unavailable", r.text
    assert (await fleet.http.get("/v1/tasks/retry-me")).status_code == 404, "nothing left behind"
    server.start()
    r = await fleet.http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    assert (await fleet.wait("retry-me"))["state"] == "succeeded"
