"""Inpainting next to a real SD WebUI (``SDFLEET_A1111_URL``, see ``test_a1111_interop.py``): the
same request to SD WebUI, to the diffusers runtime (a tiny model made here) and through the a1111
runtime with the mask the agent fetched. The images differ (other weights), what frames them must
not: the image's size ("Only masked" keeps the input's), the input kept outside the blurred mask,
and the infotext's inpainting words in SD WebUI's order."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fakes.tiny import no_progress, tiny_diffusers
from real_servers import A1111_URL, needs_a1111
from sdfleet.runtimes.a1111 import A1111Runtime
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

pytestmark = [needs_a1111, pytest.mark.timeout(900)]

INPUT = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
SQUARE = Image.new("L", (128, 96), 0)
SQUARE.paste(255, (50, 30, 80, 60))
ALPHA = Image.new("RGBA", (128, 96), (0, 0, 0, 0))  # a mask drawn as transparency, as Gradio sends
ALPHA.paste((255, 255, 255, 255), (50, 30, 80, 60))
CASES: list[tuple[str, Image.Image, dict[str, Any]]] = [
    ("only masked", SQUARE, {}),
    ("whole picture", SQUARE, {"inpaint_full_res": False}),
    ("inverted", SQUARE, {"inpainting_mask_invert": 1}),
    (
        "original, padded, sharp",
        SQUARE,
        {"inpainting_fill": 1, "inpaint_full_res_padding": 8, "mask_blur": 0},
    ),
    ("blank", Image.new("L", (128, 96), 0), {}),
    ("latent noise", SQUARE, {"inpainting_fill": 2}),
    ("latent nothing, whole picture", SQUARE, {"inpainting_fill": 3, "inpaint_full_res": False}),
    ("alpha, blurred apart", ALPHA, {"mask_blur_x": 6, "mask_blur_y": 2}),
    ("soft edge (mask_round off)", ALPHA, {"mask_round": False, "mask_blur": 8}),
]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def words(infotext: str) -> str:
    """The inpainting words: what follows the denoising strength, up to SD WebUI's version."""
    found = re.search(r"Denoising strength: [0-9.]+(.*?)(, Version: .*)?$", infotext.rsplit("\n", 1)[-1])
    assert found is not None, infotext
    return found.group(1)


def kept_by(mask: Image.Image, extra: dict[str, Any]) -> np.ndarray:
    """The pixels the mask keeps, away from its blurred edge by three blurs and two pixels."""
    drawn = np.asarray(mask.getchannel("A") if mask.mode == "RGBA" else mask) > 127
    if extra.get("inpainting_mask_invert"):
        drawn = ~drawn
    blur = max(extra.get("mask_blur", 4), extra.get("mask_blur_x", 4), extra.get("mask_blur_y", 4))
    margin = 3 * blur + 2
    near: np.ndarray = ndimage.binary_dilation(drawn, np.ones((2 * margin + 1, 2 * margin + 1), bool))
    return ~near


@pytest.fixture(scope="module")
def diffusers(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return tiny_diffusers(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize(("name", "mask", "extra"), CASES, ids=[c[0] for c in CASES])
async def test_inpainting_is_framed_as_sd_webui_frames_it(
    diffusers: DiffusersRuntime, name: str, mask: Image.Image, extra: dict[str, Any]
) -> None:
    request = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}
    request |= {"denoising_strength": 0.75, **extra}
    body = {**request, "init_images": [base64.b64encode(png(INPUT)).decode()]}
    body["mask"] = base64.b64encode(png(mask)).decode()
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        answer = (await client.post("/sdapi/v1/img2img", json=body)).json()
    theirs = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    their_text = json.loads(answer["info"])["infotexts"][0]

    params = TaskParams(
        prompt="a cat",
        steps=3,
        width=64,
        height=64,
        seed=11,
        sampler="Euler",
        denoising_strength=0.75,
        extra={"mask": "fetched", **extra},
    )
    job = Job("t", TaskType.IMAGE_TO_IMAGE, None, params, init_images=[png(INPUT)], mask=png(mask))
    made = await diffusers.run(job, no_progress)
    ours = Image.open(io.BytesIO(made.images[0]))
    assert words(made.info["infotexts"][0]) == words(their_text), their_text
    assert ours.size == theirs.size
    if theirs.size == INPUT.size:  # the input laid back over the result, exactly, in both
        kept = kept_by(mask, extra)
        for image in (ours, theirs):
            out = np.asarray(image.convert("RGB")).astype(int)
            assert np.array_equal(out[kept], np.asarray(INPUT).astype(int)[kept])

    # the a1111 runtime hands SD WebUI the mask the agent fetched (here: given as bytes)
    client = httpx.AsyncClient(base_url=A1111_URL, timeout=600)
    a1111 = A1111Runtime(client, poll_s=0.2, ready_timeout_s=60)
    await a1111.start()
    try:
        sent = await a1111.run(job, no_progress)
    finally:
        await a1111.aclose()
    assert Image.open(io.BytesIO(sent.images[0])).size == theirs.size
    assert words(sent.info["infotexts"][0]) == words(their_text)
