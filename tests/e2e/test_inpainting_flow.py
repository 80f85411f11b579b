"""Inpainting through the whole fleet: a seed-shaped (v1alpha2) image-to-image task whose input
and mask are URLs, as the seed's users send them (its agent downloads any image URL in the body).
The agent fetches the mask with the inputs, once; the diffusers runtime repaints the masked
square and pastes it back into the input, which keeps its size, as SD WebUI does."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_tools import serving
from PIL import Image

from conftest import Engine, StartFleet, fleet_settings
from sdfleet.media import infotext
from sdfleet.settings import QueueConfig
from sdfleet.storage import open_storage

pytestmark = [pytest.mark.timeout(180), pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

INPUT = Image.fromarray(np.random.default_rng(4).integers(0, 255, (48, 80, 3), dtype=np.uint8))
MASK = Image.new("L", (80, 48), 0)
MASK.paste(255, (30, 14, 50, 34))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Images:
    """``/input.png`` and ``/mask.png``, each request counted."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()
        self.files = {"/input.png": png(INPUT), "/mask.png": png(MASK)}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.asked[scope["path"]] += 1
        body = self.files.get(scope["path"])
        await send({"type": "http.response.start", "status": 200 if body else 404, "headers": []})
        await send({"type": "http.response.body", "body": body or b"no such image"})


async def test_a_seed_task_with_a_mask_url_is_inpainted(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    queues = [QueueConfig(name="sdruntime", filter={"runtime": ["sdruntime"]}, runtime="diffusers")]
    images = Images()
    async with serving(images) as url:
        fleet = await start_fleet(queues, settings=fleet_settings(engine, models_dir, queues))
        content = {"alwayson_scripts": {}, "prompt": "a cat", "steps": 4, "width": 64, "height": 64}
        content |= {"seed": 2, "init_images": [f"{url}/input.png"], "mask": f"{url}/mask.png", "mask_blur": 2}
        metadata = {"id": "inpaint-1", "runtime": "sdruntime", "tasktype": "image-to-image", "prefix": "out"}
        r = await fleet.http.post("/v1alpha2/", json={"task": {"metadata": metadata, "content": content}})
        assert r.status_code == 200, r.text
        view = await fleet.wait("inpaint-1")
    assert view["state"] == "succeeded", view
    assert images.asked == Counter({"/input.png": 1, "/mask.png": 1})
    storage = open_storage(engine.storage_url)
    try:
        made = Image.open(io.BytesIO(await storage.get(view["images"][0]["key"])))
    finally:
        await storage.aclose()
    assert made.size == (80, 48)  # the input's, not the task's 64 × 64 ("Only masked")
    out, source = np.asarray(made.convert("RGB")).astype(int), np.asarray(INPUT).astype(int)
    far = np.ones((48, 80), bool)
    far[8:40, 24:56] = False
    assert np.array_equal(out[far], source[far])
    assert np.abs(out[18:30, 34:46] - source[18:30, 34:46]).mean() > 20
    said = infotext(made)
    assert said is not None and "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 0" in said


async def test_a_mask_that_is_no_image_is_refused_at_the_door(
    start_fleet: StartFleet, engine: Engine, models_dir: Path
) -> None:
    """A mask in the body is checked as the inputs are (it was taken, and the task failed later)."""
    queues = [QueueConfig(name="q", runtime="diffusers")]
    fleet = await start_fleet(queues, settings=fleet_settings(engine, models_dir, queues))
    params = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "init_images": [_data_url(INPUT)]}
    for mask, said in (("bm90IGFuIGltYWdl", "mask: "), ("ftp://example.com/m.png", "mask: 'ftp://")):
        body = {"type": "image-to-image", "params": {**params, "extra": {"mask": mask}}}
        r = await fleet.http.post("/v1/tasks", json=body)
        error = r.json()["error"]
        assert r.status_code == 422 and error["code"] == "bad_image" and said in error["message"], r.text
    ok = {"type": "image-to-image", "params": {**params, "extra": {"mask": _data_url(MASK)}}}
    assert (await fleet.http.post("/v1/tasks", json=ok)).status_code == 202


def _data_url(image: Image.Image) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png(image)).decode()
