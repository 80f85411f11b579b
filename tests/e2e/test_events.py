"""``GET /v1/tasks/{id}/events``: a task followed from queued to succeeded over SSE, resumed with
``Last-Event-ID``, and hidden from other tenants."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from conftest import Engine, StartFleet, fleet_settings
from sdfleet.api.routes.events import stream
from sdfleet.settings import QueueConfig, TenantConfig
from sdfleet.store import open_store
from sdfleet.tasks import Task, TaskRecord

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(90), pytest.mark.flow]

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
# 4 progress steps over 1.6 s: the agent saves progress at most once a second, so the stream sees
# at least one progress change between the start and the end.
RUNTIMES = {"synthetic": {"latency_s": 1.6, "progress_steps": 4}}
PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}
KEYS = {"key-a": "a", "key-b": "b"}


async def _events(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], first: asyncio.Event | None = None
) -> list[dict[str, Any]]:
    """Every event of one SSE stream, until the server ends it."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with http.stream("GET", path, headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith((":", "retry:")):
                continue
            if line:
                name, _, value = line.partition(": ")
                current[name] = value
                continue
            if current:
                out.append(
                    {"id": int(current["id"]), "event": current["event"], **json.loads(current["data"])}
                )
                current = {}
                if first is not None:
                    first.set()
    return out


async def test_stream_follows_a_task_and_resumes(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=RUNTIMES)
    settings.fleet.tenants = {
        hashlib.sha256(k.encode()).hexdigest(): TenantConfig(name=t) for k, t in KEYS.items()
    }
    api = await start_fleet(QUEUE, agents=[], settings=settings)  # no agent yet: the task waits queued
    a = {"Authorization": "Bearer key-a"}
    r = await api.http.post("/v1/tasks", json={"params": PARAMS, "context": "ctx"}, headers=a)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    path = f"/v1/tasks/{task_id}/events"

    other = await api.http.get(path, headers={"Authorization": "Bearer key-b"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"

    first = asyncio.Event()
    follow = asyncio.create_task(_events(api.http, path, a, first))
    await asyncio.wait_for(first.wait(), 10)
    await start_fleet(QUEUE, agents=["q"], with_api=False, settings=settings)
    events = await asyncio.wait_for(follow, 30)

    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "succeeded", kinds
    assert "progress" in kinds and set(kinds) == {"queued", "started", "progress", "succeeded"}, kinds
    assert all(e["type"] == e["event"] and e["task_id"] == task_id for e in events)
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), "ids are record versions: strictly increasing"
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and 0 < progress[0] <= 1
    last = events[-1]
    assert last["state"] == "succeeded" and last["context"] == "ctx" and last["progress"] == 1.0
    assert len(last["image_urls"]) == 1
    image = await api.http.get(last["image_urls"][0])
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

    resumed = await _events(api.http, path, {**a, "Last-Event-ID": str(ids[0])})
    assert [(e["event"], e["id"]) for e in resumed] == [("succeeded", ids[-1])]
    assert await _events(api.http, path, {**a, "Last-Event-ID": str(ids[-1])}) == []
    bad = await api.http.get(path, headers={**a, "Last-Event-ID": "nope"})
    assert bad.status_code == 422


async def test_keepalive_comment_while_nothing_changes(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    try:
        record, _ = await store.create(TaskRecord(task=Task(params=PARAMS)))
        ctx: Any = type("Ctx", (), {"store": store})()
        frames = stream(ctx, cast(Any, None), record, None, poll_s=0.02, keepalive_s=0.1)
        got = [await anext(frames) for _ in range(3)]
        await frames.aclose()
    finally:
        await store.aclose()
    assert got[0] == "retry: 1000\n\n"
    assert got[1].startswith(f"id: {record.version}\nevent: queued\ndata: {{")
    assert got[2] == ": keep-alive\n\n"


async def test_progress_is_written_as_often_as_the_agent_is_told(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """``agent.progress_every_s`` spaces the progress writes: every 0.1 s a run of 1.6 s in 16 steps
    moves the stream's bar many times, where the default second moves it once."""
    runtimes = {"synthetic": {"latency_s": 1.6, "progress_steps": 16}}
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, progress_every_s=0.1)
    api = await start_fleet(QUEUE, agents=["q"], settings=settings)
    r = await api.http.post("/v1/tasks", json={"params": PARAMS})
    assert r.status_code == 202, r.text
    events = await asyncio.wait_for(_events(api.http, f"/v1/tasks/{r.json()['id']}/events", {}), 30)
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert len(progress) >= 3 and progress == sorted(progress), events  # the stream reads every 0.25 s
    assert events[-1]["state"] == "succeeded"
