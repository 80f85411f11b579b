"""One poisoned request, message or record fails alone: never an agent, never the API.

A ``context`` nested 199 levels deep was once accepted, stored as a record that pydantic could not
read back (its JSON recursion limit is 200), and the agent that received it died, taking ``sdfleet
up``'s API with it, again on every redelivery. Client JSON is now bounded at the door
(``jsonsafe.MAX_DEPTH``), foreign messages on the way in, and whatever still goes wrong with one
delivery or record stays with it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import dead_letters

from conftest import SD15, Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.jsonsafe import MAX_DEPTH
from sdfleet.settings import QueueConfig
from sdfleet.store.base import TaskStore
from sdfleet.tasks import Task, TaskParams, TaskRecord

pytestmark = pytest.mark.timeout(120)

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PARAMS = {"prompt": "x", "steps": 2, "width": 64, "height": 64}


def nested(levels: int) -> str:
    """The issue's reproduction: ``{"a": {"a": … 1 …}}``, ``levels`` objects deep."""
    return '{"a":' * levels + "1" + "}" * levels


def v1(context: str) -> str:
    return '{"params":' + json.dumps(PARAMS) + ',"context":' + context + "}"


def v1alpha1(extra: str) -> str:
    scripts = {"task": "text-to-image", "sd_model_checkpoint": SD15, "id_task": "p1"}
    return '{"alwayson_scripts":' + json.dumps(scripts)[:-1] + ',"x":' + extra + "}," + json.dumps(PARAMS)[1:]


def v1alpha2(context: str) -> str:
    meta = '{"id":"p2","runtime":"sdruntime","tasktype":"text-to-image","prefix":"out","context":'
    content = json.dumps({"alwayson_scripts": {}, **PARAMS})
    return '{"task":{"metadata":' + meta + context + '},"content":' + content + "}}"


async def post(fleet: RunningFleet, path: str, body: str) -> Any:
    return await fleet.http.post(path, content=body, headers={"content-type": "application/json"})


async def start(start_fleet: StartFleet, engine: Engine, models_dir: Path, **kwargs: Any) -> RunningFleet:
    runtimes = {"synthetic": {"latency_s": 0.05}}
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=2, **kwargs)
    return await start_fleet(QUEUE, settings=settings)


async def still_serving(fleet: RunningFleet) -> dict[str, Any]:
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    assert r.status_code == 202, r.text
    view = await fleet.wait(r.json()["id"], timeout_s=30)
    assert view["state"] == "succeeded", view
    assert not fleet.task.done(), "the fleet (API and agents) must still be running"
    return view


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/tasks", v1), ("/v1alpha1/", v1alpha1), ("/v1alpha2/", v1alpha2)],
    ids=["v1", "v1alpha1", "v1alpha2"],
)
async def test_deep_json_is_refused_at_the_door_on_every_route(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, path: str, body: Any
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    for deep in (nested(199), nested(300), "[" * 100_000 + "]" * 100_000):
        r = await post(fleet, path, body(deep))
        assert r.status_code == 422, (r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["code"] == "json_too_deep" and f"at most {MAX_DEPTH}" in error["message"], error
    page = await fleet.http.get("/v1/tasks")
    assert page.status_code == 200 and page.json()["tasks"] == [], page.text[:300]
    await still_serving(fleet)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/tasks", v1), ("/v1alpha1/", v1alpha1), ("/v1alpha2/", v1alpha2)],
    ids=["v1", "v1alpha1", "v1alpha2"],
)
async def test_values_a_record_cannot_hold_are_400_on_every_route(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, path: str, body: Any
) -> None:
    """Each was a 500 (a 4,301-digit integer, a lone surrogate in a field the seed's formats pass
    through) or a record silently changed (1e400 stored as null)."""
    fleet = await start(start_fleet, engine, models_dir)
    for value, words in [
        ("1e400", "out of range"),
        ("7" * 5000, "integer out of range"),
        ('"\\ud800"', "lone UTF-16 surrogate"),
        ('{"\\udfff": 1}', "lone UTF-16 surrogate"),
    ]:
        r = await post(fleet, path, body(value))
        assert r.status_code == 400, (value[:20], r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["code"] == "malformed_json" and words in error["message"], error
    r = await fleet.http.post(path, content=v1(json.dumps("x")).encode("utf-16"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json", r.text[:300]
    page = await fleet.http.get("/v1/tasks")
    assert page.status_code == 200 and page.json()["tasks"] == [], page.text[:300]
    await still_serving(fleet)


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 5000 + "]" * 5000,
        "[" + "9" * 400 + ', "x"]',
        '[[[1]], "x"]',
        '[1, "\\ud800"]',
        '[1e400, "x"]',
        "[" + "9" * 5000 + ', "x"]',
    ],
    ids=["deep", "huge", "nested", "surrogate", "infinite", "over-int-limit"],
)
async def test_crafted_cursor_is_a_422(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, raw: str
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    r = await fleet.http.get("/v1/tasks", params={"cursor": cursor})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text[:300]


async def test_deepest_allowed_context_round_trips(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    deepest = nested(MAX_DEPTH - 1)  # the body object itself is the first level
    r = await post(fleet, "/v1/tasks", v1(deepest))
    assert r.status_code == 202, r.text[:300]
    view = await fleet.wait(r.json()["id"], timeout_s=30)
    assert view["state"] == "succeeded" and view["context"] == json.loads(deepest), view["state"]
    page = await fleet.http.get("/v1/tasks")
    assert page.status_code == 200 and [t["id"] for t in page.json()["tasks"]] == [view["id"]]
    r = await post(fleet, "/v1/tasks", v1(nested(MAX_DEPTH)))
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_too_deep"


async def test_poison_message_from_another_producer_is_dead_lettered(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """A producer other than the API (the seed's Lambda, a script) publishes straight to the topic."""
    fleet = await start(start_fleet, engine, models_dir, max_receives=2)
    message = Task(params=TaskParams(**PARAMS), context="HOLE").to_message()
    poison = message.replace(b'"HOLE"', nested(199).encode())
    bus = open_bus(engine.bus_url)
    try:
        await bus.publish(fleet.settings.fleet.tasks_topic, poison, {})
    finally:
        await bus.aclose()
    await still_serving(fleet)
    assert await dead_letters(engine) == [poison]
    await still_serving(fleet)


class Exploding:
    """A task store whose reads of one task fail with an error no backend is meant to raise."""

    def __init__(self, inner: TaskStore, task_id: str) -> None:
        self.inner, self.task_id = inner, task_id

    async def get(self, tenant: str, task_id: str) -> TaskRecord | None:
        if task_id == self.task_id:
            raise RuntimeError("an unforeseen bug")
        return await self.inner.get(tenant, task_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_unexpected_error_on_one_delivery_leaves_the_agent_serving(
    start_fleet: StartFleet, sqlite_engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, sqlite_engine, models_dir, max_receives=2)
    parts = fleet.fleet.agents[0].parts
    parts.store = Exploding(parts.store, "cursed")  # type: ignore[assignment]
    r = await fleet.http.post("/v1/tasks", json={"id": "cursed", "params": PARAMS})
    assert r.status_code == 202, r.text
    await still_serving(fleet)
    assert [json.loads(b)["id"] for b in await dead_letters(sqlite_engine)] == ["cursed"]
    await still_serving(fleet)


async def test_unreadable_record_fails_its_own_request_only(
    start_fleet: StartFleet, sqlite_engine: Engine, models_dir: Path
) -> None:
    import sqlite3

    fleet = await start(start_fleet, sqlite_engine, models_dir)
    view = await still_serving(fleet)
    db = sqlite_engine.store_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:  # a record no version of sdfleet can read
        conn.execute("UPDATE task_records SET body = '{\"nonsense\": 1}' WHERE id = ?", (view["id"],))
    conn.close()
    r = await fleet.http.get(f"/v1/tasks/{view['id']}")
    assert r.status_code == 500 and r.json()["error"]["code"] == "bad_record", r.text
    page = await fleet.http.get("/v1/tasks")
    assert page.status_code == 500 and page.json()["error"]["code"] == "bad_record", page.text
    await still_serving(fleet)


class ExplodingFetcher:
    """An input fetcher that fails on one URL with an error no fetcher is meant to raise."""

    def __init__(self, inner: Any, url: str) -> None:
        self.inner, self.url = inner, url

    async def fetch(self, url: str) -> Any:
        if url == self.url:
            raise RuntimeError("an unforeseen bug")
        return await self.inner.fetch(url)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_task_that_cannot_be_prepared_fails_on_its_last_receive(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Not a record left ``queued`` behind a dead letter: the task says why it will not run."""
    fleet = await start(start_fleet, engine, models_dir, max_receives=2)
    parts = fleet.fleet.agents[0].parts
    url = "https://img.example/cursed.png"
    parts.fetcher = ExplodingFetcher(parts.fetcher, url)  # type: ignore[assignment]
    body = {"id": "cursed", "type": "image-to-image", "params": {**PARAMS, "init_images": [url]}}
    r = await fleet.http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    view = await fleet.wait("cursed", timeout_s=30)
    assert view["state"] == "failed", view
    assert view["error"]["code"] == "prepare_failed", view["error"]
    assert "(RuntimeError; see its log)" in view["error"]["message"], view["error"]
    assert "unforeseen" not in view["error"]["message"], "an error's text is for the log"
    assert "after 2 attempts" in view["error"]["message"], view["error"]
    assert [json.loads(b)["id"] for b in await dead_letters(engine)] == ["cursed"]
    await still_serving(fleet)
