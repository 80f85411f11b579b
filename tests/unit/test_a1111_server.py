"""``sdfleet runtime serve`` driven by the third-party ``webuiapi`` client over real HTTP (127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import webuiapi
from PIL import Image

from fakes.servers import ServerThread, a1111_server, free_port

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = a1111_server(tmp_path_factory.mktemp("models"), free_port())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server: ServerThread) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=2)


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def test_txt2img_fixed_seed_is_repeatable(api: webuiapi.WebUIApi) -> None:
    first = api.txt2img(prompt="a red cat", seed=42, batch_size=2, **SMALL)
    again = api.txt2img(prompt="a red cat", seed=42, batch_size=2, **SMALL)
    other = api.txt2img(prompt="a red cat", seed=43, **SMALL)
    assert [i.size for i in first.images] == [(64, 64), (64, 64)]
    assert [pixels(i) for i in first.images] == [pixels(i) for i in again.images]
    assert pixels(first.images[0]) != pixels(other.images[0])
    assert first.info["all_seeds"] == [42, 43] and first.info["sampler_name"] == "Euler a"
    assert first.parameters["prompt"] == "a red cat" and first.parameters["steps"] == 2
    assert "Seed: 42" in first.info["infotexts"][0]


def test_img2img_and_extras(api: webuiapi.WebUIApi) -> None:
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    out = api.img2img(images=[source], prompt="a blue cat", seed=7, denoising_strength=0.5, **SMALL)
    again = api.img2img(images=[source], prompt="a blue cat", seed=7, denoising_strength=0.5, **SMALL)
    assert out.images[0].size == (64, 64) and pixels(out.images[0]) == pixels(again.images[0])
    single = api.extra_single_image(image=source, upscaling_resize=2)
    assert single.images[0].size == (128, 128)
    batch = api.extra_batch_images(images=[source, source], upscaler_1="Nearest", upscaling_resize=1.5)
    assert [i.size for i in batch.images] == [(96, 96), (96, 96)]


def test_options_models_and_switching(api: webuiapi.WebUIApi) -> None:
    models = api.get_sd_models()
    assert sorted(m["model_name"] for m in models) == ["tiny-a", "tiny-b"]
    by_name = {m["model_name"]: m for m in models}
    assert by_name["tiny-b"]["title"] == f"tiny-b.safetensors [{by_name['tiny-b']['hash']}]"
    assert by_name["tiny-b"]["sha256"].startswith(by_name["tiny-b"]["hash"])
    assert api.util_get_current_model() == by_name["tiny-a"]["title"]
    a = api.txt2img(prompt="x", seed=1, **SMALL)
    api.util_set_model(by_name["tiny-b"]["title"], find_closest=False)  # POSTs /options
    assert api.util_get_current_model() == by_name["tiny-b"]["title"]
    b = api.txt2img(prompt="x", seed=1, **SMALL)
    assert b.info["sd_model_checkpoint"] == "tiny-b.safetensors"
    assert pixels(a.images[0]) != pixels(b.images[0])
    api.set_options({"sd_model_checkpoint": by_name["tiny-a"]["title"], "CLIP_stop_at_last_layers": 2})
    clipped = api.txt2img(prompt="x", seed=1, **SMALL)
    assert clipped.info["clip_skip"] == 2 and api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})
    assert api.util_get_current_model() == by_name["tiny-a"]["title"]


def test_lists_and_errors(api: webuiapi.WebUIApi, server: ServerThread) -> None:
    assert {"Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert {u["name"] for u in api.get_upscalers()} == {"None", "Lanczos", "Nearest"}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    with pytest.raises(RuntimeError) as bad_sampler:
        api.txt2img(prompt="x", sampler_name="No Such Sampler", **SMALL)
    assert bad_sampler.value.args[0] == 404 and "No Such Sampler" in bad_sampler.value.args[1]
    bad_model = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert bad_model.status_code == 404 and bad_model.json()["error"] == "Reject"
    url = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": ["http://127.0.0.1/x.png"]})
    assert url.status_code == 422 and "not fetched" in url.json()["detail"]


async def test_progress_and_interrupt_while_running(server: ServerThread) -> None:
    async with httpx.AsyncClient(base_url=f"{server.url}/sdapi/v1", timeout=60) as client:
        body = {"prompt": "long", "seed": 3, "width": 64, "height": 64, "steps": 150}
        run = asyncio.create_task(client.post("/txt2img", json=body))
        seen = 0.0
        for _ in range(400):
            state = (await client.get("/progress")).json()
            seen = state["progress"]
            if seen > 0:
                break
            await asyncio.sleep(0.02)
        assert 0 < seen < 1 and state["state"]["sampling_steps"] == 150 and state["state"]["job_count"] == 1
        assert (await client.post("/interrupt")).json() == {}
        resp = await run
        assert resp.status_code == 200 and resp.json()["images"] == []
        assert (await client.get("/progress")).json()["state"]["job_count"] == 0
