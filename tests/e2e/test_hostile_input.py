"""What a hostile client sends gets a 4xx with the error shape, never a 500, a crash or unbounded
memory (issue 12, defects 2 and 3), a size published past the API is held to the API's bound, and
``Prefer: wait=N`` answers with the finished task."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import wait_adopted
from PIL import Image

from conftest import SD15, Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.bus import open_bus
from sdfleet.demo import ImageServer
from sdfleet.settings import QueueConfig
from seed_payloads import V1ALPHA2_T2I, copy_of, lambda_message

pytestmark = [pytest.mark.timeout(180), pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

QUEUE = [QueueConfig(name="q", runtime="synthetic")]
PARAMS = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}


def png(side: int) -> bytes:
    """A black square PNG: a few KB whatever its size, as a decompression bomb is."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"4000": png(4000), "13000": png(13000), "64": png(64)}


@pytest.fixture
def bomb_server(bombs: dict[str, bytes]) -> Iterator[str]:
    server = ImageServer(bombs["13000"])
    yield server.url
    server.close()


async def start(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, latency_s: float = 0.05
) -> RunningFleet:
    runtimes = {"synthetic": {"latency_s": latency_s}}
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes)
    return await start_fleet(QUEUE, settings=settings)


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def upscale_v1(image: bytes, factor: float) -> dict[str, Any]:
    params = {**PARAMS, "init_images": [data_url(image)], "upscaling_resize": factor}
    return {"type": "extra-single-image", "params": params}


def upscale_v1alpha1(image: bytes, factor: float) -> dict[str, Any]:
    scripts = {"task": "extra-single-image", "sd_model_checkpoint": SD15, "id_task": f"up-{factor:g}"}
    return {
        "alwayson_scripts": scripts,
        "image": base64.b64encode(image).decode(),
        "upscaling_resize": factor,
    }


async def test_upscales_and_inputs_are_bounded_at_the_door(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, bombs: dict[str, bytes]
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    assert len(bombs["4000"]) < 10_000 and len(bombs["13000"]) < 100_000
    for path, body in (("/v1/tasks", upscale_v1), ("/v1alpha1/", upscale_v1alpha1)):
        for factor in (8, 2):  # 32000² (MemoryError once) and 8000² (past the 2048 maximum)
            r = await fleet.http.post(path, json=body(bombs["4000"], factor))
            assert r.status_code == 422, (path, factor, r.text)
            error = r.json()["error"]
            assert error["code"] == "too_large" and f"{4000 * factor}x{4000 * factor}" in error["message"]
        r = await fleet.http.post(path, json=body(bombs["13000"], 1))  # 169 Mpx in a few KB
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_large", r.text
        assert "169000000 pixels" in r.json()["error"]["message"]
        r = await fleet.http.post(path, json=body(b"\x89PNG\r\n\x1a\n not really", 2))
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_image", r.text
    r = await fleet.http.post("/v1/tasks", json=upscale_v1(bombs["64"], 2))
    assert r.status_code == 202, r.text
    assert (await fleet.wait(r.json()["id"]))["state"] == "succeeded"


async def test_a_bomb_behind_a_url_fails_its_task_in_the_agent(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, bomb_server: str
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    body = {"type": "image-to-image", "params": {**PARAMS, "init_images": [bomb_server]}}
    r = await fleet.http.post("/v1/tasks", json=body)
    assert r.status_code == 202, r.text
    view = await fleet.wait(r.json()["id"])
    assert view["state"] == "failed" and view["error"]["code"] == "input_too_large", view
    assert "169000000 pixels" in view["error"]["message"]


async def test_a_size_past_the_api_fails_once_on_a_diffusers_queue(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """The API refuses a size over ``api.max_width`` × ``max_height``; a message published straight
    to the topic (the seed's Lambda) never met that check and would hold a GPU for as long as it
    ran, again on every retry. The diffusers runtime holds it to the same bound, from the same
    fleet file: one ``too_large`` failure, no retry; a size within it runs."""
    queue = [QueueConfig(name="q", runtime="diffusers", model=SD15)]
    settings = fleet_settings(engine, models_dir, queue, runtimes={"diffusers": {"device": "cpu"}})
    settings.api.max_width = settings.api.max_height = 64
    fleet = await start_fleet(queue, settings=settings)
    r = await fleet.http.post("/v1/tasks", json={"params": {**PARAMS, "width": 72}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_large", r.text
    bus = open_bus(engine.bus_url)
    try:
        for task_id, width in (("past-the-api-big", 72), ("past-the-api-ok", 64)):
            payload = copy_of(V1ALPHA2_T2I)
            payload["task"]["metadata"]["id"] = task_id
            payload["task"]["content"].update(width=width, height=64, steps=2)
            message, attributes = lambda_message("v1alpha2", payload)
            await bus.publish("tasks", message.encode(), attributes)
    finally:
        await bus.aclose()
    big = await wait_adopted(fleet, "past-the-api-big")
    assert big["state"] == "failed" and big["attempts"] == 1, big
    assert big["error"] == {
        "code": "too_large",
        "message": "text-to-image at 72x64 (4608 pixels) is more than the 4096 the runtime allows "
        "(generate_max_pixels); use a smaller width/height",
    }, big
    ok = await wait_adopted(fleet, "past-the-api-ok")
    assert ok["state"] == "succeeded" and ok["attempts"] == 1, ok


IDS = ["a/b", "", "x" * 129, ".", "..", ".hidden", "-x", "a b", "é"]


async def test_hostile_ids_are_422s_on_every_route(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    for bad in IDS:
        bodies = {
            "/v1/tasks": {"id": bad, "params": PARAMS},
            "/v1alpha1/": {
                "alwayson_scripts": {"task": "text-to-image", "sd_model_checkpoint": SD15, "id_task": bad},
                **PARAMS,
            },
            "/v1alpha2/": {
                "task": {
                    "metadata": {"id": bad, "runtime": "r", "tasktype": "text-to-image"},
                    "content": PARAMS,
                }
            },
        }
        for path, body in bodies.items():
            r = await fleet.http.post(path, json=body)
            assert r.status_code == 422, (path, bad, r.text)
            assert set(r.json()["error"]) == {"code", "message"}
    deep = '{"params": {"prompt": "x"}, "context": ' + "[" * 1000 + "]" * 1000 + "}"
    r = await fleet.http.post("/v1/tasks", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_too_deep", r.text
    for raw in (
        '{"params": {"prompt": "x", "cfg_scale": NaN}}',
        '{"params": {"prompt": "x"}, "context": Infinity}',
    ):
        r = await fleet.http.post("/v1/tasks", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json", r.text
    assert (await fleet.http.get("/v1/tasks")).json()["tasks"] == [], "nothing refused was recorded"


async def test_prefer_wait_answers_with_the_finished_task(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, latency_s=0.2)
    t0 = time.monotonic()
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS}, headers={"prefer": "wait=20"})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    assert r.headers["preference-applied"] == "wait=20" and time.monotonic() - t0 < 20
    assert len(r.json()["images"]) == 1
    # The same id again, finished: its result at once
    body = {"id": "waited", "params": PARAMS}
    first = await fleet.http.post("/v1/tasks", json=body, headers={"prefer": "respond-async, wait=100"})
    assert first.status_code == 200 and first.headers["preference-applied"] == "wait=60", first.text
    again = await fleet.http.post("/v1/tasks", json=body, headers={"prefer": "wait=5"})
    assert again.status_code == 200 and again.json()["state"] == "succeeded"
    # No preference, or one we do not read: the usual 202.
    for prefer in ({}, {"prefer": "handling=strict"}):
        r = await fleet.http.post("/v1/tasks", json={"params": PARAMS}, headers=prefer)
        assert r.status_code == 202 and "preference-applied" not in r.headers, r.text


async def test_prefer_wait_gives_up_with_a_202(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, latency_s=5)
    t0 = time.monotonic()
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS}, headers={"prefer": "wait=1"})
    took = time.monotonic() - t0
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running"), r.text
    assert 1 <= took < 5, took


class _LateRecords:
    """The API's task store, writing new records ``delay_s`` late (a store that was away and came
    back, as in a Redis restart): the agent adopts and finishes the task first."""

    def __init__(self, store: Any, delay_s: float) -> None:
        self._store, self._delay_s = store, delay_s

    async def create(self, record: Any) -> Any:
        await asyncio.sleep(self._delay_s)
        return await self._store.create(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_a_new_task_finished_before_its_record_is_still_a_202(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Found in a Redis outage: the API published, its record write waited out the outage, and the
    agent ran the task meanwhile; the API's create then returned the finished record and the API
    answered 200, which the API promises only with ``Prefer: wait``."""
    fleet = await start(start_fleet, engine, models_dir, latency_s=0.05)
    assert fleet.fleet.server is not None
    ctx = fleet.fleet.server.config.app.state.ctx
    ctx.store = _LateRecords(ctx.store, delay_s=1.5)
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "succeeded", "the agent finished it before the API's record write"
    waited = await fleet.http.post("/v1/tasks", json={"params": PARAMS}, headers={"prefer": "wait=10"})
    assert waited.status_code == 200 and waited.json()["state"] == "succeeded", waited.text


async def test_bodies_headers_and_names_found_by_a_hostile_sweep_are_4xx(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Each of these was a 500, a silently accepted request, or a message with a Python repr."""
    fleet = await start(start_fleet, engine, models_dir)
    http = fleet.http
    # Bodies are read as sent: an encoded one is refused, not misread as malformed or let through.
    for encoding in ("gzip", "br", "deflate"):
        r = await http.post("/v1/tasks", json={"params": PARAMS}, headers={"content-encoding": encoding})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = await http.post("/v1alpha1/", json={}, headers={"content-encoding": "gzip"})
    assert r.status_code == 415, r.text
    # v1 is bounded as the seed's formats are.
    for params, words in [
        ({"prompt": "x" * 100_001}, "params.prompt is over 100000"),
        ({"prompt": "x", "negative_prompt": "y" * 100_001}, "negative_prompt is over"),
        ({"prompt": "x", "sampler": "s" * 257}, "params.sampler must be 1 to 256"),
        ({"prompt": "x", "upscaler": ""}, "params.upscaler must be 1 to 256"),
        ({"prompt": "x", "init_images": [data_url(png(8))] * 17}, "at most 16"),
    ]:
        r = await http.post("/v1/tasks", json={"type": "image-to-image", "params": params})
        assert r.status_code == 422 and words in r.json()["error"]["message"], r.text[:300]
    for field in ("model", "runtime"):
        r = await http.post("/v1/tasks", json={field: "", "params": PARAMS})
        assert r.status_code == 422 and field in r.json()["error"]["message"], r.text
    # Not an image: the reason, not PIL's repr of a BytesIO.
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    r = await http.post(
        "/v1/tasks", json={"type": "image-to-image", "params": {**PARAMS, "init_images": [garbage]}}
    )
    assert r.status_code == 422 and "not a readable image" in r.json()["error"]["message"], r.text
    assert "object at 0x" not in r.text
    # Static files are looked up among those shipped: a name past NAME_MAX was an OSError (500).
    assert (await http.get("/ui/static/ui.css")).status_code == 200
    for name in ("a" * 1000 + ".js", "..%2Fapp.py", "missing.js"):
        r = await http.get(f"/ui/static/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (name[:20], r.text[:200])
    assert (await http.get("/v1/tasks")).json()["tasks"] == [], "nothing refused was recorded"


async def test_prefer_wait_reads_ascii_digits_and_cuts_any_larger_wait(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    for asked in ("9999999", "0000000000000000000000005", "1" + "0" * 40):
        r = await fleet.http.post("/v1/tasks", json={"params": PARAMS}, headers={"prefer": f"wait={asked}"})
        applied = "wait=5" if asked.endswith("5") else "wait=60"
        assert r.status_code == 200 and r.headers["preference-applied"] == applied, (asked[:12], r.text)
    # "١" (ARABIC-INDIC DIGIT ONE) is a digit to \d and to int(), not to RFC 7240
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS}, headers={"prefer": "wait=١".encode()})
    assert r.status_code == 202 and "preference-applied" not in r.headers, r.text


async def test_a_body_sent_too_slowly_is_a_408_and_a_client_that_leaves_is_no_traceback(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtimes = {"synthetic": {"latency_s": 0.05}}
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes)
    settings.api.body_timeout_s = 1.0
    fleet = await start_fleet(QUEUE, settings=settings)
    port = settings.api.port
    head = "POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((head + "Content-Length: 100\r\n\r\n{").encode())
    await writer.drain()
    t0 = time.monotonic()
    status = await asyncio.wait_for(reader.readline(), 10)
    took = time.monotonic() - t0
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    await writer.wait_closed()
    assert status.startswith(b"HTTP/1.1 408"), (status, answer)
    assert b'"request_timeout"' in answer and 0.9 <= took < 5, (answer, took)

    # A client that leaves mid-body: the API says nothing to nobody and serves on.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((head + 'Content-Length: 100\r\n\r\n{"par').encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS})
    assert r.status_code == 202, r.text
    assert not [rec for rec in caplog.records if "Exception in ASGI application" in rec.getMessage()]


async def test_the_gallery_detail_shows_no_path_on_the_server(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """The ``.out`` JSON the agent stores lists storage locations: ``file://`` paths on local storage.
    The detail shows them as the links ``/v1/files`` gives (signed: an unsigned one is refused)."""
    fleet = await start(start_fleet, engine, models_dir)
    r = await fleet.http.post("/v1/tasks", json={"params": {**PARAMS, "batch_size": 2}})
    view = await fleet.wait(r.json()["id"], timeout_s=30)
    assert view["state"] == "succeeded", view
    r = await fleet.http.get(f"/ui/api/tasks/{view['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["params"]["seed"] == view["seed"] != -1, "the seed used, not the -1 asked"
    assert "file:" not in r.text and str(fleet.settings.data_dir.resolve()) not in r.text, r.text
    links = r.json()["output"]["images"]
    assert len(links) == 2 and all("/v1/files/" in link for link in links), links
    for link, image in zip(links, view["images"], strict=True):
        got = await fleet.http.get(link)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png", (link, got.text[:200])
        assert got.content == (await fleet.http.get(image["url"])).content


async def test_the_out_json_a_client_downloads_links_its_images_not_server_paths(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """The task view links the ``.out`` JSON; on local storage the agent wrote ``file://`` paths into it."""
    fleet = await start(start_fleet, engine, models_dir)
    r = await fleet.http.post("/v1/tasks", json={"params": {**PARAMS, "batch_size": 2}})
    view = await fleet.wait(r.json()["id"], timeout_s=30)
    assert view["state"] == "succeeded", view
    r = await fleet.http.get(view["output"]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert "file:" not in r.text and str(fleet.settings.data_dir.resolve()) not in r.text, r.text
    links = r.json()["images"]
    assert len(links) == 2 and r.json()["task_id"] == view["id"], r.text
    for link, image in zip(links, view["images"], strict=True):
        got = await fleet.http.get(link)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png", (link, got.text[:200])
        assert got.content == (await fleet.http.get(image["url"])).content


async def test_every_get_route_answers_head_with_the_gets_headers_and_no_body(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """RFC 9110 §9.3.2: HEAD was a 405 on every route (``curl -I``, link checkers, load balancers)."""
    fleet = await start(start_fleet, engine, models_dir, latency_s=2.0)
    http = fleet.http
    first = (await http.post("/v1/tasks", json={"params": PARAMS})).json()["id"]
    # A streamed answer (the events of a task still queued or running) ends once its headers are out.
    r = await http.head(f"/v1/tasks/{first}/events", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.headers
    assert r.content == b""
    view = await fleet.wait(first, timeout_s=30)
    assert view["state"] == "succeeded", view
    paths = ["/healthz", "/readyz", "/ui/static/ui.css", "/openapi.json", view["images"][0]["url"]]
    for path in paths:
        got, head = await http.get(path), await http.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code, head.text)
        assert head.content == b"", path
        for name in ("content-length", "content-type", "cache-control"):
            assert head.headers.get(name) == got.headers.get(name), (path, name)
    r = await http.head(f"/v1/tasks/{first}")
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 100
    assert (await http.head("/v1/tasks/t-missing")).status_code == 404
    # A path without GET has no HEAD either; a 405 lists HEAD beside every GET.
    r = await http.head(f"/v1/tasks/{first}/cancel")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    r = await http.delete("/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.headers


async def test_percent_encoded_input_urls_are_accepted_in_every_format(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Presigned S3 URLs and ``my%20cat.png`` were 422 ``is not an http(s) URL`` at the door."""
    fleet = await start(start_fleet, engine, models_dir)
    url = "http://127.0.0.1:9/in%20put.png?X-Amz-Credential=AKIA%2F20261202&X-Amz-Signature=ab"
    v1 = {"type": "image-to-image", "params": {**PARAMS, "init_images": [url]}}
    r = await fleet.http.post("/v1/tasks", json=v1)
    assert r.status_code == 202, r.text
    v1alpha2 = {
        "task": {
            "metadata": {"id": "presigned-1", "runtime": "sdruntime", "tasktype": "image-to-image"},
            "content": {"prompt": "a cat", "steps": 2, "alwayson_scripts": {"image_link": url}},
        }
    }
    r = await fleet.http.post("/v1alpha2/", json=v1alpha2)
    assert r.status_code == 200, r.text
    # A webhook URL of that form passes the form check; the URL guard then has its say.
    r = await fleet.http.post("/v1/tasks", json={"params": PARAMS, "webhook": {"url": url}})
    assert r.status_code == 422 and "loopback" in r.json()["error"]["message"], r.text


async def test_a_union_field_of_the_wrong_type_is_named_once_without_pydantic_internals(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir)
    body = {
        "task": {
            "metadata": {"id": True, "runtime": "sdruntime", "tasktype": "text-to-image"},
            "content": {"prompt": "a cat", "steps": 2},
        }
    }
    r = await fleet.http.post("/v1alpha2/", json=body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    expected = "task.metadata.id: Input should be a valid string or a valid integer (got True)"
    assert message == expected, message


async def test_an_idle_keep_alive_connection_outlives_uvicorns_five_seconds(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Closed after 5 s idle (uvicorn's default), a pooled connection races the next request: a
    load balancer with a longer idle timeout (an ALB: 60 s) answers that request with a 502."""
    from sdfleet.serve import KEEP_ALIVE_S

    assert KEEP_ALIVE_S > 60
    fleet = await start(start_fleet, engine, models_dir)
    host, port = fleet.api_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for n in range(2):
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
            )
            await reader.readexactly(length)
            if n == 0:
                await asyncio.sleep(6.5)  # past uvicorn's default
    finally:
        writer.close()
        await writer.wait_closed()
