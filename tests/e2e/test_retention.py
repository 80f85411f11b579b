"""``fleet.retain_days`` through the whole fleet on every engine: a finished task is kept that long
(its view says until when), then its record is gone (404, out of the list, its id free again) and,
on ``file://`` storage, the API deletes its files. A task still queued is never expired."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import Engine, StartFleet, fleet_settings
from sdfleet.settings import QueueConfig

pytestmark = pytest.mark.timeout(120)

RETAIN_S = 3.0
TASK = {"params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}}


async def test_a_finished_task_is_kept_for_retain_days_then_goes(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    settings = fleet_settings(engine, models_dir, [QueueConfig(name="q")])
    settings.fleet.retain_days = RETAIN_S / 86400
    fleet = await start_fleet(settings.fleet.queues, settings=settings)
    r = await fleet.http.post("/v1/tasks", json=TASK)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    assert r.json()["expires_at"] is None, "a queued task is not expired"
    view = await fleet.wait(task_id, timeout_s=60)
    assert view["state"] == "succeeded", view
    assert view["expires_at"] == pytest.approx(view["finished_at"] + RETAIN_S), view
    (image,) = view["images"]
    got = await fleet.http.get(image["url"])
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG"), got.status_code
    local = engine.storage_url.startswith("file://")
    path = Path(urlsplit(engine.storage_url).path, image["key"])
    assert path.is_file() == local

    # DynamoDB's TTL attribute is in whole seconds: its record goes up to 1 s later.
    await asyncio.sleep(view["expires_at"] - time.time() + 1.2)
    r = await fleet.http.get(f"/v1/tasks/{task_id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    listed = (await fleet.http.get("/v1/tasks")).json()
    assert task_id not in {t["id"] for t in listed["tasks"]}, listed

    if local:  # the API's sweep: at most retain_s (its margin) and a sweep period later
        deadline = time.time() + RETAIN_S + 5
        while path.exists() and time.time() < deadline:
            await asyncio.sleep(0.2)
        assert not path.exists(), "the expired task's image is deleted"
        assert not path.parent.exists() or not any(path.parent.iterdir())

    cancel = await fleet.http.post(f"/v1/tasks/{task_id}/cancel")
    assert cancel.status_code == 404, cancel.text
