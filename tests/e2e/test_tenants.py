"""Tenants apart on every route, and a client id that cannot flood the bus (issue 12, defects 4, 5,
7, 8): ids per tenant, one publish per race and per lease period, seed prefixes of one's own, no
server paths in answers, no reads without a key, file links bound to their tenant."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from conftest import SD15, Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.settings import QueueConfig, TenantConfig

pytestmark = pytest.mark.timeout(180)

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PARAMS = {"prompt": "a harbour", "steps": 2, "width": 64, "height": 64}
ALICE = {"authorization": "Bearer alice-key"}
BOB = {"x-api-key": "bob-key"}
METRICS_KEY = "metrics-secret"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def start(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, *, agents: bool, **kw: Any
) -> RunningFleet:
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes={"synthetic": {"latency_s": 0.05}}, **kw)
    settings.fleet.tenants = {
        _hash("alice-key"): TenantConfig(name="alice"),
        _hash("bob-key"): TenantConfig(name="bob"),
    }
    settings.api.metrics_key = SecretStr(METRICS_KEY)
    return await start_fleet(QUEUE, settings=settings, agents=None if agents else [])


async def visible(engine: Engine, queue: str = "q") -> int:
    bus = open_bus(engine.bus_url)
    try:
        return (await bus.stats(queue)).visible
    finally:
        await bus.aclose()


async def test_same_id_in_two_tenants_is_two_tasks_and_a_race_publishes_once(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, agents=False)
    body = {"id": "order-1", "params": PARAMS, "context": "alice's"}
    first = await fleet.http.post("/v1/tasks", json=body, headers=ALICE)
    assert first.status_code == 202, first.text
    # Bob's order-1 is a task of his own: no 409, nothing of Alice's shown or touched.
    bobs = await fleet.http.post("/v1/tasks", json={**body, "context": "bob's"}, headers=BOB)
    assert bobs.status_code == 202 and bobs.json()["tenant"] == "bob" and bobs.json()["context"] == "bob's"
    mine = (await fleet.http.get("/v1/tasks/order-1", headers=ALICE)).json()
    assert mine["tenant"] == "alice" and mine["context"] == "alice's"
    # Twenty concurrent submits of a new id: one accepted, nineteen answered with it, one message.
    racing = {"id": "order-2", "params": PARAMS}

    async def submit() -> httpx.Response:
        # A loser waits 2 s for the winner's record, then answers 409 id_busy, which the README
        # tells clients to retry: on a loaded machine the winner can take longer than that.
        for _ in range(10):
            r = await fleet.http.post("/v1/tasks", json=racing, headers=BOB)
            if r.status_code != 409 or r.json()["error"]["code"] != "id_busy":
                return r
        return r

    answers = await asyncio.gather(*(submit() for _ in range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 19 + [202], (codes, [r.text[:200] for r in answers if r.status_code != 200])
    assert len({r.json()["created_at"] for r in answers}) == 1
    assert await visible(engine) == 3, "order-1 twice (two tenants) and order-2 once"


async def test_a_retried_id_is_published_again_at_most_once_per_lease(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    lease_s = 3.0
    fleet = await start(start_fleet, engine, models_dir, agents=False, lease_s=lease_s)
    body = {"id": "again", "params": PARAMS}
    n = 500 if engine.name == "sqlite" else 100
    t0 = time.monotonic()
    codes = [(await fleet.http.post("/v1/tasks", json=body, headers=ALICE)).status_code for _ in range(n)]
    elapsed = time.monotonic() - t0
    assert codes == [202] + [200] * (n - 1)
    published = await visible(engine)
    # A publish, then at most one more per lease period that passed while the client kept retrying.
    assert 1 <= published <= 1 + int(elapsed // lease_s), (published, elapsed)
    await asyncio.sleep(lease_s + 0.2)
    again = await asyncio.gather(*(fleet.http.post("/v1/tasks", json=body, headers=ALICE) for _ in range(10)))
    assert all(r.status_code == 200 for r in again)
    assert await visible(engine) == published + 1, (
        "once the lease has passed, ten concurrent retries publish once"
    )


def _file_path(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, dict(parse_qsl(parts.query))


@pytest.mark.parametrize("engine", ["sqlite", "redis"], indirect=True)  # the file links of local storage
async def test_seed_prefixes_are_the_tenants_own_and_answers_show_no_server_path(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, tmp_path: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, agents=True)
    v1alpha1 = {
        "alwayson_scripts": {
            "task": "text-to-image",
            "sd_model_checkpoint": SD15,
            "id_task": "s1",
            "save_dir": "bob",
        },
        **PARAMS,
    }
    r = await fleet.http.post("/v1alpha1/", json=v1alpha1, headers=ALICE)
    assert r.status_code == 200, r.text
    location = r.json()["output_location"]
    assert location == f"{fleet.api_url}/v1/files/alice/bob/s1", location
    meta = {"id": "s2", "runtime": "sdruntime", "tasktype": "text-to-image", "prefix": "/bob/out/"}
    r = await fleet.http.post(
        "/v1alpha2/", json={"task": {"metadata": meta, "content": PARAMS}}, headers=ALICE
    )
    assert r.status_code == 200 and r.json()["output_location"].endswith("/v1/files/alice/bob/out/s2"), r.text
    for answer in (r.text, location):
        assert "file:" not in answer and str(tmp_path) not in answer
    for task_id in ("s1", "s2"):
        view = await _wait(fleet, task_id, ALICE)
        assert view["state"] == "succeeded", view
        assert all(img["key"].startswith("alice/bob/") for img in view["images"]), view["images"]
    # Bob's own v1 task writes under bob/: nothing of Alice's could have landed there.
    r = await fleet.http.post("/v1/tasks", json={"id": "s1", "params": PARAMS}, headers=BOB)
    assert (await _wait(fleet, "s1", BOB))["images"][0]["key"].startswith("bob/s1/")

    link = (await _wait(fleet, "s1", ALICE))["images"][0]["url"]
    path, query = _file_path(link)
    async with httpx.AsyncClient(base_url=fleet.api_url) as anyone:
        assert (await anyone.get(link)).status_code == 200, "a link is a capability until it expires"
        assert (await anyone.get(link, headers=ALICE)).status_code == 200
        assert (await anyone.get(link, headers=BOB)).status_code == 404, "not with another tenant's key"
        forged = {**query, "tenant": "bob"}
        assert (await anyone.get(f"{path}?{urlencode(forged)}")).status_code == 404
        bobs_key = (await _wait(fleet, "s1", BOB))["images"][0]["key"]
        elsewhere = f"/v1/files/{bobs_key}?{urlencode(query)}"
        assert (await anyone.get(elsewhere)).status_code == 404, "a signature is for its own key"


async def _wait(fleet: RunningFleet, task_id: str, headers: dict[str, str]) -> dict[str, Any]:
    for _ in range(300):
        view: dict[str, Any] = (await fleet.http.get(f"/v1/tasks/{task_id}", headers=headers)).json()
        if view.get("state") in ("succeeded", "failed", "cancelled"):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"{task_id} never finished: {view}")


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_reads_need_a_key_once_keys_are_in_use(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, agents=False)
    http = fleet.http
    for path in ("/v1/queues", "/v1/models", "/v1/tasks"):
        assert (await http.get(path)).status_code == 401, path
        assert (await http.get(path, headers={"authorization": "Bearer guess"})).status_code == 401, path
        assert (await http.get(path, headers=BOB)).status_code == 200, path
    assert (await http.get("/metrics")).status_code == 401
    assert (await http.get("/metrics", headers=ALICE)).status_code == 401, "a tenant's key is not enough"
    scraped = await http.get("/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"})
    assert scraped.status_code == 200 and "sdfleet_" in scraped.text
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await http.get(path)).status_code == 200, path
    ready = (await http.get("/readyz")).json()
    assert ready == {"status": "ready"}


async def test_a_tenant_asks_for_its_max_priority_at_most(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Priority lanes are for those meant to use them: above its tenant's ``max_priority`` a task
    is refused (403, nothing recorded or published); at it, or with no limit set, it is taken."""
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes={"synthetic": {"latency_s": 0.05}})
    settings.fleet.tenants = {
        _hash("alice-key"): TenantConfig(name="alice", max_priority=2),
        _hash("bob-key"): TenantConfig(name="bob"),
    }
    fleet = await start_fleet(QUEUE, settings=settings, agents=[])
    r = await fleet.http.post(
        "/v1/tasks", json={"id": "hurry", "params": PARAMS, "priority": 3}, headers=ALICE
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"] == {
        "code": "priority_not_allowed",
        "message": "tenant 'alice' may submit priority 2 at most, not 3",
    }
    assert (await fleet.http.get("/v1/tasks/hurry", headers=ALICE)).status_code == 404
    assert await visible(engine) == 0
    ok = await fleet.http.post("/v1/tasks", json={"params": PARAMS, "priority": 2}, headers=ALICE)
    assert ok.status_code == 202 and ok.json()["priority"] == 2, ok.text
    top = await fleet.http.post("/v1/tasks", json={"params": PARAMS, "priority": 9}, headers=BOB)
    assert top.status_code == 202 and top.json()["priority"] == 9, top.text
    assert await visible(engine) == 2
