"""The seed's v1alpha1 and v1alpha2 example payloads, unchanged, over real HTTP → images, records,
and result notifications in the seed's shape — on every engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet_tools import (
    drain,
    exists,
    png_size,
    published_past_the_api,
    read_json,
    receive_json,
    wait_adopted,
)
from PIL import Image

from conftest import OTHER, SD15, Engine, RunningFleet, StartFleet, dedicated_and_dynamic, fleet_settings
from sdfleet.api.links import signature
from sdfleet.bus import open_bus
from sdfleet.compat import v1alpha2
from sdfleet.settings import QueueConfig
from seed_payloads import V1ALPHA1_I2I, V1ALPHA1_T2I, V1ALPHA2_I2I, V1ALPHA2_T2I, with_image_link

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(240), pytest.mark.flow]

# The run-numbering tests below are about ids and publishes, not images: the seed's 512² 16-step
# payloads take seconds a run on the tiny model on CPU, these a tenth of a second.
SMALL = {"width": 64, "height": 64, "steps": 2}


async def test_v1alpha1_examples(start_fleet: StartFleet, engine: Engine, image_url: str) -> None:
    fleet = await start_fleet()
    payloads = [V1ALPHA1_T2I, with_image_link(V1ALPHA1_I2I, image_url)]
    answers = []
    for body in payloads:
        r = await fleet.http.post("/v1alpha1/", json=body)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    keys = {}
    for body, answer in zip(payloads, answers, strict=True):
        scripts = body["alwayson_scripts"]
        assert set(answer) == {"id_task", "sd_model_checkpoint", "output_location"}
        assert answer["id_task"] == scripts["id_task"]
        assert answer["sd_model_checkpoint"] == SD15
        assert answer["output_location"].endswith(f"{scripts['save_dir']}/{scripts['id_task']}")
        view = await fleet.wait(answer["id_task"])
        assert view["state"] == "succeeded", view
        assert view["queue"] == "sd15"
        assert len(view["images"]) == 1
        key = view["images"][0]["key"]
        assert re.fullmatch(rf"outputs/{answer['id_task']}/{answer['id_task']}-[0-9a-f]{{4}}-1\.png", key)
        assert await png_size(engine, view["images"][0]["key"]) == (body["width"], body["height"])
        keys[answer["id_task"]] = key
    notes = {n["id"]: n for n in await receive_json(engine, "results", 2)}
    for answer in answers:
        note, key = notes[answer["id_task"]], keys[answer["id_task"]]
        assert note["result"] is True and note["status"] == "completed"
        assert len(note["image_url"]) == 1 and note["image_url"][0].endswith(key.rsplit("/", 1)[1])
        assert note["output_url"].endswith(key.rsplit("/", 1)[1].replace("-1.png", ".out"))
        assert note["context"] == {}


async def test_v1alpha2_examples(start_fleet: StartFleet, engine: Engine, image_url: str) -> None:
    fleet = await start_fleet()
    payloads = [V1ALPHA2_T2I, with_image_link(V1ALPHA2_I2I, image_url)]
    for body in payloads:
        r = await fleet.http.post("/v1alpha2/", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        meta = body["task"]["metadata"]
        assert answer["id"] == meta["id"] and answer["runtime"] == meta["runtime"]
        assert answer["output_location"].endswith(f"{meta['prefix']}/{meta['id']}")
        view = await fleet.wait(meta["id"])
        assert view["state"] == "succeeded", view
        content = body["task"]["content"]
        assert await png_size(engine, view["images"][0]["key"]) == (content["width"], content["height"])
        # the .out a backend built for the seed reads: parameters.id_task, image_seed, error_msg
        out = await read_json(engine, view["output"]["key"])
        parameters = out["parameters"]
        assert (parameters["id_task"], parameters["error_msg"]) == (meta["id"], "")
        assert parameters["image_seed"] == str(view["seed"]) and parameters["prompt"] == content["prompt"]
    notes = {n["id"]: n for n in await receive_json(engine, "results", 2)}
    for body in payloads:
        meta = body["task"]["metadata"]
        note = notes[meta["id"]]
        assert note["runtime"] == meta["runtime"]
        assert note["result"] is True and note["status"] == "completed"
        assert note["context"] == meta["context"]


@pytest.mark.flow(engines="all")  # the seed's payloads on each engine
async def test_v1_task_and_signed_file_link(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    body = {
        "model": SD15,
        "params": {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 7},
    }
    r = await fleet.http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/tasks/{r.json()['id']}"
    view = await fleet.wait(r.json()["id"])
    assert view["state"] == "succeeded" and view["seed"] == 7
    assert {"queue_wait", "inputs_fetch", "runtime_run", "storage_put"} <= set(view["timings"])
    url = view["images"][0]["url"]
    got = await fleet.http.get(url)
    assert got.status_code == 200
    with Image.open(io.BytesIO(got.content)) as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_file_links_are_signed_and_expire(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    body = {"model": SD15, "params": {"prompt": "a gate", "steps": 2, "width": 64, "height": 64}}
    view = await fleet.wait((await fleet.http.post("/v1/tasks", json=body)).json()["id"])
    url = httpx.URL(view["images"][0]["url"])
    assert (await fleet.http.get(url)).status_code == 200
    key, expires, sig = url.path.removeprefix("/v1/files/"), url.params["expires"], url.params["sig"]
    tenant = url.params["tenant"]
    forged = [
        {"tenant": tenant, "expires": expires, "sig": "0" * 64},  # wrong signature
        {"tenant": tenant, "expires": str(int(expires) + 60), "sig": sig},  # a longer life than signed
        {"tenant": "other", "expires": expires, "sig": sig},  # another tenant's
        # rightly signed, but expired
        {"tenant": tenant, "expires": "1", "sig": signature(_app_key(fleet), tenant, key, 1)},
    ]
    for params in forged:
        r = await fleet.http.get(f"/v1/files/{key}", params=params)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", params
    other = key.replace("-1.png", ".out")  # a valid signature is for one key only
    assert (
        await fleet.http.get(f"/v1/files/{other}", params={"tenant": tenant, "expires": expires, "sig": sig})
    ).status_code == 404


def _app_key(fleet: RunningFleet) -> str:
    """The API's own link key (a random one: the settings leave it unset)."""
    assert fleet.fleet.server is not None
    key: str = fleet.fleet.server.config.app.state.ctx.signing_key
    return key


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_what_the_runtime_would_leave_out_fails_the_task_by_name(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """The seed's SD WebUI honours face restoration, ControlNet...; the diffusers runtime
    ran without them and the task "succeeded". The API refuses them for a diffusers queue; a task
    no API saw (published by the seed's Lambda) fails in the agent, by name, with a seed .out."""
    from seed_payloads import copy_of

    fleet = await start_fleet()
    body = copy_of(V1ALPHA1_T2I)
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "hires-1", "controlnet": {"args": []}}
    body.update(restore_faces=True, infotext="Steps: 4")  # the latter was dropped without a word
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_option", r.text
    assert "restore_faces" in r.text and "alwayson_scripts.controlnet" in r.text, r.text
    assert "infotext='Steps: 4'" in r.text, r.text
    assert (await fleet.http.get("/v1/tasks/hires-1")).status_code == 404, "nothing queued"
    view = await published_past_the_api(fleet, engine, "v1alpha1", body, "hires-1")
    assert view["state"] == "failed" and view["error"]["code"] == "unsupported_option", view
    message = view["error"]["message"]
    assert "restore_faces" in message and "alwayson_scripts.controlnet" in message, message
    assert view["attempts"] == 1, "not retried: it can never run here"
    # as the seed's agent does, a failed task has a .out with the reason, linked by its notification
    (note,) = await receive_json(engine, "results", 1)
    assert note["id"] == "hires-1" and note["result"] is False and note["output_url"], note
    out = await read_json(engine, view["output"]["key"])
    assert note["output_url"].endswith(view["output"]["key"].rsplit("/", 1)[1])
    assert out["parameters"]["id_task"] == "hires-1" and out["parameters"]["status"] == 0
    assert out["parameters"]["error_msg"] == message and out["images"] == [""]
    # A batch count is bounded at the door, as batch_size is.
    for n_iter in (100_000, 0, "2", 1.5):
        body = copy_of(V1ALPHA1_T2I)
        body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "many-1"}
        body["n_iter"] = n_iter
        r = await fleet.http.post("/v1alpha1/", json=body)
        assert r.status_code == 422 and "n_iter" in r.json()["error"]["message"], (n_iter, r.text)
    # ...and run: n_iter batches with consecutive seeds (it was refused as unsupported_option)
    body = {**copy_of(V1ALPHA1_T2I), "width": 64, "height": 64, "steps": 2, "seed": 5}
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "count-1"}
    body.update(batch_size=2, n_iter=3)
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 200, r.text
    view = await fleet.wait("count-1")
    assert view["state"] == "succeeded" and len(view["images"]) == 6, view
    out = await read_json(engine, view["output"]["key"])
    assert out["all_seeds"] == [5, 6, 7, 8, 9, 10] and out["batch_size"] == 2  # SD WebUI's info
    # SD WebUI's hires fix runs too (it was refused as unsupported_option), bounded at the door by
    # the size it makes
    body = {**copy_of(V1ALPHA1_T2I), "width": 64, "height": 64, "steps": 2, "seed": 5}
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "hires-2"}
    body.update(enable_hr=True, hr_scale=2, hr_upscaler="Latent (antialiased)", denoising_strength=0.6)
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 200, r.text
    view = await fleet.wait("hires-2")
    assert view["state"] == "succeeded", view
    with Image.open(io.BytesIO((await fleet.http.get(view["images"][0]["url"])).content)) as im:
        assert im.size == (128, 128)
    # ...its second pass on another checkpoint (refused before), named in the infotext
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "hires-3"}
    body["hr_checkpoint_name"] = OTHER
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 200, r.text
    view = await fleet.wait("hires-3")
    assert view["state"] == "succeeded", view
    with Image.open(io.BytesIO((await fleet.http.get(view["images"][0]["url"])).content)) as im:
        assert im.size == (128, 128) and "Hires checkpoint: anything-v3 [" in im.info["parameters"]
    body["hr_checkpoint_name"] = "nope.safetensors"
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_model", r.text
    assert "hr_checkpoint_name: model 'nope.safetensors' not found" in r.json()["error"]["message"]
    # ...and a refiner (refused before), said in the infotext, its name checked at the door
    refined = {**copy_of(V1ALPHA1_T2I), "width": 64, "height": 64, "steps": 4, "seed": 5}
    refined["alwayson_scripts"] = {**refined["alwayson_scripts"], "id_task": "refined-1"}
    refined.update(refiner_checkpoint=OTHER, refiner_switch_at=0.5)
    r = await fleet.http.post("/v1alpha1/", json=refined)
    assert r.status_code == 200, r.text
    view = await fleet.wait("refined-1")
    assert view["state"] == "succeeded", view
    with Image.open(io.BytesIO((await fleet.http.get(view["images"][0]["url"])).content)) as im:
        assert "Refiner: anything-v3 [" in im.info["parameters"], im.info["parameters"]
        assert "Refiner switch at: 0.5" in im.info["parameters"], im.info["parameters"]
    refined["refiner_checkpoint"] = "nope.safetensors"
    r = await fleet.http.post("/v1alpha1/", json=refined)
    assert r.status_code == 422 and "refiner_checkpoint: model 'nope.safetensors'" in r.text, r.text
    body.update(width=512, height=512, hr_scale=8, hr_checkpoint_name=None)
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_large", r.text
    assert "output size 4096x4096 (its hires pass) is over the maximum" in r.json()["error"]["message"]
    # ...and variation seeds (refused as unsupported_option before): one seed, consecutive
    # variation seeds, SD WebUI's info; their noise's size is bounded at the door, as an output's
    body = {**copy_of(V1ALPHA1_T2I), "width": 64, "height": 64, "steps": 2, "seed": 5}
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "vary-1"}
    body.update(batch_size=2, subseed=40, subseed_strength=0.3)
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 200, r.text
    view = await fleet.wait("vary-1")
    assert view["state"] == "succeeded", view
    out = await read_json(engine, view["output"]["key"])
    assert (out["all_seeds"], out["all_subseeds"], out["subseed_strength"]) == ([5, 5], [40, 41], 0.3)
    body.update(seed_resize_from_w=100_000, seed_resize_from_h=64)
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_large", r.text
    assert "seed_resize_from 100000x64 is over the maximum" in r.json()["error"]["message"]
    body.update(seed_resize_from_w=-1, subseed_strength="strong")
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422, r.text
    assert "subseed_strength must be a number" in r.json()["error"]["message"], r.text
    # saved prompt styles run (refused as unsupported_option before): a name the models folder's
    # styles.csv lacks fails the task by name, once; a value that is no list of names is a 422
    body = {**copy_of(V1ALPHA1_T2I), "width": 64, "height": 64, "steps": 2, "styles": ["no-such-style"]}
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "style-1"}
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 200, r.text
    view = await fleet.wait("style-1")
    assert view["state"] == "failed" and view["error"]["code"] == "invalid_params", view
    assert "no prompt style named 'no-such-style'" in view["error"]["message"] and view["attempts"] == 1
    body["styles"] = "no-such-style"
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and "styles must be a list of style names" in r.text, r.text


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_a_prompt_nested_too_deep_is_refused_at_the_door_and_fails_once_past_it(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """Editing brackets nested 600 deep made the prompt reader recurse past Python's limit: a 500
    at the API, an internal error in the agent. SD WebUI's own reader fails the same way (a 500
    after seconds to minutes); the API now says why (422), and a task no API saw fails once."""
    from seed_payloads import copy_of

    fleet = await start_fleet()
    body = {**copy_of(V1ALPHA1_T2I), "width": 64, "height": 64, "steps": 2}
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "deep-1"}
    body["prompt"] = "[" * 600 + "cat:dog:0.5" + "]" * 600
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_params", r.text
    assert "brackets nest 600 deep: at most 100" in r.json()["error"]["message"], r.text
    view = await published_past_the_api(fleet, engine, "v1alpha1", body, "deep-1")
    assert view["state"] == "failed" and view["error"]["code"] == "invalid_params", view
    assert view["attempts"] == 1 and "nest 600 deep" in view["error"]["message"], view
    # 100 levels run, and plain emphasis is read without the editing reader
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "deep-2"}
    body["prompt"] = "[" * 100 + "cat:dog:0.5" + "]" * 100
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 200, r.text
    assert (await fleet.wait("deep-2"))["state"] == "succeeded"
    body["prompt"] = "cat, " * 10_000  # and a prompt is bounded, as the images a task asks for
    r = await fleet.http.post("/v1alpha1/", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_large", r.text
    assert "a prompt of 50,000 characters: at most 32,768" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_what_the_routed_queues_runtime_cannot_run_is_refused_at_the_door(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """The seed's pipeline payload (a ComfyUI workflow) on a fleet without a comfyui queue, and a
    sampler the diffusers runtime lacks, were accepted and then failed in the agent."""
    from seed_payloads import V1ALPHA2_PIPELINE, copy_of

    fleet = await start_fleet()  # diffusers queues only
    r = await fleet.http.post("/v1alpha2/", json=copy_of(V1ALPHA2_PIPELINE))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_task", r.text
    assert "comfyui runtime" in r.json()["error"]["message"], r.text
    assert (await fleet.http.get("/v1/tasks/test-pipeline")).status_code == 404, "nothing queued"
    body = {"params": {"prompt": "a cat", "sampler": "DPM++ 3M SDE", "width": 64, "height": 64}}
    r = await fleet.http.post("/v1/tasks", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_sampler", r.text
    assert "DPM++ 2M Karras" in r.json()["error"]["message"], "it lists the samplers it has"
    # the same pipeline on a fleet whose filter sends pipelines to a comfyui queue is taken
    queues = [
        # a fleet file that, by mistake, sends text-to-image there too
        QueueConfig(name="flows", runtime="comfyui", filter={"task_type": ["pipeline", "text-to-image"]}),
        QueueConfig(name="images"),
    ]
    other = await start_fleet(queues, agents=[], settings=fleet_settings(engine, models_dir, queues))
    r = await other.http.post("/v1alpha2/", json=copy_of(V1ALPHA2_PIPELINE))
    assert r.status_code == 200 and r.json()["id"] == "test-pipeline", r.text  # the seed's answer
    assert (await other.http.get("/v1/tasks/test-pipeline")).json()["queue"] == "flows"
    r = await other.http.post("/v1/tasks", json={"params": {"prompt": "a cat"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_task", r.text


async def test_the_seeds_text_to_video_example_is_taken_where_sd_webui_runs_it(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """``test/v1alpha1/t2v.json`` (AnimateDiff: 32 frames as the batch) was a 422 on every fleet:
    ``batch_size`` was capped at 16 for all runtimes. An a1111 queue takes it as the seed did; a
    diffusers one refuses it at the door, naming why and where it would run."""
    from seed_payloads import V1ALPHA1_T2V, copy_of

    t2v = copy_of(V1ALPHA1_T2V)
    t2v["alwayson_scripts"]["sd_model_checkpoint"] = SD15  # a model these fleets have
    fleet = await start_fleet(agents=[])  # diffusers queues only
    r = await fleet.http.post("/v1alpha1/", json=t2v)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_large", r.text
    assert "at most 16 images a task, not 32" in r.json()["error"]["message"], r.text
    queues = [QueueConfig(name="webui", runtime="a1111")]
    other = await start_fleet(queues, agents=[], settings=fleet_settings(engine, models_dir, queues))
    r = await other.http.post("/v1alpha1/", json=t2v)
    assert r.status_code == 200 and r.json()["id_task"] == "gif1", r.text
    view = (await other.http.get("/v1/tasks/gif1")).json()
    assert (view["state"], view["queue"]) == ("queued", "webui"), view


async def _run_done(fleet: RunningFleet, task_id: str, run: int) -> dict[str, Any]:
    """The view of ``task_id`` once its run ``run`` has ended."""
    for _ in range(600):
        r = await fleet.http.get(f"/v1/tasks/{task_id}")
        if r.status_code == 200 and r.json()["run"] == run and r.json()["finished_at"] is not None:
            return dict(r.json())
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run} of {task_id} did not end: {r.text}")


async def test_a_seed_id_sent_again_after_it_finished_runs_again(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """The seed runs every POST anew and its test/run.sh reuses fixed ids: a repeat of a finished
    id answered 200 and ran nothing (later a 409). It runs again now, as the id's next run, with
    new files beside the first run's; a repeat while it is queued or running is a safe retry."""
    from seed_payloads import copy_of

    fleet = await start_fleet()
    first = copy_of(V1ALPHA2_T2I)
    first["task"]["metadata"]["id"] = "rep-1"
    first["task"]["content"].update(SMALL)
    r = await fleet.http.post("/v1alpha2/", json=first)
    assert r.status_code == 200, r.text
    view = await fleet.wait("rep-1")
    assert view["state"] == "succeeded" and view["run"] == 1, view
    second = copy_of(first)
    second["task"]["content"]["prompt"] = "something else entirely"
    again = await fleet.http.post("/v1alpha2/", json=second)
    assert again.status_code == 200 and again.json() == r.json(), again.text  # the seed's answer
    rerun = await _run_done(fleet, "rep-1", 2)
    assert rerun["state"] == "succeeded" and rerun["attempts"] == 1, rerun
    assert rerun["created_at"] == view["created_at"], "the id's first: listings keep their order"
    old_keys = {i["key"] for i in view["images"]} | {view["output"]["key"]}
    new_keys = {i["key"] for i in rerun["images"]} | {rerun["output"]["key"]}
    assert not old_keys & new_keys, "the second run's files are new ones"
    assert all([await exists(engine, k) for k in old_keys]), "the first run's are kept"
    assert "something else entirely" in json.dumps(await read_json(engine, rerun["output"]["key"]))
    notes = [n for n in await receive_json(engine, "results", 2) if n["id"] == "rep-1"]
    assert [n["result"] for n in notes] == [True, True], notes
    assert len({n["output_url"] for n in notes}) == 2, notes
    # The first run's message, published again (a late copy): stale, dropped, nothing notified.
    stale = v1alpha2.to_task(copy_of(first), tenant="default").model_copy(update={"queue": rerun["queue"]})
    bus = open_bus(engine.bus_url)
    try:
        await bus.publish("tasks", stale.to_message(), {"task_type": "text-to-image"})
    finally:
        await bus.aclose()
    assert not [n for n in await drain(engine, "results", quiet_s=3) if n.get("id") == "rep-1"]
    after = (await fleet.http.get("/v1/tasks/rep-1")).json()
    assert after["run"] == 2 and after["updated_at"] == rerun["updated_at"], after
    listed = (await fleet.http.get("/v1/tasks")).json()["tasks"]
    assert [t["id"] for t in listed].count("rep-1") == 1, listed
    # the same id in the other seed format is another task, not this one's next run
    other = copy_of(V1ALPHA1_T2I)
    other["alwayson_scripts"] = {**other["alwayson_scripts"], "id_task": "rep-1"}
    r = await fleet.http.post("/v1alpha1/", json=other)
    assert r.status_code == 409 and "v1alpha2 task" in r.json()["error"]["message"], r.text


async def test_the_seeds_lambda_publishing_an_id_again_runs_it_again(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """Drop-in: the seed's Lambda publishes straight to the topic; a second publish of a finished
    id was taken for a redelivery and dropped (nothing ran, nothing was notified)."""
    from seed_payloads import copy_of, lambda_message

    fleet = await start_fleet()
    body = copy_of(V1ALPHA1_T2I)
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "lambda-1"}
    body.update(SMALL)
    bus = open_bus(engine.bus_url)
    try:
        for run in (1, 2):
            message, attributes = lambda_message("v1alpha1", body)
            await bus.publish("tasks", message.encode(), attributes)
            view = await (wait_adopted(fleet, "lambda-1") if run == 1 else _run_done(fleet, "lambda-1", 2))
            assert view["state"] == "succeeded" and view["run"] == run, view
    finally:
        await bus.aclose()
    notes = [n for n in await receive_json(engine, "results", 2) if n["id"] == "lambda-1"]
    assert [n["result"] for n in notes] == [True, True] and len({n["output_url"] for n in notes}) == 2


@pytest.mark.parametrize("enveloped", [False, True], ids=["raw", "sns-envelope"])
async def test_a_new_publish_first_received_by_an_agent_that_died_is_still_the_next_run(
    start_fleet: StartFleet, engine: Engine, enveloped: bool
) -> None:
    """The drop-in agent told the Lambda's next publish of a finished id from a redelivery of the
    finished run by the receive count: a new publish whose first receive was by an agent that died
    (its next receive counts 2) was taken for the finished run come back (notified again, nothing
    ran). It goes by the publish now: SNS's MessageId inside an envelope, else the bus's id."""
    from seed_payloads import copy_of, lambda_message, sns_envelope

    body = copy_of(V1ALPHA1_T2I)
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "died-1"}
    body.update(SMALL)

    def publish(bus: Any, n: int) -> Any:
        message, attributes = lambda_message("v1alpha1", body)
        data = sns_envelope(message, attributes, message_id=f"sns-{n}") if enveloped else message.encode()
        return bus.publish("tasks", data, attributes)

    bus = open_bus(engine.bus_url)
    try:
        fleet = await start_fleet()
        await publish(bus, 1)
        first = await wait_adopted(fleet, "died-1")
        assert first["state"] == "succeeded" and first["run"] == 1, first
        await fleet.stop()
        # The next publish, received by an agent that dies before it writes anything.
        await publish(bus, 2)
        got = []
        for _ in range(50):
            got = await bus.receive(first["queue"], wait_s=0.2, lease_s=1)
            if got:
                break
        assert got and got[0].receive_count == 1, got
        await asyncio.sleep(1.2)
        fleet = await start_fleet()
        second = await _run_done(fleet, "died-1", 2)
    finally:
        await bus.aclose()
    assert second["state"] == "succeeded", second
    notes = [n for n in await receive_json(engine, "results", 2) if n["id"] == "died-1"]
    assert [n["result"] for n in notes] == [True, True] and len({n["output_url"] for n in notes}) == 2, notes


def _lambda_publish(prompt: str, sns_id: str | None) -> tuple[bytes, dict[str, str]]:
    """What the seed's Lambda publishes for a v1alpha1 POST of id ``twice-1`` with ``prompt``
    (at ``SMALL``'s size), raw or inside an SNS envelope whose MessageId is ``sns_id``."""
    from seed_payloads import copy_of, lambda_message, sns_envelope

    body = copy_of(V1ALPHA1_T2I)
    body["prompt"] = prompt
    body.update(SMALL)
    body["alwayson_scripts"] = {**body["alwayson_scripts"], "id_task": "twice-1"}
    message, attributes = lambda_message("v1alpha1", body)
    data = sns_envelope(message, attributes, message_id=sns_id) if sns_id else message.encode()
    return data, attributes


async def _prompts_of_runs(engine: Engine, fleet: RunningFleet, task_id: str) -> set[str]:
    """The prompts the two notified runs of ``task_id`` ran with (read from each run's ``.out``)."""
    notes = [n for n in await receive_json(engine, "results", 2) if n["id"] == task_id]
    assert [n["result"] for n in notes] == [True, True], notes
    view = (await fleet.http.get(f"/v1/tasks/{task_id}")).json()
    folder = view["output"]["key"].rsplit("/", 1)[0]  # both runs' files are in the id's folder
    outs = [await read_json(engine, f"{folder}/{n['output_url'].rsplit('/', 1)[-1]}") for n in notes]
    return {out["parameters"]["prompt"] for out in outs}


@pytest.mark.parametrize("together", [True, False], ids=["received-together", "second-while-running"])
async def test_two_publishes_of_a_new_id_on_one_agent_run_one_after_the_other(
    start_fleet: StartFleet, engine: Engine, together: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed runs every message: two POSTs of one id run twice. The drop-in agent that received
    both in one go found no record for either and ran the second as the first's own start (one
    result, the other POST lost); one that received the second while running the first dropped it
    as a copy. The second now waits in hand (its lease kept, no receive spent) until the first run
    has ended, then runs as the id's next run with its own prompt."""
    caplog.set_level(logging.INFO, logger="sdfleet.agent.task")
    # Runs of a known length, long enough for the second publish to come while the first is going.
    queues, runtimes = dedicated_and_dynamic("synthetic"), {"synthetic": {"latency_s": 2.0}}
    settings = {"lease_s": 3, "prefetch": 4, "prefetch_horizon_s": 0, "runtimes": runtimes}
    fleet = await start_fleet(queues, **settings)
    if together:  # both on the queue before the agent's first receive
        await fleet.stop()
    bus = open_bus(engine.bus_url)
    try:
        for prompt in ("a red fox", "a blue whale"):
            await bus.publish("tasks", *_lambda_publish(prompt, None))
            while not together and prompt == "a red fox":  # until the first run has started
                r = await fleet.http.get("/v1/tasks/twice-1")
                if r.status_code == 200 and r.json()["state"] == "running":
                    break
                await asyncio.sleep(0.05)
    finally:
        await bus.aclose()
    if together:
        fleet = await start_fleet(queues, **settings)
    second = await _run_done(fleet, "twice-1", 2)
    assert second["state"] == "succeeded" and second["attempts"] == 1, second
    assert await _prompts_of_runs(engine, fleet, "twice-1") == {"a red fox", "a blue whale"}
    events = [getattr(r, "event", None) for r in caplog.records if getattr(r, "task_id", None) == "twice-1"]
    assert events.count("waiting") == 1 and "deferred" not in events, events


@contextlib.asynccontextmanager
async def _second_publish_while_a_ghost_runs(
    start_fleet: StartFleet, engine: Engine, **settings: Any
) -> AsyncIterator[tuple[RunningFleet, Any, Any, str]]:
    """A fleet; a record of ``twice-1`` running under another worker's name for another publish
    (``sns-1``, "a red fox") on the queue its messages go to; and the Lambda's next publish of it
    (``sns-2``, "a blue whale") sent. Yields the fleet, a store, a bus and that queue."""
    import time

    from sdfleet.messages import decode_task
    from sdfleet.routing import resolve_queues
    from sdfleet.store import open_store
    from sdfleet.tasks import TaskRecord, TaskState

    fleet = await start_fleet(**settings)
    data, attributes = _lambda_publish("a blue whale", "sns-2")  # raw: tests/unit/test_seed_runs.py
    task = decode_task(data, attributes)
    queue = resolve_queues(fleet.settings.fleet, task, attributes)[0]
    params = task.params.model_copy(update={"prompt": "a red fox"})
    first = task.model_copy(update={"queue": queue, "params": params})
    running = TaskRecord(task=first, state=TaskState.RUNNING, worker="ghost", attempts=1, message_id="sns-1")
    running.started_at = time.time()
    store = open_store(engine.store_url)
    bus = open_bus(engine.bus_url)
    try:
        assert (await store.create(running))[1]
        await bus.publish("tasks", data, attributes)
        yield fleet, store, bus, queue
    finally:
        await bus.aclose()
        await store.aclose()


def _ghost_ended(r: Any) -> Any:
    import time

    from sdfleet.tasks import TaskError, TaskState

    r.state, r.finished_at = TaskState.FAILED, time.time()
    r.error = TaskError(code="runtime_error", message="the other agent's run failed")
    return r


async def test_a_publish_that_comes_while_another_publishes_run_is_going_waits_for_it(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """A second POST of an id whose first run is still going on another agent (here a record
    running under another worker's name, for another publish) was dropped as a copy of that run:
    the seed would have run it after. It waits now, untouched, and runs once that run has ended."""
    from sdfleet.store.base import transition

    # On queues with a dead-letter queue each wait is a lease (agent/defer.py): 5 of them here.
    ghost = _second_publish_while_a_ghost_runs(start_fleet, engine, lease_s=3, max_receives=6)
    async with ghost as (fleet, store, _, queue):
        await asyncio.sleep(4)  # received, deferred (a lease: 3 s on these queues), received again
        view = (await fleet.http.get("/v1/tasks/twice-1")).json()
        assert view["state"] == "running" and view["run"] == 1 and view["attempts"] == 1, view
        await transition(store, "default", "twice-1", _ghost_ended)
        second = await _run_done(fleet, "twice-1", 2)
    assert second["state"] == "succeeded" and second["queue"] == queue, second
    assert (await read_json(engine, second["output"]["key"]))["parameters"]["prompt"] == "a blue whale"
    notes = [n for n in await receive_json(engine, "results", 1) if n["id"] == "twice-1"]
    assert [n["result"] for n in notes] == [True], notes


async def test_a_publish_waiting_past_max_receives_is_not_dead_lettered(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """On a queue with a dead-letter queue a publish waiting for another agent's run of its id spent a
    receive per lease, and once that run outlasted ``max_receives - 1`` leases the next release
    moved it to the dead-letter queue: the second POST never ran. On its last receive it now waits
    in hand (its lease kept) until that run ends, then runs."""
    from sdfleet.store.base import transition

    ghost = _second_publish_while_a_ghost_runs(start_fleet, engine, lease_s=2, max_receives=2)
    async with ghost as (fleet, store, bus, queue):
        await asyncio.sleep(5)  # received, deferred a lease (2 s), received a last time: held since
        view = (await fleet.http.get("/v1/tasks/twice-1")).json()
        assert view["state"] == "running" and view["run"] == 1 and view["attempts"] == 1, view
        stats = await bus.stats(queue)
        assert (stats.visible, stats.in_flight, stats.dead_letters) == (0, 1, 0), stats
        await transition(store, "default", "twice-1", _ghost_ended)
        second = await _run_done(fleet, "twice-1", 2)
        stats = await bus.stats(queue)
    assert second["state"] == "succeeded" and second["queue"] == queue, second
    assert (await read_json(engine, second["output"]["key"]))["parameters"]["prompt"] == "a blue whale"
    assert stats.dead_letters == 0, stats


@pytest.mark.parametrize("engine", ["sqlite", "aws"], indirect=True)
async def test_a_late_duplicate_of_an_earlier_runs_publish_is_not_another_run(
    start_fleet: StartFleet, engine: Engine
) -> None:
    """SNS delivers at least once: a duplicate of the first POST's publish that arrives after the
    second run finished was taken for the id's next run (the record knew only the latest run's
    publish), so a third run nobody posted. The record keeps the publishes of earlier runs: it is
    dropped as a copy, nothing runs and nothing is notified."""
    fleet = await start_fleet()
    bus = open_bus(engine.bus_url)
    try:
        for run, prompt in ((1, "a red fox"), (2, "a blue whale")):
            await bus.publish("tasks", *_lambda_publish(prompt, f"sns-{run}"))
            view = await (wait_adopted(fleet, "twice-1") if run == 1 else _run_done(fleet, "twice-1", 2))
            assert view["state"] == "succeeded" and view["run"] == run, view
        await bus.publish("tasks", *_lambda_publish("a red fox", "sns-1"))  # SNS's late duplicate
    finally:
        await bus.aclose()
    notes = [n for n in await drain(engine, "results", quiet_s=3) if n.get("id") == "twice-1"]
    assert [n["result"] for n in notes] == [True, True], notes  # runs 1 and 2, nothing more
    after = (await fleet.http.get("/v1/tasks/twice-1")).json()
    assert after["run"] == 2 and after["updated_at"] == view["updated_at"], after


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_a_publish_waiting_in_hand_does_not_hold_up_a_shutdown(
    start_fleet: StartFleet, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait in hand on a last receive ends with the agent's shutdown (not at the other run's
    time limit, minutes away): the delivery is released to the dead-letter queue, said at ERROR."""
    caplog.set_level(logging.INFO)
    async with _second_publish_while_a_ghost_runs(start_fleet, engine, lease_s=2, max_receives=2) as ghost:
        fleet = ghost[0]
        for _ in range(100):  # deferred a lease, then received a last time: it waits in hand
            ours = [r for r in caplog.records if getattr(r, "task_id", None) == "twice-1"]
            events = [getattr(r, "event", None) for r in ours]
            if "waiting" in events:
                break
            await asyncio.sleep(0.1)
        assert events == ["deferred", "waiting"], events
        await fleet.stop()  # within its 60 s, though the other run may go on for 600 s
    assert fleet.task.done() and not fleet.task.cancelled()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("twice-1" in m and "dead-letter queue" in m for m in errors), errors
