"""What a finished task leaves and says, on every engine: outputs stored under their real type with
the seed's `<id>-<tag>-<n>` names; the seed's opt-in "running" notification; notifications in
the seed's, sdfleet's or SageMaker async inference's shape, per queue or per task."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_tools import drain
from PIL import Image

from conftest import Engine, StartFleet, fleet_settings
from fakes.runtimes import media_samples
from sdfleet.media import infotext, sniff
from sdfleet.settings import QueueConfig
from sdfleet.storage import open_storage
from seed_payloads import V1ALPHA2_T2I, copy_of

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(120), pytest.mark.flow]

PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3}
NO_BUCKET = "s3://no-such-bucket/k.png"  # no input bucket is allowed: fails in the agent, not at the door
SAGEMAKER_KEYS = {
    "awsRegion",
    "eventTime",
    "receivedTime",
    "invocationStatus",
    "requestParameters",
    "inferenceId",
    "eventVersion",
    "eventSource",
    "eventName",
}


async def read(engine: Engine, key: str) -> bytes:
    storage = open_storage(engine.storage_url)
    try:
        return await storage.get(key)
    finally:
        await storage.aclose()


def notes_of(notes: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [n for n in notes if task_id in (n.get("task_id"), n.get("id"), n.get("inferenceId"))]


@pytest.mark.flow(engines="all")  # content types are the storage's
async def test_outputs_keep_their_type_and_the_seeds_names(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    queues = [QueueConfig(name="q", runtime="fakes.runtimes:MixedMedia")]
    fleet = await start_fleet(queues, settings=fleet_settings(engine, models_dir, queues))
    r = await fleet.http.post("/v1/tasks", json={"id": "clip", "params": PARAMS})
    assert r.status_code == 202, r.text
    view = await fleet.wait("clip")
    keys = [i["key"] for i in view["images"]]
    tag = re.fullmatch(r"default/clip/clip-([0-9a-f]{4})-1\.png", keys[0])
    assert tag is not None, keys
    base = f"default/clip/clip-{tag.group(1)}"
    assert keys == [f"{base}-1.png", f"{base}-2.gif", f"{base}-3.webp", f"{base}-4.mp4"]
    assert view["output"]["key"] == f"{base}.out"
    assert [await read(engine, k) for k in keys] == media_samples()


async def test_seed_running_callback_then_completed(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    queues = [QueueConfig(name="sdruntime", filter={"runtime": ["sdruntime"]}, runtime="synthetic")]
    settings = fleet_settings(engine, models_dir, queues, runtimes={"synthetic": {"latency_s": 0.2}})
    settings.agent.notify_running = True
    fleet = await start_fleet(queues, settings=settings)
    body = copy_of(V1ALPHA2_T2I)
    body["task"]["content"].update(width=64, height=64, steps=2)
    body["task"]["metadata"]["context"] = {"order": 7}
    assert (await fleet.http.post("/v1alpha2/", json=body)).status_code == 200
    v1 = await fleet.http.post("/v1/tasks", json={"id": "v1-task", "runtime": "sdruntime", "params": PARAMS})
    assert v1.status_code == 202, v1.text
    await fleet.wait("test-t2i")
    await fleet.wait("v1-task")
    notes = await drain(engine, "results")
    seed = notes_of(notes, "test-t2i")
    assert seed[0] == {"runtime": "sdruntime", "id": "test-t2i", "status": "running", "context": {"order": 7}}
    assert [n["status"] for n in seed] == ["running", "completed"], seed
    assert [n["type"] for n in notes_of(notes, "v1-task")] == ["started", "succeeded"]


async def test_sagemaker_notifications_per_queue_and_per_task(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    queues = [
        QueueConfig(name="sm", filter={"task_id": [{"prefix": "sm-"}]}, notify_format="sagemaker"),
        QueueConfig(name="plain"),
    ]
    for q in queues:
        q.runtime = "synthetic"
    settings = fleet_settings(engine, models_dir, queues, runtimes={"synthetic": {"latency_s": 0.05}})
    fleet = await start_fleet(queues, settings=settings)
    bodies = [
        {"id": "sm-ok", "params": PARAMS},
        {"id": "sm-bad", "type": "image-to-image", "params": {**PARAMS, "init_images": [NO_BUCKET]}},
        {"id": "chosen", "params": PARAMS, "notify_format": "sagemaker"},
        {"id": "default", "params": PARAMS},
    ]
    for body in bodies:
        r = await fleet.http.post("/v1/tasks", json=body)
        assert r.status_code == 202, r.text
    views = {b["id"]: await fleet.wait(b["id"]) for b in bodies}
    notes = await drain(engine, "results")
    (ok,) = notes_of(notes, "sm-ok")
    assert SAGEMAKER_KEYS <= set(ok) and ok["invocationStatus"] == "Completed", ok
    assert ok["eventSource"] == "aws:sagemaker" and ok["eventName"] == "InferenceResult"
    assert ok["requestParameters"]["endpointName"] == "sm"
    assert ok["responseParameters"]["outputLocation"].endswith(views["sm-ok"]["output"]["key"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["eventTime"])
    (bad,) = notes_of(notes, "sm-bad")
    assert bad["invocationStatus"] == "Failed" and "responseParameters" not in bad
    assert bad["failureReason"].startswith("ClientError: ") and views["sm-bad"]["state"] == "failed"
    (chosen,) = notes_of(notes, "chosen")
    assert (
        chosen["invocationStatus"] == "Completed" and chosen["requestParameters"]["endpointName"] == "plain"
    )
    (default,) = notes_of(notes, "default")
    assert default["type"] == "succeeded" and "invocationStatus" not in default


async def test_images_are_stored_in_the_format_the_task_asks_for(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """``output_format``: the agent re-encodes the runtime's PNGs (the tiny diffusers model here)
    before storing them: their names, bytes and served type are JPEG or WebP, with the infotext
    SD WebUI would write; without it they stay PNG."""
    queues = [QueueConfig(name="q")]
    fleet = await start_fleet(queues, settings=fleet_settings(engine, models_dir, queues))
    ids = {}
    for fmt in ("webp", "jpeg", None):
        params = {**PARAMS, "batch_size": 2} | ({"output_format": fmt, "output_quality": 70} if fmt else {})
        r = await fleet.http.post("/v1/tasks", json={"params": params})
        assert r.status_code == 202, r.text
        ids[fmt] = r.json()["id"]
    for fmt, ext, mime in (
        ("webp", "webp", "image/webp"),
        ("jpeg", "jpg", "image/jpeg"),
        (None, "png", "image/png"),
    ):
        view = await fleet.wait(ids[fmt])
        assert view["state"] == "succeeded", view
        assert [i["key"].rsplit(".", 1)[1] for i in view["images"]] == [ext, ext], view["images"]
        assert ("encode" in view["timings"]) is (fmt is not None), view["timings"]
        for n, image in enumerate(view["images"]):
            data = await read(engine, image["key"])
            with Image.open(io.BytesIO(data)) as decoded:
                assert decoded.size == (64, 64) and decoded.format == ext.replace("jpg", "jpeg").upper()
                assert f"Seed: {3 + n}," in (infotext(decoded) or ""), infotext(decoded)
            async with httpx.AsyncClient() as http:  # the link the client gets serves its type
                served = await http.get(image["url"])
            assert served.status_code == 200 and served.headers["content-type"] == mime
            assert served.content == data
    for bad in ({"output_format": "gif"}, {"output_format": "jpeg", "output_quality": 0}):
        r = await fleet.http.post("/v1/tasks", json={"params": {**PARAMS, **bad}})
        assert r.status_code == 422 and "output_" in r.text, r.text


async def test_a_queue_stores_in_its_output_format_unless_the_task_asks_for_another(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """``queues[].output_format``: an operator's choice for every task of the queue that names
    none, the seed formats' too (their bodies are SD WebUI's and have no such field)."""
    queues = [QueueConfig(name="q", output_format="webp")]
    fleet = await start_fleet(queues, settings=fleet_settings(engine, models_dir, queues))
    plain = await fleet.http.post("/v1/tasks", json={"id": "plain", "params": PARAMS})
    png = await fleet.http.post("/v1/tasks", json={"id": "png", "params": {**PARAMS, "output_format": "png"}})
    seed = copy_of(V1ALPHA2_T2I)
    seed["task"]["content"].update(width=64, height=64, steps=2)
    answers = [plain, png, await fleet.http.post("/v1alpha2/", json=seed)]
    assert [r.status_code for r in answers] == [202, 202, 200], [r.text for r in answers]
    for task_id, ext in (("plain", "webp"), ("png", "png"), ("test-t2i", "webp")):
        view = await fleet.wait(task_id)
        assert view["state"] == "succeeded", view
        keys = [i["key"] for i in view["images"]]
        assert keys and all(k.endswith(f".{ext}") for k in keys), (task_id, keys)
        assert sniff(await read(engine, keys[0])).ext == ext
        assert "encode" in view["timings"], view["timings"]  # a format was asked for, by task or queue
