"""The infotext next to a real SD WebUI (``SDFLEET_A1111_URL``, see ``test_a1111_interop.py``): the
same request to SD WebUI and, as a task's A1111 body, to the diffusers runtime (a tiny model made
here). Every word and its place must be SD WebUI's; only the model's name and hash (other
weights) and ``Version`` differ. And the model hash is SD WebUI's own for the same file."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.tiny import no_progress, tiny_diffusers
from infotext_cases import BODY, CASES, noise_png
from real_servers import A1111_URL, needs_a1111
from sdfleet.compat._common import params_from_a1111
from sdfleet.models import checkpoint_hash
from sdfleet.models.catalog import ModelInfo
from sdfleet.models.layout import STATE_DIR
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskType

pytestmark = [needs_a1111, pytest.mark.timeout(900)]


def framed(text: str) -> str:
    """An infotext without what names the model and the release."""
    text = re.sub(r"Model hash: [0-9a-f]{10}, Model: [^,]+, ", "Model hash: H, Model: M, ", text)
    return re.sub(r", Version: [^,]+$", ", Version: V", text)


@pytest.fixture(scope="module", autouse=True)
def pinned() -> None:
    """The settings the cases override, set to their defaults in SD WebUI's saved settings: it
    puts back after a job only what is saved there, and one case's clip skip 2 stayed for the
    next ones (docs/runtimes.md, the a1111 runtime)."""
    httpx.post(
        f"{A1111_URL}/sdapi/v1/options",
        json={"CLIP_stop_at_last_layers": 1, "emphasis": "Original"},
        timeout=60,
    )


@pytest.fixture(scope="module")
def diffusers(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return tiny_diffusers(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize(("path", "fields"), CASES)
async def test_every_word_in_sd_webuis_place(
    diffusers: DiffusersRuntime, path: str, fields: dict[str, Any]
) -> None:
    body = BODY | fields
    if path == "img2img":
        body["init_images"] = [noise_png()]
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        answer = await client.post(f"/sdapi/v1/{path}", json=body)
    assert answer.status_code == 200, answer.text
    theirs = json.loads(answer.json()["info"])["infotexts"]
    kind = TaskType.IMAGE_TO_IMAGE if path == "img2img" else TaskType.TEXT_TO_IMAGE
    inputs = [base64.b64decode(body["init_images"][0])] if path == "img2img" else []
    made = await diffusers.run(
        Job("t", kind, None, params_from_a1111(kind, body), init_images=inputs), no_progress
    )
    assert [framed(t) for t in made.info["infotexts"]] == [framed(t) for t in theirs]


async def test_the_model_hash_is_sd_webuis_for_the_same_file() -> None:
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        listed = (await client.get("/sdapi/v1/sd-models")).json()
    found = [m for m in listed if m["sha256"] and Path(m["filename"]).is_file()]
    if not found:
        pytest.skip("SD WebUI's checkpoints are not readable from here (another machine?)")
    for model in found:
        path = Path(model["filename"])
        kept = path.parent / STATE_DIR  # where the hash is remembered: not left in SD WebUI's folder
        was_there = kept.exists()
        try:
            info = ModelInfo(path.name, path, "single-file")
            assert checkpoint_hash.sha256(info) == model["sha256"]
            assert checkpoint_hash.sha256(info)[: checkpoint_hash.SHORT] == model["hash"]
        finally:
            if not was_there:
                shutil.rmtree(kept, ignore_errors=True)
