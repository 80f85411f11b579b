"""The whole flow on a real ComfyUI, when ``SDFLEET_COMFYUI_URL`` is set: pipeline tasks through the
API → queue → the staged agent (comfyui runtime, a second prompt queued at ComfyUI while one runs)
→ stored PNG; a cancel stops the running prompt and leaves the queued one alone.

``tests/interop`` checks the runtime call by call; this checks what the agent adds on top against
the real server. Written for an SD 1.5-shaped checkpoint at 64x64 on CPU (docs/runtimes.md, "A real
ComfyUI for the interop suite"); ``SDFLEET_COMFYUI_CKPT`` names it (default: the first offered).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import Engine, StartFleet, fleet_settings
from fakes.comfyui_workflows import txt2img
from sdfleet.settings import QueueConfig
from sdfleet.storage import open_storage

URL = os.environ.get("SDFLEET_COMFYUI_URL", "")
pytestmark = [
    pytest.mark.skipif(
        not URL,
        reason="no real ComfyUI: set SDFLEET_COMFYUI_URL=http://HOST:PORT of one with an SD 1.5-shaped "
        "checkpoint (docs/runtimes.md, 'A real ComfyUI for the interop suite')",
    ),
    pytest.mark.timeout(900),
]
QUEUE = [QueueConfig(name="q", runtime="comfyui")]


def checkpoint() -> str:
    if os.environ.get("SDFLEET_COMFYUI_CKPT"):
        return os.environ["SDFLEET_COMFYUI_CKPT"]
    info = httpx.get(f"{URL}/object_info/CheckpointLoaderSimple", timeout=30).json()
    names = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert names, "ComfyUI offers no checkpoint: put one in its models/checkpoints"
    return str(names[0])


async def test_the_staged_agent_on_a_real_comfyui(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    ckpt = checkpoint()
    runtimes = {"comfyui": {"url": URL, "ready_timeout_s": 60, "timeout_s": 300}}
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=120, cancel_check_s=0.5)
    fleet = await start_fleet(QUEUE, settings=s)

    def body(seed: int, steps: int = 2) -> dict[str, Any]:
        flow = txt2img(steps=steps, size=64, seed=seed, ckpt=ckpt, prefix="sdfleet-e2e")
        return {"type": "pipeline", "params": {"prompt": "a lighthouse", "workflow": flow}}

    ids = []
    for seed in (11, 12, 13):
        r = await fleet.http.post("/v1/tasks", json=body(seed))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    views = [await fleet.wait(i, timeout_s=300) for i in ids]
    assert [(v["state"], v["attempts"]) for v in views] == [("succeeded", 1)] * 3, views
    storage = open_storage(engine.storage_url)
    try:
        for v in views:
            (image,) = v["images"]
            data = await storage.get(image["key"])
            assert Image.open(io.BytesIO(data)).size == (64, 64)
    finally:
        await storage.aclose()

    # A long prompt runs, a short one waits in ComfyUI's queue behind it: cancelling the running
    # one stops it at ComfyUI's next step and the queued one still makes its image.
    long = (await fleet.http.post("/v1/tasks", json=body(14, steps=60))).json()["id"]
    short = (await fleet.http.post("/v1/tasks", json=body(15))).json()["id"]
    await fleet.wait(long, states=("running",), timeout_s=120)
    await asyncio.sleep(5.0)  # into its steps (the checkpoint loads first), the short one queued
    asked = time.monotonic()
    assert (await fleet.http.post(f"/v1/tasks/{long}/cancel")).status_code == 200
    agent = fleet.fleet.agents[0]
    while any(p.task.id == long for p in agent._running):
        assert time.monotonic() - asked < 30, "the running prompt was not interrupted"
        await asyncio.sleep(0.05)
    stopped_s = time.monotonic() - asked
    assert (await fleet.wait(long, timeout_s=60))["state"] == "cancelled"
    view = await fleet.wait(short, timeout_s=300)
    assert view["state"] == "succeeded" and view["attempts"] == 1, view
    # a cancel check every 0.5 s, then ComfyUI stops at its next step (about a second on CPU)
    assert stopped_s < 6, stopped_s
    print(f"cancel → running prompt stopped in {stopped_s:.2f} s")
