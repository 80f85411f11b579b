"""``DELETE /v1/tasks/{id}`` and ``sdfleet delete`` / ``sdfleet cancel`` / ``sdfleet tasks`` through
the whole fleet on every engine: a finished task's images, ``.out`` and gallery thumbnails go from
storage, then its record (404, out of the list); a task still queued or running is refused with
the reason, and another tenant's task is not even seen."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from conftest import Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.api.thumbs import thumb_key
from sdfleet.cli import app
from sdfleet.settings import QueueConfig, TenantConfig
from sdfleet.storage import open_storage
from sdfleet.store.base import reopen

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(180), pytest.mark.flow]

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
TASK = {"params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}}


def _keys() -> dict[str, TenantConfig]:
    named = ((ALICE, "a"), (BOB, "b"))
    return {hashlib.sha256(k.encode()).hexdigest(): TenantConfig(name=n) for k, n in named}


async def stored(engine: Engine, keys: list[str]) -> list[bool]:
    storage = open_storage(engine.storage_url)
    try:
        return [await storage.exists(k) for k in keys]
    finally:
        await storage.aclose()


async def put(engine: Engine, *keys: str) -> None:
    storage = open_storage(engine.storage_url)
    try:
        for key in keys:
            await storage.put(key, b"\x89PNG", "image/png")
    finally:
        await storage.aclose()


async def cli(fleet: RunningFleet, *args: str, key: str = ALICE) -> Any:
    argv = [*args, "--api", fleet.api_url, "--api-key", key]
    return await asyncio.to_thread(CliRunner().invoke, app, argv, env={"SDFLEET_LOG_JSON": "false"})


async def test_a_finished_task_is_deleted_with_its_files(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    settings = fleet_settings(engine, models_dir, [QueueConfig(name="q")])
    settings.fleet.tenants = _keys()
    fleet = await start_fleet(settings.fleet.queues, settings=settings)
    alice = {"Authorization": f"Bearer {ALICE}"}
    bob = {"Authorization": f"Bearer {BOB}"}
    ids = [(await fleet.http.post("/v1/tasks", json=TASK, headers=alice)).json()["id"] for _ in range(2)]
    views = [await _wait(fleet, i, alice) for i in ids]
    assert all(v["state"] == "succeeded" for v in views), views
    cards = await fleet.http.get(f"/ui/api/cards?ids={','.join(ids)}", headers=alice)  # thumbnails
    assert cards.status_code == 200, cards.text
    view = views[0]
    (image,) = [i["key"] for i in view["images"]]
    files = [image, thumb_key(image), view["output"]["key"]]
    assert await stored(engine, files) == [True, True, True]
    other = [views[1]["images"][0]["key"], views[1]["output"]["key"]]
    # A try that never finished left its image beside them; a task whose prefix ends in this id
    # keeps its own folder inside: the first goes with the task, the second stays.
    folder = image.rpartition("/")[0]
    unfinished, inside = f"{folder}/{view['id']}-dead-1.png", f"{folder}/s9/s9-beef-1.png"
    await put(engine, unfinished, inside)

    refused = await fleet.http.delete(f"/v1/tasks/{view['id']}", headers=bob)
    assert refused.status_code == 404, "another tenant's task is not even seen"
    r = await fleet.http.delete(f"/v1/tasks/{view['id']}", headers=alice)
    assert r.status_code == 204 and r.content == b"", r.text
    assert await stored(engine, files) == [False, False, False]
    assert await stored(engine, [unfinished, inside]) == [False, True]
    assert await stored(engine, other) == [True, True], "the other task's files stay"
    gone = await fleet.http.get(f"/v1/tasks/{view['id']}", headers=alice)
    assert gone.status_code == 404, gone.text
    listed = (await fleet.http.get("/v1/tasks", headers=alice)).json()["tasks"]
    assert [t["id"] for t in listed] == [views[1]["id"]]
    again = await fleet.http.delete(f"/v1/tasks/{view['id']}", headers=alice)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found", again.text
    link = await fleet.http.get(view["images"][0]["url"])
    assert link.status_code in (403, 404), "its old link leads nowhere"

    result = await cli(fleet, "delete", views[1]["id"])
    assert result.exit_code == 0 and f"deleted {views[1]['id']}" in result.stdout, result.output
    assert await stored(engine, other) == [False, False]
    registry = fleet.fleet.server.config.app.state.ctx.metrics.registry  # type: ignore[union-attr]
    assert registry.get_sample_value("sdfleet_tasks_deleted_total", {"queue": "q"}) == 2.0
    if engine.storage_url.startswith("file://"):  # the task's folder went with its files
        root = Path(engine.storage_url.removeprefix("file://"))
        assert not (root / "a" / views[1]["id"]).exists()
        assert [p.name for p in (root / "a" / view["id"]).iterdir()] == ["s9"], "only the inner folder"


@pytest.mark.flow(engines="all")  # a conditional delete
async def test_a_task_in_flight_is_refused_until_cancelled(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """No agent: the task stays queued. DELETE is a 409 naming the way out; ``sdfleet cancel``
    ends it, then ``sdfleet delete`` removes it; ``cancel`` of an ended task says why."""
    settings = fleet_settings(engine, models_dir, [QueueConfig(name="q")])
    settings.fleet.tenants = _keys()
    fleet = await start_fleet(settings.fleet.queues, settings=settings, agents=[])
    alice = {"Authorization": f"Bearer {ALICE}"}
    task_id = (await fleet.http.post("/v1/tasks", json=TASK, headers=alice)).json()["id"]
    r = await fleet.http.delete(f"/v1/tasks/{task_id}", headers=alice)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["message"] == f"task {task_id} is queued: cancel it first, then delete it"
    refused = await cli(fleet, "delete", task_id)
    assert refused.exit_code == 2 and "cancel it first" in refused.stderr, refused.output
    stranger = await cli(fleet, "delete", task_id, key="not-a-key")  # names the flag, not the header
    assert stranger.exit_code == 2, stranger.output
    # (in this process the API logs to the same captured stderr: the line, not the whole of it)
    said = "error: HTTP 401: unknown API key (the CLI sends --api-key, or SDFLEET_API_KEY)"
    assert said in stranger.stderr.splitlines(), stranger.stderr
    assert (await fleet.http.get(f"/v1/tasks/{task_id}", headers=alice)).json()["state"] == "queued"

    cancelled = await cli(fleet, "cancel", task_id)
    assert cancelled.exit_code == 0 and f"{task_id}: cancelled" in cancelled.stdout, cancelled.output
    twice = await cli(fleet, "cancel", task_id)
    assert twice.exit_code == 2 and "cannot be cancelled" in twice.stderr, twice.output
    deleted = await cli(fleet, "delete", task_id)
    assert deleted.exit_code == 0, deleted.output
    assert (await fleet.http.get(f"/v1/tasks/{task_id}", headers=alice)).status_code == 404
    unknown = await cli(fleet, "delete", task_id)
    assert unknown.exit_code == 2 and "not found" in unknown.stderr, unknown.output


async def _wait(fleet: RunningFleet, task_id: str, headers: dict[str, str]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=fleet.api_url, headers=headers, timeout=30) as http:
        for _ in range(600):
            view: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}")).json()
            if view["state"] in ("succeeded", "failed", "cancelled"):
                return view
            await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish: {view}")


async def test_a_run_that_starts_while_deleting_is_not_deleted(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed id sent again reopens its record for run 2 while a delete of run 1 is between its
    files and its record: the record is not deleted (409, read it and try again), run 2 stands."""
    fleet = await start_fleet([QueueConfig(name="q")], agents=[])
    ctx = fleet.fleet.server.config.app.state.ctx  # type: ignore[union-attr]
    first = (await fleet.http.post("/v1/tasks", json=TASK)).json()
    await fleet.http.post(f"/v1/tasks/{first['id']}/cancel")
    cancelled = await ctx.store.get("default", first["id"])
    assert cancelled is not None and cancelled.state == "cancelled"
    delete_files = ctx.storage.delete

    async def reopened_meanwhile(keys: list[str]) -> None:
        await delete_files(keys)
        nxt = cancelled.task.model_copy(update={"run": 2})
        assert await reopen(ctx.store, cancelled, nxt) is not None

    monkeypatch.setattr(ctx.storage, "delete", reopened_meanwhile)
    r = await fleet.http.delete(f"/v1/tasks/{first['id']}")
    assert r.status_code == 409, r.text
    assert (
        r.json()["error"]["message"]
        == f"task {first['id']} changed while being deleted; read it and try again"
    )
    view = (await fleet.http.get(f"/v1/tasks/{first['id']}")).json()
    assert (view["state"], view["run"]) == ("queued", 2), view


async def test_sdfleet_tasks_lists_newest_first_page_by_page(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sdfleet tasks`` for a person and ``--json`` for scripts, following the API's cursor (one
    task a page here) up to ``--limit``, filtered by ``--state``."""
    settings = fleet_settings(engine, models_dir, [QueueConfig(name="q")])
    settings.fleet.tenants = _keys()
    fleet = await start_fleet(settings.fleet.queues, settings=settings, agents=[])
    alice = {"Authorization": f"Bearer {ALICE}"}
    ids = [(await fleet.http.post("/v1/tasks", json=TASK, headers=alice)).json()["id"] for _ in range(3)]
    await fleet.http.post(f"/v1/tasks/{ids[0]}/cancel", headers=alice)
    monkeypatch.setattr("sdfleet.client.PAGE", 1)
    listed = await cli(fleet, "tasks", "--json", "--limit", "5")
    assert listed.exit_code == 0, listed.output
    assert [t["id"] for t in json.loads(listed.stdout)] == ids[::-1], "newest first, every page"
    two = json.loads((await cli(fleet, "tasks", "--json", "--limit", "2")).stdout)
    assert [t["id"] for t in two] == [ids[2], ids[1]]
    cancelled = json.loads((await cli(fleet, "tasks", "--json", "--state", "cancelled")).stdout)
    assert [(t["id"], t["state"]) for t in cancelled] == [(ids[0], "cancelled")]
    text = await cli(fleet, "tasks")
    assert text.exit_code == 0 and all(i in text.stdout for i in ids), text.output
    row = next(line for line in text.stdout.splitlines() if ids[0] in line)
    assert "cancelled" in row and " q " in row, row
    assert (await cli(fleet, "tasks", key=BOB)).stdout.count("queued") == 0, "Bob sees none of them"
    bad = await cli(fleet, "tasks", "--state", "lost")
    assert bad.exit_code == 2 and "state" in bad.stderr, bad.output
