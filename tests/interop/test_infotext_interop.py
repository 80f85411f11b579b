"""The infotext next to a real SD WebUI (``SDFLEET_A1111_URL``, see ``test_a1111_interop.py``): the
same request to SD WebUI and, as a task's A1111 body, to the diffusers runtime (a tiny model made
here). Every word and its place must be SD WebUI's; only the model's name and hash (other
weights) and ``Version`` differ. And the model hash is SD WebUI's own for the same file."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fakes.tiny import no_progress, tiny_diffusers
from infotext_cases import BODY, CASES, noise_png
from real_servers import A1111_URL, needs_a1111
from sdfleet.compat._common import params_from_a1111
from sdfleet.models import checkpoint_hash
from sdfleet.models.catalog import ModelInfo
from sdfleet.models.layout import STATE_DIR
from sdfleet.runtimes._diffusers_pipes import load_pipeline
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskType

pytestmark = [needs_a1111, pytest.mark.timeout(900)]


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


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


async def test_past_seed_2_to_the_32_sd_webui_draws_seed_0s_noise(diffusers: DiffusersRuntime) -> None:
    """A batch's seeds go on past 2**32 - 1 in SD WebUI; its CPU generator reads a seed's low 32
    bits, so the image it says is seed 4294967296's is seed 0's: sdfleet's seeds and images the
    same way (``test_diffusers_runtime``), its words the same (the cases above)."""
    top = 2**32 - 1
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        past = await client.post("/sdapi/v1/txt2img", json=BODY | {"seed": top, "batch_size": 2})
        zero = await client.post("/sdapi/v1/txt2img", json=BODY | {"seed": 0})
    assert past.status_code == zero.status_code == 200, (past.text, zero.text)
    assert json.loads(past.json()["info"])["all_seeds"] == [top, top + 1]
    first, second = (pixels(image) for image in past.json()["images"][:2])
    alone = pixels(zero.json()["images"][0])  # compared by pixels: their texts differ
    assert np.abs(second - alone).max() <= 2  # a batch of two rounds a last bit otherwise
    assert np.abs(first - alone).mean() > 10
    body = BODY | {"seed": top, "batch_size": 2}
    made = await diffusers.run(
        Job("t", TaskType.TEXT_TO_IMAGE, None, params_from_a1111(TaskType.TEXT_TO_IMAGE, body)), no_progress
    )
    assert made.info["all_seeds"] == [top, top + 1]


async def test_the_model_hash_is_sd_webuis_for_the_same_file() -> None:
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        listed = (await client.get("/sdapi/v1/sd-models")).json()
    found = [m for m in listed if m["sha256"] and Path(m["filename"]).is_file()]
    # its loaded checkpoint is always hashed; the file must be here: the suite runs beside its
    # server (docs/runtimes.md), and a hash compared with nothing would prove nothing
    assert found, f"none of SD WebUI's hashed checkpoints is readable from here: {listed}"
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


TI_CASES = [
    ("a sdfleet-ti-pos cat", "sdfleet-ti-neg blurry", "Original"),
    ("(a) sdfleet-ti-pos", "(blurry)", "No norm"),  # Emphasis first: the negative prompt's call
    ("[a cat:sdfleet-ti-pos:1]", "", "No norm"),  # the edited prompt's texts: no bracket left
]


@pytest.fixture(scope="module")
def their_embeddings() -> Iterator[dict[str, str]]:
    """Two SD 1.5 embeddings in SD WebUI's embeddings folder while the module runs (the suite
    runs beside its server, docs/runtimes.md: the folder must be here); their short hashes by
    name."""
    flags = httpx.get(f"{A1111_URL}/sdapi/v1/cmd-flags", timeout=60).json()
    folder = Path(flags["embeddings_dir"])
    assert folder.is_dir(), f"SD WebUI's embeddings folder {folder} is not on this machine"
    made = {}
    for name in ("sdfleet-ti-pos", "sdfleet-ti-neg"):
        path = folder / f"{name}.safetensors"
        save_file(
            {"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(len(name)))}, str(path)
        )
        made[name] = path
    try:
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-embeddings", timeout=60).raise_for_status()
        yield {name: hashlib.sha256(path.read_bytes()).hexdigest()[:12] for name, path in made.items()}
    finally:
        for path in made.values():
            path.unlink()
        httpx.post(f"{A1111_URL}/sdapi/v1/refresh-embeddings", timeout=60)


@pytest.mark.parametrize(("prompt", "negative", "emphasis"), TI_CASES)
async def test_ti_hashes_in_sd_webuis_place(
    diffusers: DiffusersRuntime,
    their_embeddings: dict[str, str],
    prompt: str,
    negative: str,
    emphasis: str,
) -> None:
    pipe = load_pipeline(diffusers.catalog.resolve("tiny-a"), "cpu", torch.float32)
    folder = diffusers.catalog.models_dir / "embeddings"
    folder.mkdir(exist_ok=True)
    ours = {}
    for name in their_embeddings:  # the same names, made for the tiny model
        path = folder / f"{name}.pt"
        rows = pipe.text_encoder.get_input_embeddings().weight[:2].detach().clone()
        torch.save({"string_to_param": {"*": rows}}, path)
        ours[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    body = BODY | {"prompt": prompt, "negative_prompt": negative, "sampler_name": "Euler"}
    body["override_settings"] = {"emphasis": emphasis}
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        answer = await client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    theirs = json.loads(answer.json()["info"])["infotexts"][0]
    kind = TaskType.TEXT_TO_IMAGE
    made = await diffusers.run(Job("t", kind, None, params_from_a1111(kind, body)), no_progress)
    mine = made.info["infotexts"][0]
    for name in their_embeddings:  # each side names its own file's hash
        assert (f"{name}: {their_embeddings[name]}" in theirs) == (f"{name}: {ours[name]}" in mine)
        mine = mine.replace(f"{name}: {ours[name]}", f"{name}: {their_embeddings[name]}")
    assert framed(mine) == framed(theirs)
    assert "TI hashes" in theirs  # the case names an embedding SD WebUI found
