"""Routing over real filter policies: a dedicated queue keeps one checkpoint, an ``anything-but``
dynamic queue takes the rest and its agent switches models; a task no queue takes is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_tools import read_json

from conftest import OTHER, SD15, Engine, StartFleet, dedicated_and_dynamic, fleet_settings
from sdfleet.settings import QueueConfig

pytestmark = pytest.mark.timeout(120)

THIRD = "anything-v4"


@pytest.fixture(scope="module")
def three_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tiny models plus a third name (a link to the second): the dynamic queue needs two
    models that are not the dedicated queue's."""
    root = tmp_path_factory.mktemp("three-models")
    for entry in models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    (root / THIRD).symlink_to(models_dir / Path(OTHER).stem)
    return root


def _t2i(model: str, **extra: object) -> dict[str, object]:
    params = {"prompt": f"a lighthouse by {model}", "steps": 2, "width": 64, "height": 64, "seed": 1}
    return {"model": model, "params": params, **extra}


async def test_dedicated_and_dynamic_queues(
    start_fleet: StartFleet, engine: Engine, three_models: Path
) -> None:
    settings = fleet_settings(engine, three_models, dedicated_and_dynamic())
    settings.fleet.models.cache_size = 1  # every switch on the dynamic agent is a real reload
    fleet = await start_fleet(settings=settings)
    asked = [(SD15, "sd15"), (OTHER, "dynamic"), (THIRD, "dynamic"), (OTHER, "dynamic"), (THIRD, "dynamic")]
    for model, queue in asked:
        r = await fleet.http.post("/v1/tasks", json=_t2i(model))
        assert r.status_code == 202, r.text
        assert r.json()["queue"] == queue
        view = await fleet.wait(r.json()["id"], timeout_s=60)
        assert view["state"] == "succeeded", view
        assert view["queue"] == queue
        info = await read_json(engine, view["output"]["key"])
        assert info["sd_model_checkpoint"] == Path(model).stem, (model, info)
        if queue == "dynamic":  # each of these is a switch (cache of one): timed as its own stage
            assert view["timings"]["model_switch"] > 0, view["timings"]
    dynamic = next(a for a in fleet.fleet.agents if a.parts.queue.name == "dynamic")
    assert dynamic.parts.runtime.loaded_model == THIRD


async def test_no_queue_accepts(start_fleet: StartFleet) -> None:
    only_sd15 = [QueueConfig(name="sd15", filter={"sd_model_checkpoint": [SD15]}, model=SD15)]
    fleet = await start_fleet(only_sd15, agents=[])
    r = await fleet.http.post("/v1/tasks", json=_t2i(OTHER))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "no_route"
    assert "no queue accepts" in error["message"] and OTHER in error["message"]
    alpha1 = {
        "alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": OTHER, "id_task": "gap-1"},
        "prompt": "a dog",
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    r = await fleet.http.post("/v1alpha1/", json=alpha1)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "no_route"
    assert (await fleet.http.get("/v1/tasks/gap-1")).status_code == 404  # nothing left half-made


async def test_named_queue_must_accept_the_task(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(agents=[])
    r = await fleet.http.post("/v1/tasks", json=_t2i(SD15, queue="dynamic"))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_queue"
    assert "'dynamic'" in error["message"] and "does not accept" in error["message"]
    r = await fleet.http.post("/v1/tasks", json=_t2i(OTHER, queue="dynamic"))
    assert r.status_code == 202, r.text
    assert r.json()["queue"] == "dynamic"


async def test_priority_lanes(start_fleet: StartFleet) -> None:
    """A lane for urgent work by its ``priority`` (a number attribute on every engine: on AWS an
    SNS ``Number``, which SNS's ``numeric`` needs): only the lane's agent runs here, so a task is
    done only if the engine delivered it to the lane, and the rest wait on the other queue."""
    lanes = [
        QueueConfig(name="urgent", filter={"priority": [{"numeric": [">=", 5]}]}),
        QueueConfig(name="default"),  # the rest: absent or below 5
    ]
    fleet = await start_fleet(lanes, agents=["urgent"])
    urgent = await fleet.http.post("/v1/tasks", json=_t2i(SD15, priority=7))
    assert urgent.status_code == 202, urgent.text
    assert (urgent.json()["queue"], urgent.json()["priority"]) == ("urgent", 7)
    for body in (_t2i(SD15, priority=4), _t2i(SD15)):
        r = await fleet.http.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
        assert (r.json()["queue"], r.json()["priority"]) == ("default", body.get("priority", 0))
    view = await fleet.wait(urgent.json()["id"], timeout_s=60)
    assert view["state"] == "succeeded", view
    depths = {q["name"]: q for q in (await fleet.http.get("/v1/queues")).json()}
    assert depths["default"]["visible"] == 2 and depths["urgent"]["visible"] == 0, depths
    for bad in (10, -1, "high", 2.5):
        r = await fleet.http.post("/v1/tasks", json=_t2i(SD15, priority=bad))
        assert r.status_code == 422, (bad, r.text)
        assert "priority" in r.text, r.text
