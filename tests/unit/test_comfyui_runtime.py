"""The ``comfyui`` runtime against a protocol-faithful ComfyUI test server (HTTP + websocket, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import copy
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from fakes.comfyui_server import FakeComfyUI
from fakes.servers import ServerThread, free_port
from sdfleet.errors import Interrupted, ModelLoadError, Reject, RuntimeFailure
from sdfleet.models import ModelCatalog
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.comfyui import ComfyUIRuntime
from sdfleet.tasks import TaskParams, TaskType
from seed_payloads import V1ALPHA2_PIPELINE

INPUT = (5, 6, 7)


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def comfy() -> Iterator[tuple[FakeComfyUI, ServerThread]]:
    fake = FakeComfyUI()
    srv = ServerThread(fake.app, free_port()).start()
    yield fake, srv
    srv.stop()


@pytest.fixture(scope="module")
def images_server() -> Iterator[ServerThread]:
    async def image(_: Any) -> Response:
        return Response(png(INPUT), media_type="image/png")

    srv = ServerThread(Starlette(routes=[Route("/in.png", image)]), free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture
async def runtime(comfy: tuple[FakeComfyUI, ServerThread], tmp_path: Path) -> AsyncIterator[ComfyUIRuntime]:
    options = {"url": comfy[1].url, "allow_private_inputs": True, "ready_timeout_s": 5}
    rt = build_runtime("comfyui", catalog=ModelCatalog(tmp_path), options=options)
    assert isinstance(rt, ComfyUIRuntime)
    await rt.start()
    yield rt
    await rt.aclose()


def workflow(steps: int = 4, size: int = 64) -> dict[str, Any]:
    flow: dict[str, Any] = copy.deepcopy(V1ALPHA2_PIPELINE["task"]["content"])
    flow["3"]["inputs"]["steps"] = steps
    flow["5"]["inputs"].update(width=size, height=size)
    return flow


def job(flow: dict[str, Any], kind: TaskType = TaskType.PIPELINE) -> Job:
    return Job("t-1", kind, None, TaskParams(workflow=flow))


async def test_seed_pipeline_workflow_with_progress(
    runtime: ComfyUIRuntime, comfy: tuple[FakeComfyUI, ServerThread]
) -> None:
    seen: list[float] = []

    async def record(value: float) -> None:
        seen.append(value)

    result = await runtime.run(job(workflow(steps=4, size=48)), record)
    assert [Image.open(io.BytesIO(i)).size for i in result.images] == [(48, 48)]
    assert seen == [0.25, 0.5, 0.75, 0.99, 1.0]  # 1.0 only once the results are read
    sent = comfy[0].prompts[-1]
    assert sent["prompt"] == workflow(steps=4, size=48) and len(sent["client_id"]) == 32
    assert result.info["prompt_id"] in comfy[0].history and runtime.loaded_model is None


async def test_load_image_url_is_fetched_and_uploaded(
    runtime: ComfyUIRuntime, comfy: tuple[FakeComfyUI, ServerThread], images_server: ServerThread
) -> None:
    flow = workflow()
    flow["10"] = {"inputs": {"image": f"{images_server.url}/in.png"}, "class_type": "LoadImage"}
    await runtime.run(job(flow), lambda _: asyncio.sleep(0))
    name = comfy[0].prompts[-1]["prompt"]["10"]["inputs"]["image"]
    assert name.startswith("sdfleet-") and comfy[0].inputs[name] == png(INPUT)
    assert runtime.fetcher is not None
    runtime.fetcher.allow_private = False
    flow["10"]["inputs"]["image"] = f"{images_server.url}/in.png"
    with pytest.raises(Reject) as refused:
        await runtime.run(job(flow), lambda _: asyncio.sleep(0))
    assert refused.value.code == "url_refused"
    flow["10"]["inputs"]["image"] = "not-uploaded.png"  # ComfyUI's own validation: 400 → Reject
    with pytest.raises(Reject, match="Invalid image file"):
        await runtime.run(job(flow), lambda _: asyncio.sleep(0))


async def test_interrupt(runtime: ComfyUIRuntime, comfy: tuple[FakeComfyUI, ServerThread]) -> None:
    started = asyncio.Event()

    async def on_progress(value: float) -> None:
        started.set()

    run = asyncio.create_task(runtime.run(job(workflow(steps=2000)), on_progress))
    await asyncio.wait_for(started.wait(), timeout=10)
    await runtime.interrupt()
    with pytest.raises(Interrupted):
        await run
    assert comfy[0].interrupts == 1
    assert len((await runtime.run(job(workflow()), lambda _: asyncio.sleep(0))).images) == 1


async def test_execution_errors_and_wrong_tasks(runtime: ComfyUIRuntime, tmp_path: Path) -> None:
    flow = workflow()
    flow["8"] = {
        "inputs": {"message": "mat1 and mat2 shapes cannot be multiplied"},
        "class_type": "RaiseError",
    }
    with pytest.raises(Reject) as failed:
        await runtime.run(job(flow), lambda _: asyncio.sleep(0))
    assert (
        failed.value.code == "workflow_error" and "RaiseError (node 8): mat1 and mat2" in failed.value.reason
    )
    flow["8"]["inputs"]["type"] = "torch.OutOfMemoryError"
    with pytest.raises(RuntimeFailure, match="out of memory"):  # retryable
        await runtime.run(job(flow), lambda _: asyncio.sleep(0))
    with pytest.raises(Reject, match="pipeline"):
        await runtime.run(job(workflow(), TaskType.TEXT_TO_IMAGE), lambda _: asyncio.sleep(0))
    down = build_runtime(
        "comfyui",
        catalog=ModelCatalog(tmp_path),
        options={"url": f"http://127.0.0.1:{free_port()}", "ready_timeout_s": 0.3},
    )
    try:
        with pytest.raises(ModelLoadError, match="not ready"):
            await down.start()
        with pytest.raises(RuntimeFailure):
            await down.run(job(workflow()), lambda _: asyncio.sleep(0))
    finally:
        await down.aclose()
