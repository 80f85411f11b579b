"""The ``comfyui`` runtime against the ComfyUI test server (HTTP + websocket on 127.0.0.1).

The server follows real ComfyUI where the runtime depends on it (``tests/fakes/comfyui_server.py``):
history written after ``execution_success``, 200 with ``node_errors``, ``/interrupt`` that only
stops the prompt it names when it runs, ``/queue`` delete, one FIFO queue run one prompt at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fakes.comfyui_server import FakeComfyUI
from fakes.comfyui_workflows import img2img, preview_only, txt2img, with_load_image
from fakes.servers import ServerThread, free_port
from sdfleet.errors import InputUnavailable, Interrupted, ModelLoadError, Reject, RuntimeFailure
from sdfleet.models import ModelCatalog
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.comfyui import ComfyUIRuntime
from sdfleet.tasks import TaskParams, TaskType

Comfy = tuple[FakeComfyUI, ServerThread]


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def comfy() -> Iterator[Comfy]:
    fake = FakeComfyUI()
    srv = ServerThread(fake.app, free_port()).start()
    yield fake, srv
    fake.paused = False
    srv.stop()


class Inputs:
    """Serves ``/a.png`` and ``/b.png``; ``/held.png`` answers only once ``release`` is set;
    ``/busy.png`` is 503."""

    def __init__(self) -> None:
        self.asked, self.release = threading.Event(), threading.Event()

    async def image(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "held.png":
            self.asked.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        if name == "busy.png":
            return Response(b"try again later", status_code=503)
        return Response(png((5, 6, 7) if name != "b.png" else (8, 9, 10)), media_type="image/png")


@pytest.fixture
def inputs() -> Iterator[tuple[Inputs, str]]:
    served = Inputs()
    srv = ServerThread(Starlette(routes=[Route("/{name}", served.image)]), free_port()).start()
    yield served, srv.url
    served.release.set()
    srv.stop()


@pytest.fixture
async def runtime(comfy: Comfy, tmp_path: Path) -> AsyncIterator[ComfyUIRuntime]:
    options = {"url": comfy[1].url, "allow_private_inputs": True, "ready_timeout_s": 5}
    rt = build_runtime("comfyui", catalog=ModelCatalog(tmp_path), options=options)
    assert isinstance(rt, ComfyUIRuntime)
    await rt.start()
    yield rt
    await rt.aclose()


def job(flow: dict[str, Any], task_id: str = "t-1", kind: TaskType = TaskType.PIPELINE) -> Job:
    return Job(task_id, kind, None, TaskParams(workflow=flow))


async def nothing(_: float) -> None:
    return None


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait for a state of the test server (a bound against hangs, not a timing assertion)."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def foreign_prompt(comfy: Comfy, flow: dict[str, Any]) -> str:
    """Queue ``flow`` as another client of the same ComfyUI would."""
    async with httpx.AsyncClient(base_url=comfy[1].url) as client:
        answer = await client.post("/prompt", json={"prompt": flow, "client_id": uuid.uuid4().hex})
    return str(answer.json()["prompt_id"])


def running(comfy: Comfy) -> str | None:
    return comfy[0].running[1] if comfy[0].running else None


def pending(comfy: Comfy) -> list[str]:
    return [item[1] for item in comfy[0].pending]


def saved(comfy: Comfy, prompt_id: str) -> list[bytes]:
    """The bytes of the images ComfyUI saved for ``prompt_id``."""
    fake = comfy[0]
    refs = [i for out in fake.history[prompt_id]["outputs"].values() for i in out["images"]]
    return [fake.files[r["type"]][f"{r['subfolder']}/{r['filename']}".lstrip("/")] for r in refs]


async def test_seed_pipeline_workflow_with_progress(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    seen: list[float] = []

    async def record(value: float) -> None:
        seen.append(value)

    result = await runtime.run(job(txt2img(steps=4, size=48)), record)
    assert [Image.open(io.BytesIO(i)).size for i in result.images] == [(48, 48)]
    assert seen == [0.25, 0.5, 0.75, 0.99, 1.0]  # 1.0 only once the results are read
    sent = comfy[0].prompts[-1]
    assert sent["prompt"] == txt2img(steps=4, size=48) and sent["client_id"] == runtime.events.client_id
    assert result.images == saved(comfy, result.info["prompt_id"]) and runtime.loaded_model is None
    assert runtime.max_in_flight == 2 and result.info["run_s"] >= 4 * comfy[0].step_s


async def test_history_is_read_only_once_written(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    """Defect 1: ComfyUI sends ``execution_success`` before ``/history`` has the entry."""
    comfy[0].history_delay_s = 0.5
    result = await runtime.run(job(txt2img(steps=2)), nothing)
    assert len(result.images) == 1 and result.images == saved(comfy, result.info["prompt_id"])


async def test_partly_invalid_workflow_is_rejected_and_not_run(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    """Defect 2: ComfyUI answers 200 with ``node_errors`` and would run the valid outputs only."""
    comfy[0].paused = True  # whatever got queued stays there or stays running
    flow = with_load_image(txt2img(steps=3), "missing.png")
    with pytest.raises(Reject) as rejected:
        await asyncio.wait_for(runtime.run(job(flow), nothing), 10)
    assert rejected.value.code == "invalid_workflow"
    assert (
        "node 10 (LoadImage): Custom validation failed for node: image - Invalid image file: missing.png"
        in rejected.value.reason
    )
    prompt_id = comfy[0].accepted[-1]
    await until(lambda: running(comfy) is None, "the partial prompt stopped")
    assert prompt_id in comfy[0].deleted or comfy[0].history[prompt_id]["status"]["status_str"] == "error"


async def test_refused_workflow_names_every_node_error(runtime: ComfyUIRuntime) -> None:
    """A 400 reports node id, class and message per error, not raw JSON cut at 500 characters."""
    flow = with_load_image(with_load_image(preview_only(), "gone-" + "x" * 400 + ".png"), "lost.png", "12")
    del flow["9"]  # only the two LoadImage outputs are left: none is valid → 400
    with pytest.raises(Reject) as rejected:
        await runtime.run(job(flow), nothing)
    reason = rejected.value.reason
    assert rejected.value.code == "invalid_workflow" and reason.startswith(
        "ComfyUI refused the workflow: Prompt outputs failed validation; "
    )
    invalid = "Custom validation failed for node: image - Invalid image file:"
    assert f"node 10 (LoadImage): {invalid} gone-{'x' * 400}.png" in reason
    assert (
        "node 12 (LoadImage): Custom validation failed for node: image - Invalid image file: lost.png"
        in reason
    )
    flow = txt2img()
    flow["3"]["class_type"] = "NoSuchSampler"
    with pytest.raises(Reject, match=r"node NoSuchSampler does not exist\.: Node ID '#3'"):
        await runtime.run(job(flow), nothing)


async def test_interrupt_deletes_a_queued_prompt(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    """Defect 3: ``/interrupt {prompt_id}`` skips a prompt that waits; it must leave the queue."""
    comfy[0].paused = True
    other = await foreign_prompt(comfy, txt2img(steps=3))
    await until(lambda: running(comfy) == other, "the other client's prompt runs")
    run = asyncio.create_task(runtime.run(job(txt2img(), "mine"), nothing))
    await until(lambda: len(pending(comfy)) == 1, "our prompt waits behind it")
    ours = pending(comfy)[0]
    await runtime.interrupt("mine")
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run, 10)
    assert comfy[0].deleted == [ours] and running(comfy) == other
    comfy[0].paused = False
    await until(lambda: other in comfy[0].history, "the other client's prompt ends")
    assert comfy[0].history[other]["status"]["status_str"] == "success" and ours not in comfy[0].history


async def test_interrupt_never_stops_other_clients(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    """Defect 4: an empty ``/interrupt`` stops whatever runs, another client's prompt included."""
    comfy[0].paused = True
    other = await foreign_prompt(comfy, txt2img(steps=3))
    await until(lambda: running(comfy) == other, "the other client's prompt runs")
    await runtime.interrupt()
    await runtime.interrupt("not-ours")
    run = asyncio.create_task(runtime.run(job(txt2img(), "mine"), nothing))
    await until(lambda: len(pending(comfy)) == 1, "our prompt waits behind it")
    await runtime.interrupt()
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run, 10)
    assert None not in comfy[0].interrupt_calls and other not in comfy[0].interrupt_calls
    comfy[0].paused = False
    await until(lambda: other in comfy[0].history, "the other client's prompt ends")
    assert comfy[0].history[other]["status"]["status_str"] == "success"


async def test_interrupt_before_the_prompt_is_queued(
    runtime: ComfyUIRuntime, comfy: Comfy, inputs: tuple[Inputs, str]
) -> None:
    served, url = inputs
    run = asyncio.create_task(runtime.run(job(img2img(f"{url}/held.png"), "mine"), nothing))
    await asyncio.get_running_loop().run_in_executor(None, served.asked.wait, 10)
    await runtime.interrupt("mine")
    served.release.set()
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run, 10)
    assert comfy[0].prompts == [] and comfy[0].history == {}


async def test_preview_only_workflow_is_rejected(runtime: ComfyUIRuntime) -> None:
    """Defect 5: ``temp`` outputs only is the client's mistake: Reject, no retry."""
    with pytest.raises(Reject, match="only images are previews") as rejected:
        await runtime.run(job(preview_only(steps=2)), nothing)
    assert rejected.value.code == "no_saved_outputs"


async def test_uploads_are_content_addressed(
    runtime: ComfyUIRuntime, comfy: Comfy, inputs: tuple[Inputs, str]
) -> None:
    """Repeated inputs reuse one file in ``input/sdfleet/`` instead of piling up."""
    _, url = inputs
    runtime.api.today = lambda: "2026-12-01"  # a folder per UTC day, which an operator may prune
    for image in ("a.png", "a.png", "b.png", "a.png"):
        await runtime.run(job(img2img(f"{url}/{image}", steps=2)), nothing)
    names = [p["prompt"]["10"]["inputs"]["image"] for p in comfy[0].prompts]
    a, b = (f"sdfleet/2026-12-01/{hashlib.sha256(png(c)).hexdigest()}.png" for c in ((5, 6, 7), (8, 9, 10)))
    assert names == [a, a, b, a] and sorted(comfy[0].files["input"]) == sorted([a, b])
    assert comfy[0].files["input"][a] == png((5, 6, 7))
    assert runtime.fetcher is not None
    runtime.fetcher.allow_private = False
    with pytest.raises(Reject) as refused:
        await runtime.run(job(img2img(f"{url}/a.png")), nothing)
    assert refused.value.code == "url_refused"
    runtime.fetcher.allow_private = True
    with pytest.raises(InputUnavailable, match="HTTP 503") as unavailable:  # may come back: retried
        await runtime.run(job(img2img(f"{url}/busy.png")), nothing)
    assert unavailable.value.code == "input_fetch_failed"
    assert len(comfy[0].prompts) == 4  # the prompt was never queued


async def test_cancelled_run_drops_its_prompt(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    """A caller's timeout cancels ``run``; the prompt must not go on using the GPU for nobody."""
    comfy[0].paused = True
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(runtime.run(job(txt2img(steps=3)), nothing), 0.5)
    prompt_id = comfy[0].accepted[-1]
    assert prompt_id in comfy[0].interrupt_calls
    await until(lambda: prompt_id in comfy[0].history, "the prompt stops")
    assert comfy[0].history[prompt_id]["status"]["status_str"] == "error"


async def test_websocket_drop_mid_run(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    comfy[0].paused = True
    started = asyncio.Event()

    async def on_progress(_: float) -> None:
        started.set()

    run = asyncio.create_task(runtime.run(job(txt2img(steps=3)), on_progress))
    await asyncio.wait_for(started.wait(), 10)
    comfy[0].call(comfy[0].drop_sockets())
    comfy[0].paused = False
    result = await asyncio.wait_for(run, 10)
    assert result.images == saved(comfy, result.info["prompt_id"])


async def test_server_gone_mid_run_fails_it_for_a_retry(comfy: Comfy, tmp_path: Path) -> None:
    options = {"url": comfy[1].url, "reconnect_s": 0.5}
    rt = build_runtime("comfyui", catalog=ModelCatalog(tmp_path), options=options)
    comfy[0].paused = True
    started = asyncio.Event()

    async def on_progress(_: float) -> None:
        started.set()

    try:
        run = asyncio.create_task(rt.run(job(txt2img(steps=3)), on_progress))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.get_running_loop().run_in_executor(None, comfy[1].stop)
        with pytest.raises(RuntimeFailure, match="lost ComfyUI's websocket"):
            await asyncio.wait_for(run, 10)
    finally:
        await rt.aclose()


async def test_interrupt_running_prompt(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    started = asyncio.Event()

    async def on_progress(value: float) -> None:
        started.set()

    run = asyncio.create_task(runtime.run(job(txt2img(steps=2000)), on_progress))
    await asyncio.wait_for(started.wait(), timeout=10)
    ours = running(comfy)
    await runtime.interrupt()
    with pytest.raises(Interrupted):
        await run
    assert ours is not None and comfy[0].interrupt_calls == [ours]
    assert len((await runtime.run(job(txt2img()), nothing)).images) == 1


async def test_execution_errors_and_wrong_tasks(runtime: ComfyUIRuntime, tmp_path: Path) -> None:
    flow = txt2img()
    flow["8"] = {
        "inputs": {"message": "mat1 and mat2 shapes cannot be multiplied"},
        "class_type": "RaiseError",
    }
    with pytest.raises(Reject) as failed:
        await runtime.run(job(flow), nothing)
    assert (
        failed.value.code == "workflow_error" and "RaiseError (node 8): mat1 and mat2" in failed.value.reason
    )
    flow["8"]["inputs"]["type"] = "torch.OutOfMemoryError"
    with pytest.raises(RuntimeFailure, match="out of memory"):  # retryable
        await runtime.run(job(flow), nothing)
    with pytest.raises(Reject, match="cannot run 'text-to-image' tasks") as wrong:
        await runtime.run(job(txt2img(), kind=TaskType.TEXT_TO_IMAGE), nothing)
    assert wrong.value.code == "unsupported_task"
    down = build_runtime(
        "comfyui",
        catalog=ModelCatalog(tmp_path),
        options={"url": f"http://127.0.0.1:{free_port()}", "ready_timeout_s": 0.3},
    )
    try:
        with pytest.raises(ModelLoadError, match="not ready"):
            await down.start()
        with pytest.raises(RuntimeFailure):
            await down.run(job(txt2img()), nothing)
    finally:
        await down.aclose()


# Several runs in flight (max_in_flight = 2): each its own prompt, progress, images and interrupt.


class Recorder:
    def __init__(self) -> None:
        self.seen: list[float] = []
        self.started = asyncio.Event()

    async def __call__(self, value: float) -> None:
        self.seen.append(value)
        self.started.set()


async def two_in_flight(runtime: ComfyUIRuntime, comfy: Comfy) -> tuple[asyncio.Task[Any], ...]:
    """Run "a" (4 steps, seed 1) and "b" (5 steps, seed 2) at once, held with "a" running and "b"
    queued behind it at the server."""
    comfy[0].paused = True
    a, b = Recorder(), Recorder()
    run_a = asyncio.create_task(runtime.run(job(txt2img(steps=4, seed=1), "a"), a))
    await asyncio.wait_for(a.started.wait(), 10)
    run_b = asyncio.create_task(runtime.run(job(txt2img(steps=5, seed=2), "b"), b))
    await until(lambda: len(pending(comfy)) == 1, "b waits at the server while a runs")
    return run_a, run_b


async def test_two_runs_in_flight_keep_their_own_progress_and_images(
    runtime: ComfyUIRuntime, comfy: Comfy
) -> None:
    a, b = Recorder(), Recorder()
    comfy[0].paused = True
    run_a = asyncio.create_task(runtime.run(job(txt2img(steps=4, seed=1), "a"), a))
    run_b = asyncio.create_task(runtime.run(job(txt2img(steps=5, seed=2), "b"), b))
    await until(lambda: running(comfy) is not None and len(pending(comfy)) == 1, "both queued at once")
    comfy[0].paused = False
    result_a, result_b = await asyncio.wait_for(asyncio.gather(run_a, run_b), 10)
    assert a.seen == [0.25, 0.5, 0.75, 0.99, 1.0] and b.seen == [0.2, 0.4, 0.6, 0.8, 0.99, 1.0]
    assert result_a.images == saved(comfy, result_a.info["prompt_id"])
    assert result_b.images == saved(comfy, result_b.info["prompt_id"]) and result_a.images != result_b.images
    assert {p["prompt"]["3"]["inputs"]["seed"] for p in comfy[0].prompts} == {1, 2}


async def test_interrupting_the_queued_run_leaves_the_running_one(
    runtime: ComfyUIRuntime, comfy: Comfy
) -> None:
    run_a, run_b = await two_in_flight(runtime, comfy)
    queued = pending(comfy)[0]
    await runtime.interrupt("b")
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run_b, 10)
    assert comfy[0].deleted == [queued] and not run_a.done() and running(comfy) is not None
    comfy[0].paused = False
    result = await asyncio.wait_for(run_a, 10)
    assert len(result.images) == 1 and queued not in comfy[0].history


async def test_interrupting_the_running_run_lets_the_queued_one_run(
    runtime: ComfyUIRuntime, comfy: Comfy
) -> None:
    run_a, run_b = await two_in_flight(runtime, comfy)
    first = running(comfy)
    await runtime.interrupt("a")
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run_a, 10)
    assert comfy[0].interrupt_calls == [first] and comfy[0].deleted == []
    comfy[0].paused = False
    result = await asyncio.wait_for(run_b, 10)
    assert len(result.images) == 1 and comfy[0].history[result.info["prompt_id"]]["status"]["completed"]


async def test_interrupt_all_stops_every_run_of_ours_only(runtime: ComfyUIRuntime, comfy: Comfy) -> None:
    run_a, run_b = await two_in_flight(runtime, comfy)
    other = await foreign_prompt(comfy, txt2img(steps=2))
    await runtime.interrupt()
    for run in (run_a, run_b):
        with pytest.raises(Interrupted):
            await asyncio.wait_for(run, 10)
    assert None not in comfy[0].interrupt_calls and other not in comfy[0].deleted
    comfy[0].paused = False
    await until(lambda: other in comfy[0].history, "the other client's prompt runs")
    assert comfy[0].history[other]["status"]["status_str"] == "success"


async def test_animations_and_videos_are_outputs_too(runtime: ComfyUIRuntime) -> None:
    from fakes.comfyui_workflows import animated
    from sdfleet.media import sniff

    async def no_progress(value: float) -> None:
        return None

    result = await runtime.run(job(animated(steps=2)), no_progress)
    assert sorted(sniff(i).ext for i in result.images) == ["gif", "webp"]
    frames = [getattr(Image.open(io.BytesIO(i)), "n_frames", 1) for i in result.images]
    assert frames == [3, 3]
