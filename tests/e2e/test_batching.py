"""Dynamic batching through the whole agent (queue → diffusers on the tiny model → stored PNG), on
every engine: compatible tasks share a pipeline call and each gets its own images; a batch-mate
that fails or is cancelled does so alone."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from fleet_tools import read_json
from PIL import Image

from conftest import SD15, Engine, RunningFleet, StartFleet, fleet_settings
from sdfleet.settings import QueueConfig

# flows of the fleet's own logic: redis and aws in `make test-slow` (tests/conftest.py)
pytestmark = [pytest.mark.timeout(240), pytest.mark.flow]

QUEUE = [QueueConfig(name="q", runtime="diffusers", model=SD15)]


def png_url(color: tuple[int, int, int], *, corrupt: bool = False) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    data = buf.getvalue()
    if corrupt:
        data = _garbled_pixels(data)
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def _garbled_pixels(png: bytes) -> bytes:
    """A PNG whose chunks and CRCs are sound (``verify()`` passes) but whose pixels do not inflate."""
    out, pos = bytearray(png[:8]), 8
    while pos < len(png):
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            body = b"\x78\x9c" + bytes(len(body) - 2)  # a zlib header, then nothing inflatable
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
        pos += 12 + length
    return bytes(out)


async def start(start_fleet: StartFleet, engine: Engine, models_dir: Path, wait_ms: int) -> RunningFleet:
    runtimes = {"diffusers": {"device": "cpu", "max_batch": 4, "max_batch_wait_ms": wait_ms}}
    settings = fleet_settings(engine, models_dir, QUEUE, runtimes=runtimes, lease_s=60)
    return await start_fleet(QUEUE, settings=settings)


async def submit_all(fleet: RunningFleet, bodies: list[dict[str, Any]]) -> list[str]:
    answers = await asyncio.gather(*(fleet.http.post("/v1/tasks", json=b) for b in bodies))
    assert all(r.status_code == 202 for r in answers), [r.text for r in answers]
    return [r.json()["id"] for r in answers]


def img2img(url: str, seed: int, steps: int = 3) -> dict[str, Any]:
    params = {"prompt": f"a picture {seed}", "steps": steps, "width": 64, "height": 64, "seed": seed}
    return {"type": "image-to-image", "params": {**params, "init_images": [url], "denoising_strength": 0.5}}


async def test_compatible_tasks_share_a_call_and_keep_their_own_results(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, wait_ms=2000)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    ids = await submit_all(fleet, [img2img(png_url(c), seed=i) for i, c in enumerate(colors)])
    views = [await fleet.wait(task_id, timeout_s=180) for task_id in ids]
    assert [v["state"] for v in views] == ["succeeded"] * 4, views
    outs = [await read_json(engine, v["output"]["key"]) for v in views]
    assert [o["batch_tasks"] for o in outs] == [4, 4, 4, 4]
    assert [o["seed"] for o in outs] == [0, 1, 2, 3]
    assert len({v["images"][0]["key"] for v in views}) == 4
    # batch-mates share the call's device time: each is charged a quarter, the counter the call once
    t = views[0]["timings"]
    share = (t.get("model_switch", 0.0) + t["runtime_run"]) / 4
    assert all(abs(v["timings"]["gpu_seconds"] - share) < 1e-6 for v in views), [v["timings"] for v in views]
    metrics = (await fleet.http.get("/metrics")).text
    line = next(x for x in metrics.splitlines() if x.startswith('sdfleet_gpu_seconds_total{queue="q"}'))
    assert abs(float(line.split()[-1]) - 4 * share) < 1e-6


async def test_a_failing_batch_mate_fails_alone(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, wait_ms=2000)
    bodies = [img2img(png_url((200, 10, 10)), 1), img2img(png_url((1, 2, 3), corrupt=True), 2)]
    bodies.append(img2img(png_url((10, 200, 10)), 3))
    ids = await submit_all(fleet, bodies)
    views = [await fleet.wait(task_id, timeout_s=180) for task_id in ids]
    assert [v["state"] for v in views] == ["succeeded", "failed", "succeeded"], views
    assert views[1]["error"]["code"] == "invalid_image", views[1]["error"]
    assert views[1]["attempts"] == 1  # refused at once, not retried


async def test_a_cancelled_batch_mate_ends_alone(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    fleet = await start(start_fleet, engine, models_dir, wait_ms=2000)
    # The most steps a task may ask, so the batch still runs when the cancel lands: on one torch
    # thread the tiny model is quick under load too (this test's call: 4 s here, alone)
    bodies = [img2img(png_url((i * 60, 0, 0)), seed=i, steps=150) for i in range(3)]
    ids = await submit_all(fleet, bodies)
    for task_id in ids:
        await fleet.wait(task_id, timeout_s=120, states=("running",))
    assert (await fleet.http.post(f"/v1/tasks/{ids[1]}/cancel")).status_code == 200
    views = [await fleet.wait(task_id, timeout_s=180) for task_id in ids]
    assert [v["state"] for v in views] == ["succeeded", "cancelled", "succeeded"], views
    outs = [await read_json(engine, views[i]["output"]["key"]) for i in (0, 2)]
    assert [o["batch_tasks"] for o in outs] == [3, 3]


async def test_masked_tasks_share_a_call_each_with_its_own_mask(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """Inpainting tasks (a mask each, fetched by the agent) batch as well; "Only masked" pastes
    each one's region back into its own input, which keeps its size."""
    import base64

    def mask_url(box: tuple[int, int, int, int]) -> str:
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, box)
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    fleet = await start(start_fleet, engine, models_dir, wait_ms=2000)
    boxes = [(0, 0, 20, 20), (30, 30, 60, 60), (10, 40, 50, 60)]
    bodies = [img2img(png_url((i * 80, 100, 0)), seed=i) for i in range(3)]
    for body, box in zip(bodies, boxes, strict=True):
        body["params"]["extra"] = {"mask": mask_url(box)}
    ids = await submit_all(fleet, bodies)
    views = [await fleet.wait(task_id, timeout_s=180) for task_id in ids]
    assert [v["state"] for v in views] == ["succeeded"] * 3, views
    outs = [await read_json(engine, v["output"]["key"]) for v in views]
    assert [o["batch_tasks"] for o in outs] == [3, 3, 3]
    assert all("Inpaint area: Only masked" in o["infotexts"][0] for o in outs), outs[0]["infotexts"]


async def test_a_batch_key_that_fails_runs_its_task_alone(
    start_fleet: StartFleet, engine: Engine, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent asks the runtime for each task's key while it groups tasks: one that raises (a
    plugin runtime's, a bad file it reads) stopped the run stage. The task runs alone now."""
    from sdfleet.runtimes.diffusers import DiffusersRuntime

    real = DiffusersRuntime.batch_key

    def key(self: DiffusersRuntime, job: Any) -> object | None:
        if "boom" in job.params.prompt:
            raise RuntimeError("a key that cannot be made")
        return real(self, job)

    monkeypatch.setattr(DiffusersRuntime, "batch_key", key)
    fleet = await start(start_fleet, engine, models_dir, wait_ms=2000)
    bodies = [img2img(png_url((i * 80, 0, 0)), seed=i) for i in range(3)]
    bodies[1]["params"]["prompt"] = "boom"
    ids = await submit_all(fleet, bodies)
    views = [await fleet.wait(task_id, timeout_s=180) for task_id in ids]
    assert [v["state"] for v in views] == ["succeeded"] * 3, views
    outs = [await read_json(engine, v["output"]["key"]) for v in views]
    assert [o["batch_tasks"] for o in outs] == [2, 1, 2]
