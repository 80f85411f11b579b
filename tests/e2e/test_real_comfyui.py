"""The whole flow on a real ComfyUI, when ``SDFLEET_COMFYUI_URL`` is set: pipeline tasks through the
API → queue → the staged agent (comfyui runtime, a second prompt queued at ComfyUI while one runs)
→ stored PNG; a cancel stops the running prompt and leaves the queued one alone.

``tests/interop`` checks the runtime call by call; this checks what the agent adds on top against
the real server. Written for an SD 1.5-shaped checkpoint at 64x64 on CPU (docs/runtimes.md, "A real
ComfyUI for the interop suite"); ``SDFLEET_COMFYUI_CKPT`` names it (default: the first offered).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleet_tools import cancel_while_running, png_size, submit_all

from conftest import Engine, StartFleet, fleet_settings
from fakes.comfyui_workflows import txt2img
from real_servers import COMFYUI_URL, comfyui_checkpoint, needs_comfyui
from sdfleet.settings import QueueConfig

pytestmark = [needs_comfyui, pytest.mark.timeout(900)]
QUEUE = [QueueConfig(name="q", runtime="comfyui")]


async def test_the_staged_agent_on_a_real_comfyui(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    ckpt = comfyui_checkpoint()
    runtimes = {"comfyui": {"url": COMFYUI_URL, "ready_timeout_s": 60, "timeout_s": 300}}
    s = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=120, cancel_check_s=0.5)
    fleet = await start_fleet(QUEUE, settings=s)

    def body(seed: int, steps: int = 2) -> dict[str, Any]:
        flow = txt2img(steps=steps, size=64, seed=seed, ckpt=ckpt, prefix="sdfleet-e2e")
        return {"type": "pipeline", "params": {"prompt": "a lighthouse", "workflow": flow}}

    ids = await submit_all(fleet, [body(seed) for seed in (11, 12, 13)])
    views = [await fleet.wait(i, timeout_s=300) for i in ids]
    assert [(v["state"], v["attempts"]) for v in views] == [("succeeded", 1)] * 3, views
    assert [await png_size(engine, v["images"][0]["key"]) for v in views] == [(64, 64)] * 3

    # A long prompt runs, a short one waits in ComfyUI's queue behind it: cancelling the running
    # one stops it at ComfyUI's next step and the queued one still makes its image.
    long, short = await submit_all(fleet, [body(14, steps=60), body(15)])
    # a cancel check every 0.5 s, then ComfyUI stops at its next step (about a second on CPU)
    stopped_s = await cancel_while_running(fleet, long, settle_s=5.0, bound_s=6.0)
    view = await fleet.wait(short, timeout_s=300)
    assert view["state"] == "succeeded" and view["attempts"] == 1, view
    print(f"cancel → running prompt stopped in {stopped_s:.2f} s")
