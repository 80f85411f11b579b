"""A Redis at its maxmemory (``noeviction``, the policy a queue needs): a burst that fills it is
refused with a 503 and its reason, never a 500; the agents drain what was taken, which frees
room, and submits are taken again. On a redis-server of its own, 6 MB."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from conftest import Engine, StartFleet
from sdfleet.settings import QueueConfig

pytestmark = pytest.mark.timeout(120)

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PROMPT = "a lighthouse at dusk, " * 2000  # 44 kB: about 90 kB of Redis a task (message and record)


@pytest.fixture
def full_redis(redis_server: Any, tmp_path: Path) -> Iterator[Any]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = type(redis_server)(
        workdir, appendonly=False, args=("--maxmemory", "6mb", "--maxmemory-policy", "noeviction")
    )
    yield server
    server.stop()


@pytest.fixture
def engine(full_redis: Any, tmp_path: Path) -> Engine:
    """Overrides the e2e ``engine``: the small Redis."""
    url = f"{full_redis.url}?prefix=full"
    return Engine("redis", url, url, f"file://{tmp_path}/files")


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """No model files: the synthetic runtime accepts any model name."""
    path = tmp_path / "models"
    path.mkdir()
    return path


async def _used_mb(server: Any) -> float:
    client = aioredis.Redis(port=server.port)
    try:
        return float((await client.info("memory"))["used_memory"]) / 2**20
    finally:
        await client.aclose()


async def test_a_full_redis_refuses_submits_with_503_and_drains(
    start_fleet: StartFleet, full_redis: Any
) -> None:
    api = await start_fleet(QUEUE, agents=[], runtimes={"synthetic": {"latency_s": 0.01}})
    taken: list[str] = []
    for _ in range(200):
        r = await api.http.post("/v1/tasks", json={"params": {"prompt": PROMPT, "width": 64, "height": 64}})
        if r.status_code != 202:
            break
        taken.append(r.json()["id"])
    assert r.status_code == 503, f"{r.status_code} after {len(taken)} tasks: {r.text}"
    assert r.json()["error"] in (
        {"code": "bus_full", "message": "the task bus is full; retry later"},
        {"code": "store_full", "message": "the task store is full; retry later"},
    ), r.text
    assert 20 <= len(taken) < 200, len(taken)
    assert await _used_mb(full_redis) < 6.5, "Redis went on past its maxmemory"
    # Reads still answer while it is full.
    assert (await api.http.get(f"/v1/tasks/{taken[0]}")).json()["state"] == "queued"
    assert (await api.http.get("/v1/queues")).status_code == 200

    # An agent comes: every task taken runs and is recorded, though Redis is full when it starts.
    await start_fleet(QUEUE, with_api=False, runtimes={"synthetic": {"latency_s": 0.01}})
    for task_id in taken:
        assert (await api.wait(task_id, timeout_s=60))["state"] == "succeeded", task_id

    # Their messages are gone, their records stay: room again.
    deadline = time.monotonic() + 10
    while (r := await api.http.post("/v1/tasks", json={"params": {"prompt": "after"}})).status_code != 202:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
    assert (await api.wait(r.json()["id"]))["state"] == "succeeded"
