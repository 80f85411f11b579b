"""The ``a1111`` runtime against ``sdfleet runtime serve`` over real HTTP on 127.0.0.1.

Every body the runtime sends is validated against mirrors of SD WebUI's own request models.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from fakes.a1111_models import REQUEST_MODELS
from fakes.servers import ServerThread, a1111_server, free_port
from sdfleet.errors import Interrupted, ModelLoadError, Reject, RuntimeFailure
from sdfleet.guarded_http import InputFetcher
from sdfleet.models import ModelCatalog
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.a1111 import A1111Runtime
from sdfleet.runtimes.base import Job
from sdfleet.tasks import TaskParams, TaskType


def png(colour: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("models")
    srv = a1111_server(root, free_port())
    broken = root / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images_server() -> Iterator[ServerThread]:
    async def image(_: Any) -> Response:
        return Response(png((1, 2, 3)), media_type="image/png")

    srv = ServerThread(Starlette(routes=[Route("/cat.png", image)]), free_port()).start()
    yield srv
    srv.stop()


class Recorder:
    """Every request the runtime sends; generation bodies are checked against SD WebUI's models."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []

    async def __call__(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.requests.append((request.method, path, body))
        if path in REQUEST_MODELS:
            REQUEST_MODELS[path].model_validate(body)  # raises (fails the call) on a foreign field/type

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))

    def last(self, path: str) -> Any:
        return next(b for _, p, b in reversed(self.requests) if p == path)


@pytest.fixture
async def runtime(server: ServerThread) -> AsyncIterator[A1111Runtime]:
    recorder = Recorder()
    client = httpx.AsyncClient(base_url=server.url, timeout=60, event_hooks={"request": [recorder]})
    fetcher = InputFetcher(max_bytes=1 << 20, timeout_s=5, allow_private=False)
    rt = A1111Runtime(client, fetcher=fetcher, default_model="tiny-a", poll_s=0.02, ready_timeout_s=5)
    rt.recorder = recorder  # type: ignore[attr-defined]
    await rt.start()
    yield rt
    await rt.aclose()


def job(kind: TaskType = TaskType.TEXT_TO_IMAGE, model: str | None = None, **params: Any) -> Job:
    init = params.pop("init", [])
    base: dict[str, Any] = {"prompt": "a red cat", "steps": 2, "width": 64, "height": 64, "seed": 9}
    base.update(params)
    return Job("t-1", kind, model, TaskParams.model_validate(base), init_images=init)


async def no_progress(_: float) -> None:
    return None


def size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


async def test_every_task_type(runtime: A1111Runtime) -> None:
    rec: Recorder = runtime.recorder  # type: ignore[attr-defined]
    t2i = await runtime.run(job(batch_size=2, sampler="DPM++ 2M Karras"), no_progress)
    again = await runtime.run(job(batch_size=2, sampler="DPM++ 2M Karras"), no_progress)
    assert [size(i) for i in t2i.images] == [(64, 64), (64, 64)] and t2i.images == again.images
    assert t2i.seed == 9 and t2i.info["all_seeds"] == [9, 10] and t2i.info["runtime"] == "a1111"
    assert rec.last("/sdapi/v1/txt2img")["sampler_name"] == "DPM++ 2M Karras"
    i2i = await runtime.run(job(TaskType.IMAGE_TO_IMAGE, init=[png()], denoising_strength=0.5), no_progress)
    assert [size(i) for i in i2i.images] == [(64, 64)]
    sent = rec.last("/sdapi/v1/img2img")
    assert base64.b64decode(sent["init_images"][0]) == png() and sent["denoising_strength"] == 0.5
    single = await runtime.run(
        job(TaskType.EXTRA_SINGLE_IMAGE, init=[png()], upscaling_resize=2), no_progress
    )
    assert [size(i) for i in single.images] == [(128, 128)]
    batch = await runtime.run(
        job(
            TaskType.EXTRA_BATCH_IMAGES,
            init=[png(), png((1, 1, 1))],
            upscaler="Nearest",
            upscaling_resize=0.5,
        ),
        no_progress,
    )
    assert [size(i) for i in batch.images] == [(32, 32), (32, 32)]
    assert [f["name"] for f in rec.last("/sdapi/v1/extra-batch-images")["imageList"]] == [
        "image00001",
        "image00002",
    ]
    assert sum(rec.count("POST", p) for p in REQUEST_MODELS) == 5  # each validated by the hook
    with pytest.raises(ValidationError):  # the mirrors are strict: a field SD WebUI lacks fails
        REQUEST_MODELS["/sdapi/v1/txt2img"].model_validate({**rec.last("/sdapi/v1/txt2img"), "sampler": "x"})
    with pytest.raises(ValidationError):
        REQUEST_MODELS["/sdapi/v1/txt2img"].model_validate({"steps": "2"})


async def test_model_switch_only_when_needed(runtime: A1111Runtime) -> None:
    rec: Recorder = runtime.recorder  # type: ignore[attr-defined]
    assert rec.count("POST", "/sdapi/v1/options") == 0  # the WebUI had tiny-a already
    same = await runtime.run(job(model="tiny-a"), no_progress)
    assert rec.count("POST", "/sdapi/v1/options") == 0
    assert same.switch_s == 0.0, "a lookup is no switch: no model.switch span, no switch counted"
    b = await runtime.run(job(model="tiny-b"), no_progress)
    assert b.switch_s > 0.0
    assert (
        rec.count("POST", "/sdapi/v1/options") == 1 and b.info["sd_model_checkpoint"] == "tiny-b.safetensors"
    )
    title = runtime.loaded_model
    assert title is not None and title.startswith("tiny-b.safetensors [")
    for name in ("tiny-b.safetensors", title, "tiny-b"):
        assert (await runtime.run(job(model=name), no_progress)).switch_s == 0.0
    assert rec.count("POST", "/sdapi/v1/options") == 1
    assert rec.last("/sdapi/v1/options") == {"sd_model_checkpoint": title}
    await runtime.run(job(model="tiny-a"), no_progress)
    assert rec.count("POST", "/sdapi/v1/options") == 2 and runtime.switches == 2
    with pytest.raises(Reject) as unknown:
        await runtime.run(job(model="no-such-model"), no_progress)
    assert unknown.value.code == "unknown_model"


async def test_progress_and_interrupt(runtime: A1111Runtime) -> None:
    seen: list[float] = []

    async def record(value: float) -> None:
        seen.append(value)

    await runtime.run(job(steps=60), record)
    assert seen[-1] == 1.0 and any(0 < v < 1 for v in seen) and seen == sorted(seen)
    started = asyncio.Event()

    async def on_progress(value: float) -> None:
        if 0 < value < 1:
            started.set()

    run = asyncio.create_task(runtime.run(job(steps=150), on_progress))
    await asyncio.wait_for(started.wait(), timeout=60)
    await runtime.interrupt()
    with pytest.raises(Interrupted):
        await run
    rec: Recorder = runtime.recorder  # type: ignore[attr-defined]
    assert rec.count("POST", "/sdapi/v1/interrupt") == 1
    assert len((await runtime.run(job(), no_progress)).images) == 1  # usable afterwards


async def test_urls_inlined_routing_keys_stripped_refused_url_fails(
    runtime: A1111Runtime, images_server: ServerThread
) -> None:
    rec: Recorder = runtime.recorder  # type: ignore[attr-defined]
    scripts = {
        "task": "text-to-image",
        "sd_model_checkpoint": "tiny-a",
        "id_task": "1",
        "save_dir": "out",
        "image_link": "http://x",
        "controlnet": {"args": [{"input_image": f"{images_server.url}/cat.png", "weight": 1.0}]},
    }
    extra = {
        "alwayson_scripts": scripts,
        "restore_faces": False,
        "override_settings": {"eta_noise_seed_delta": 0},
    }
    with pytest.raises(Reject) as refused:  # 127.0.0.1 is not a public address
        await runtime.run(job(extra=extra), no_progress)
    assert refused.value.code == "url_refused" and rec.count("POST", "/sdapi/v1/txt2img") == 0
    assert runtime.fetcher is not None
    runtime.fetcher.allow_private = True
    await runtime.run(job(extra=extra, clip_skip=2), no_progress)
    body = rec.last("/sdapi/v1/txt2img")
    assert list(body["alwayson_scripts"]) == ["controlnet"]
    arg = body["alwayson_scripts"]["controlnet"]["args"][0]
    assert base64.b64decode(arg["input_image"]) == png((1, 2, 3)) and arg["weight"] == 1.0
    assert body["override_settings"] == {"eta_noise_seed_delta": 0, "CLIP_stop_at_last_layers": 2}
    assert body["restore_faces"] is False


async def test_errors_are_mapped(runtime: A1111Runtime, server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(Reject) as bad_sampler:  # 4xx: fails at once, with the WebUI's own message
        await runtime.run(job(sampler="No Such Sampler"), no_progress)
    assert "404" in bad_sampler.value.reason and "No Such Sampler" in bad_sampler.value.reason
    with pytest.raises(RuntimeFailure) as broken:  # 5xx: retryable
        await runtime.run(job(model="broken"), no_progress)
    assert "500" in broken.value.message and "broken" in broken.value.message
    assert len((await runtime.run(job(model="tiny-a"), no_progress)).images) == 1
    with pytest.raises(Reject) as pipeline:
        await runtime.run(job(TaskType.PIPELINE, workflow={"1": {}}), no_progress)
    assert pipeline.value.code == "unsupported_task"
    down = build_runtime(
        "a1111",
        catalog=ModelCatalog(tmp_path),
        options={"url": f"http://127.0.0.1:{free_port()}", "ready_timeout_s": 0.3},
    )
    assert isinstance(down, A1111Runtime) and str(down.client.base_url).startswith("http://127.0.0.1:")
    try:
        with pytest.raises(ModelLoadError, match="not ready"):
            await down.start()
        with pytest.raises(RuntimeFailure, match="unreachable"):
            await down.run(job(), no_progress)
    finally:
        await down.aclose()
