"""The infotext (an image's ``parameters`` text) as SD WebUI 1.10.1 writes it, from the diffusers
runtime's PNGs and from ``runtime serve`` alike.

The diffusers runtime wrote an older, shorter one: ``Sampler: DPM++ 2M Karras`` where SD WebUI
1.10 says ``Sampler: DPM++ 2M, Schedule type: Karras``, and no ``Model hash``, ``Eta DDIM`` or
``Version``; Civitai and SD WebUI's PNG Info read the model from ``Model hash``. ``runtime serve``
wrote its own text and did not say DDIM's eta either. The words below are the real server's
(``test_infotext_interop.py`` compares them with it)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from fakes.servers import ServerThread, a1111_server, free_port
from fakes.tiny import no_progress
from infotext_cases import BODY, CASES, noise_png
from sdfleet import infotext
from sdfleet.compat._common import params_from_a1111
from sdfleet.models import ModelCatalog
from sdfleet.runtimes._diffusers_samplers import eta_said, said, sampler_key
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskType


def test_words_come_in_sd_webuis_order_quoted_as_there() -> None:
    core = {"Model": "m", "Steps": 2, "Seed": 1, "Sampler": "Euler", "Tiling": None}
    extra = {"Hires upscale": 2.0, "Lora hashes": "a: 1, b: 2", "Steps": 3, "Note": "Note"}
    text = infotext.text("a cat, red", "blurry", core, extra, version="v")
    assert text == (
        "a cat, red\nNegative prompt: blurry\n"
        'Steps: 3, Sampler: Euler, Seed: 1, Model: m, Hires upscale: 2.0, Lora hashes: "a: 1, b: 2", '
        "Note, Version: v"
    )  # an extra word already placed takes its place (a dict update, as SD WebUI's)
    assert infotext.text("", "", {"Steps": 2}, version=None) == "Steps: 2"
    with pytest.raises(ValueError, match="Mask blur"):
        infotext.text("x", "", {"Mask blur": 4})  # inpainting's words are extra ones


@pytest.mark.parametrize(
    ("sampler", "scheduler", "words"),
    [
        ("Euler a", None, ("Euler a", "Automatic")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", None, ("DPM++ 2M", "Uniform")),  # run here without Karras: SD WebUI's Uniform
        ("DPM2 a", "automatic", ("DPM2 a", "Uniform")),
        ("Euler", "Uniform", ("Euler", "Uniform")),
        ("Euler", "Karras", ("Euler", "Karras")),
        ("DDIM", "Karras", ("DDIM", "Karras")),  # taken and unused, as SD WebUI does
        ("UniPC", None, ("UniPC", "Automatic")),
    ],
)
def test_sampler_and_schedule_type_as_sd_webui_1_10_says_them(
    sampler: str, scheduler: str | None, words: tuple[str, str]
) -> None:
    key = sampler_key(sampler, scheduler)
    assert key is not None and said(key, scheduler) == words


def test_eta_is_said_for_ddim_only_away_from_its_default() -> None:
    assert eta_said("DDIM", 0.5) == {"Eta DDIM": 0.5} and eta_said("DDIM", 1) == {"Eta DDIM": 1.0}
    assert eta_said("DDIM", 0) == eta_said("DDIM", None) == eta_said("Euler", 0.5) == {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    root = tmp_path_factory.mktemp("models")
    srv = a1111_server(root, free_port())
    try:
        yield srv, root
    finally:
        srv.stop()


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b.safetensors"])
@pytest.mark.parametrize(("path", "fields"), CASES)
async def test_the_diffusers_runtime_and_runtime_serve_write_the_same_infotext(
    served: tuple[ServerThread, Path], model: str, path: str, fields: dict[str, Any]
) -> None:
    """The same request through ``runtime serve`` and as a task's A1111 body through the diffusers
    runtime (the agent's path): the same text for every image, its model hash SD WebUI's (the
    sha256 of a checkpoint file)."""
    srv, root = served
    body = BODY | fields
    if path == "img2img":
        body["init_images"] = [noise_png()]
    overrides = {**body.get("override_settings", {}), "sd_model_checkpoint": model}
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        answer = await client.post(f"/sdapi/v1/{path}", json=body | {"override_settings": overrides})
    assert answer.status_code == 200, answer.text
    theirs = json.loads(answer.json()["info"])["infotexts"]

    kind = TaskType.IMAGE_TO_IMAGE if path == "img2img" else TaskType.TEXT_TO_IMAGE
    params = params_from_a1111(kind, body)
    inputs = [base64.b64decode(body["init_images"][0])] if path == "img2img" else []
    runtime = DiffusersRuntime(ModelCatalog(root), default_model="tiny-a", device="cpu")
    try:
        made = await runtime.run(Job("t", kind, model, params, init_images=inputs), no_progress)
    finally:
        await runtime.aclose()
    assert made.info["infotexts"] == theirs
    for png, text in zip(made.images, theirs, strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert image.info["parameters"] == text
    if model.endswith(".safetensors"):
        digest = hashlib.sha256((root / model).read_bytes()).hexdigest()[:10]
        assert f", Model hash: {digest}, Model: tiny-b, " in theirs[0]
        assert made.info["sd_model_hash"] == digest
