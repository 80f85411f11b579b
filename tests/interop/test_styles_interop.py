"""Saved prompt styles next to a real SD WebUI (``SDFLEET_A1111_URL``, see ``test_a1111_interop.py``)
started with ``--styles-file tests/data/styles.csv``: the same requests to SD WebUI and, as a
task's A1111 body, to the diffusers runtime with the same file in its models folder. Every word of
the infotext in its place (the styled prompts first), only the model's name and hash and
``Version`` apart; and ``runtime serve`` lists the file as SD WebUI lists it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from test_infotext_interop import framed

from fakes.tiny import STYLES as CSV
from fakes.tiny import no_progress, tiny_diffusers
from real_servers import A1111_URL, needs_a1111
from sdfleet.compat._common import params_from_a1111
from sdfleet.runtimes import _styles as ST
from sdfleet.runtimes.base import Job
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskType

pytestmark = [needs_a1111, pytest.mark.timeout(900)]

BODY = {"prompt": "a cat", "negative_prompt": "dark", "steps": 2, "width": 64, "height": 64, "seed": 5}
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1, "denoising_strength": 0.5}
CASES: list[dict[str, Any]] = [
    {"styles": ["sdfleet-cinematic"]},
    {"styles": ["sdfleet-cinematic", "sdfleet-appended"]},
    {"styles": ["sdfleet-appended", "sdfleet-cinematic"], "prompt": "  a cat  "},
    {"styles": ["sdfleet-negative-only"], "negative_prompt": ""},
    HIRES | {"styles": ["sdfleet-appended"], "hr_prompt": "a bird"},
    HIRES | {"styles": ["sdfleet-cinematic"]},
]


@pytest.fixture(scope="module")
def diffusers(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    return tiny_diffusers(tmp_path_factory.mktemp("models"), styles=True)


def test_sd_webui_has_the_files_styles() -> None:
    listed = httpx.get(f"{A1111_URL}/sdapi/v1/prompt-styles", timeout=60).json()
    theirs = {s["name"]: (s["prompt"], s["negative_prompt"]) for s in listed}
    ours = {s.name: (s.prompt, s.negative_prompt) for s in ST.read(CSV).values()}
    assert all(theirs.get(name) == text for name, text in ours.items()), (
        f"start SD WebUI with --styles-file {CSV} (it reads the file at start): it lists {listed}"
    )


@pytest.mark.parametrize("fields", CASES)
async def test_the_styled_infotext_is_sd_webuis(diffusers: DiffusersRuntime, fields: dict[str, Any]) -> None:
    body = BODY | fields
    async with httpx.AsyncClient(base_url=A1111_URL, timeout=600) as client:
        answer = await client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    kind = TaskType.TEXT_TO_IMAGE
    made = await diffusers.run(Job("t", kind, None, params_from_a1111(kind, body)), no_progress)
    assert [framed(t) for t in made.info["infotexts"]] == [framed(t) for t in info["infotexts"]]
    styled = made.info["prompt"]  # the styled prompt, in SD WebUI's info as in the runtime's
    assert (info["prompt"], info["all_prompts"], info["styles"]) == (styled, [styled], body["styles"])
