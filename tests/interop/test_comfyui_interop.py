"""The ``comfyui`` runtime against a real ComfyUI (``SDFLEET_COMFYUI_URL``), defect by defect of issue 11.

Skipped unless ``SDFLEET_COMFYUI_URL`` names a running ComfyUI with an SD 1.5-shaped checkpoint;
docs/runtimes.md ("A real ComfyUI for the interop suite") says how to stand one up offline on CPU.
The checkpoint is the first ``CheckpointLoaderSimple`` offers, or ``SDFLEET_COMFYUI_CKPT``. Images
are 64×64 and 2 or 3 steps; every prompt gets a fresh seed, so ComfyUI's cache never answers one.
A foreign client (its own client id and socket) stands for another user of the same server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from fakes.comfyui_workflows import img2img, preview_only, txt2img, with_load_image
from real_servers import COMFYUI_URL, comfyui_checkpoint, needs_comfyui
from sdfleet.errors import Interrupted, Reject
from sdfleet.models import ModelCatalog
from sdfleet.runtimes import build_runtime
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.comfyui import ComfyUIRuntime
from sdfleet.tasks import TaskParams, TaskType

URL = COMFYUI_URL
RUN_S = 900.0  # a bound against hangs on a busy CPU, not a timing assertion
pytestmark = [needs_comfyui, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def ckpt() -> str:
    return comfyui_checkpoint()


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ComfyUIRuntime]:
    options = {"url": URL, "allow_private_inputs": True, "ready_timeout_s": 60, "timeout_s": 120}
    rt = build_runtime("comfyui", catalog=ModelCatalog(tmp_path), options=options)
    assert isinstance(rt, ComfyUIRuntime)
    await rt.start()
    yield rt
    await rt.aclose()


class Foreign:
    """Another client of the same ComfyUI, with its own socket to watch its prompt's progress."""

    def __init__(self, ws: ClientConnection, client_id: str) -> None:
        self.ws, self.client_id = ws, client_id

    async def queue(self, flow: dict[str, Any]) -> str:
        async with httpx.AsyncClient(base_url=URL) as client:
            answer = await client.post("/prompt", json={"prompt": flow, "client_id": self.client_id})
        return str(answer.json()["prompt_id"])

    async def next_step(self, prompt_id: str) -> int:
        """Wait for the next sampler step of ``prompt_id``; raises if it is interrupted instead."""
        async for raw in self.ws:
            msg = json.loads(raw) if isinstance(raw, str) else {}
            data = msg.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            assert msg["type"] not in ("execution_interrupted", "execution_error"), msg
            if msg["type"] == "progress":
                return int(data["value"])
        raise AssertionError("the foreign client's socket closed")

    async def drain(self) -> None:
        """Drop what the socket has buffered, so the next step seen is a new one."""
        with contextlib.suppress(TimeoutError):
            while True:
                await asyncio.wait_for(self.ws.recv(), 0.5)

    async def stop(self, prompt_id: str) -> None:
        async with httpx.AsyncClient(base_url=URL) as client:
            await client.post("/queue", json={"delete": [prompt_id]})
            await client.post("/interrupt", json={"prompt_id": prompt_id})


@pytest.fixture
async def foreign() -> AsyncIterator[Foreign]:
    client_id = uuid.uuid4().hex
    async with connect(f"ws{URL[4:]}/ws?clientId={client_id}", max_size=None) as ws:
        yield Foreign(ws, client_id)


def job(flow: dict[str, Any], task_id: str = "interop") -> Job:
    return Job(task_id, TaskType.PIPELINE, None, TaskParams(workflow=flow))


def flow(ckpt: str, steps: int = 2) -> dict[str, Any]:
    return txt2img(steps=steps, size=64, seed=random.randrange(2**48), ckpt=ckpt, prefix="sdfleet-interop")


async def queue_state() -> dict[str, list[str]]:
    async with httpx.AsyncClient(base_url=URL) as client:
        queue = (await client.get("/queue")).json()
    return {key: [item[1] for item in queue[key]] for key in ("queue_running", "queue_pending")}


async def until_queued(prompt_count: int) -> list[str]:
    """Wait until ``prompt_count`` prompts wait behind the running one; returns their ids."""
    for _ in range(6000):
        pending = (await queue_state())["queue_pending"]
        if len(pending) >= prompt_count:
            return pending
        await asyncio.sleep(0.05)
    raise AssertionError("the prompt never showed up in the queue")


class Started:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.seen: list[float] = []

    async def __call__(self, value: float) -> None:
        self.seen.append(value)
        self.event.set()


async def test_every_run_gets_its_images_two_in_flight(runtime: ComfyUIRuntime, ckpt: str) -> None:
    """Defect 1 (history read before it is written) and max_in_flight: 2 runs at once, then 1."""
    a, b = Started(), Started()
    both = asyncio.gather(runtime.run(job(flow(ckpt), "a"), a), runtime.run(job(flow(ckpt), "b"), b))
    results = [*await asyncio.wait_for(both, RUN_S)]
    results.append(await asyncio.wait_for(runtime.run(job(flow(ckpt)), Started()), RUN_S))
    for result in results:
        assert [Image.open(io.BytesIO(i)).size for i in result.images] == [(64, 64)]
    assert a.seen == [0.5, 0.99, 1.0] and b.seen == [0.5, 0.99, 1.0]
    assert len({r.info["prompt_id"] for r in results}) == 3


async def test_cached_reruns_never_miss_their_history(runtime: ComfyUIRuntime, ckpt: str) -> None:
    """Defect 1 under stress: ComfyUI answers a repeated prompt from its cache in milliseconds, so
    the gap between ``execution_success`` and the ``/history`` write is hit often (7 in 200 runs
    failed before the fix). Two in flight, 100 runs of one cached workflow."""
    same = flow(ckpt)
    first = await asyncio.wait_for(runtime.run(job(same), Started()), RUN_S)

    async def rerun(n: int) -> list[bytes]:
        return (await runtime.run(job(same, f"rerun-{n}"), Started())).images

    for n in range(0, 100, 2):
        assert await asyncio.wait_for(asyncio.gather(rerun(n), rerun(n + 1)), RUN_S) == [first.images] * 2


async def test_partly_invalid_workflow_is_rejected(runtime: ComfyUIRuntime, ckpt: str) -> None:
    """Defect 2: ComfyUI answers 200 with node_errors; the runtime rejects and drops the prompt."""
    with pytest.raises(Reject) as rejected:
        await asyncio.wait_for(runtime.run(job(with_load_image(flow(ckpt), "missing.png")), Started()), RUN_S)
    assert rejected.value.code == "invalid_workflow"
    assert (
        "node 10 (LoadImage): Custom validation failed for node: image - Invalid image file: missing.png"
        in (rejected.value.reason)
    )
    for _ in range(600):
        if not any((await queue_state()).values()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the partly valid prompt was left in ComfyUI's queue")


async def test_refused_workflow_names_each_node_error(runtime: ComfyUIRuntime, ckpt: str) -> None:
    bad = flow(ckpt)
    bad["4"]["inputs"]["ckpt_name"] = "no-such-model.safetensors"
    with pytest.raises(Reject) as rejected:
        await runtime.run(job(bad), Started())
    assert rejected.value.reason.startswith(
        "ComfyUI refused the workflow: Prompt outputs failed validation; "
    )
    assert "node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name: 'no-such-model.safetensors'" in (
        rejected.value.reason
    )


async def test_interrupting_the_queued_run_deletes_it(runtime: ComfyUIRuntime, ckpt: str) -> None:
    """Defect 3: the queued prompt leaves ComfyUI's queue; the running one goes on to its images."""
    a = Started()
    run_a = asyncio.create_task(runtime.run(job(flow(ckpt, steps=3), "a"), a))
    await asyncio.wait_for(a.event.wait(), RUN_S)
    run_b = asyncio.create_task(runtime.run(job(flow(ckpt), "b"), Started()))
    queued = await until_queued(1)
    await runtime.interrupt("b")
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run_b, 30)
    assert queued[0] not in (await queue_state())["queue_pending"]
    assert len((await asyncio.wait_for(run_a, RUN_S)).images) == 1


async def test_interrupting_the_running_run_lets_the_queued_one_run(
    runtime: ComfyUIRuntime, ckpt: str
) -> None:
    a = Started()
    run_a = asyncio.create_task(runtime.run(job(flow(ckpt, steps=20), "a"), a))
    await asyncio.wait_for(a.event.wait(), RUN_S)
    run_b = asyncio.create_task(runtime.run(job(flow(ckpt), "b"), Started()))
    await until_queued(1)
    await runtime.interrupt("a")
    with pytest.raises(Interrupted):
        await asyncio.wait_for(run_a, RUN_S)
    assert len((await asyncio.wait_for(run_b, RUN_S)).images) == 1


async def test_other_clients_prompts_are_never_stopped(
    runtime: ComfyUIRuntime, ckpt: str, foreign: Foreign
) -> None:
    """Defect 4: with nothing of its own, or its own prompt queued behind another client's, the
    runtime's interrupts leave the other client's prompt running."""
    other = await foreign.queue(flow(ckpt, steps=12))
    try:
        await asyncio.wait_for(foreign.next_step(other), RUN_S)
        await runtime.interrupt()
        await runtime.interrupt("not-ours")
        mine = asyncio.create_task(runtime.run(job(flow(ckpt), "mine"), Started()))
        await until_queued(1)
        await runtime.interrupt()
        with pytest.raises(Interrupted):
            await asyncio.wait_for(mine, 30)
        await foreign.drain()
        step = await asyncio.wait_for(foreign.next_step(other), RUN_S)
        assert await asyncio.wait_for(foreign.next_step(other), RUN_S) == step + 1  # still sampling
    finally:
        await foreign.stop(other)


async def test_preview_only_workflow_is_rejected(runtime: ComfyUIRuntime, ckpt: str) -> None:
    """Defect 5: only temp outputs is the client's mistake (Reject, no retry)."""
    preview = preview_only(steps=2, size=64, seed=random.randrange(2**48), ckpt=ckpt)
    with pytest.raises(Reject, match="only images are previews") as rejected:
        await asyncio.wait_for(runtime.run(job(preview), Started()), RUN_S)
    assert rejected.value.code == "no_saved_outputs"


async def test_inputs_are_uploaded_once_by_content(runtime: ComfyUIRuntime, ckpt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (random.randrange(256), 90, 160)).save(buf, format="PNG")
    data = buf.getvalue()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    name = f"{hashlib.sha256(data).hexdigest()}.png"
    folder = f"sdfleet/{runtime.api.today()}"
    runtime.api.today = lambda: folder[8:]  # the same day throughout, even across midnight
    for _ in range(2):
        flow_ = img2img(url, steps=2, size=64, seed=random.randrange(2**48), ckpt=ckpt)
        result = await asyncio.wait_for(runtime.run(job(flow_), Started()), RUN_S)
        assert len(result.images) == 1
    async with httpx.AsyncClient(base_url=URL) as client:
        history = (await client.get(f"/history/{result.info['prompt_id']}")).json()
        stored = await client.get("/view", params={"filename": name, "subfolder": folder, "type": "input"})
        again = await client.get(
            "/view", params={"filename": f"{name[:-4]} (1).png", "subfolder": folder, "type": "input"}
        )
    assert history[result.info["prompt_id"]]["prompt"][2]["10"]["inputs"]["image"] == f"{folder}/{name}"
    assert stored.content == data and again.status_code == 404
