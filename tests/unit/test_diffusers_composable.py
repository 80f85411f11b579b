"""SD WebUI's composable diffusion (``a cat AND a dog :0.5``) in the diffusers runtime, on tiny
random-weight SD 1.x and SDXL models (CPU, 64x64). It was refused (``AND in the prompt``). SD
WebUI denoises with ``uncond + cfg × Σ weight × (part − uncond)``, each part read as a prompt of
its own (editing included); the images next to SD WebUI's: ``test_sdwebui_weights_interop.py``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_diffusers_batching import pixels, quiet

from sdfleet.errors import Reject
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import _prompt_schedule as PS
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.runtimes.unsupported import refuse
from sdfleet.tasks import TaskParams, TaskType

MODELS = ["sd1", "xl"]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "sd1", seed=0)
    make_tiny(root, "xl", seed=0, sdxl=True)
    return DiffusersRuntime.from_options(
        catalog=ModelCatalog(root), options={"device": "cpu", "max_batch": 4}, cache_size=2
    )


def job(model: str, prompt: str, kind: TaskType = TaskType.TEXT_TO_IMAGE, **asked: Any) -> Job:
    init = asked.pop("init", None)
    fields = {
        "prompt": prompt,
        "steps": 6,
        "width": 64,
        "height": 64,
        "seed": 7,
        "sampler": "Euler",
        "cfg_scale": 7,
    }
    params = TaskParams.model_validate(fields | asked)
    return Job("c", kind, model, params, init_images=[init] if init else [])


def differ(a: RuntimeResult, b: RuntimeResult, n: int = 0) -> int:
    return int(np.abs(pixels(a.images[n]) - pixels(b.images[0])).max())


def test_parts_are_sd_webuis() -> None:
    """SD WebUI's ``get_multicond_prompt_list``: cut at ``AND`` (a word, in capitals), each
    part's weight at its end (1 without), each part scheduled as a prompt."""
    assert PS.parts("a cat AND a dog :0.5", 10) == [([(10, "a cat")], 1.0), ([(10, " a dog")], 0.5)]
    assert PS.parts("a [cat:dog:0.5]:2 AND b", 10) == [
        ([(5, "a cat"), (10, "a dog")], 2.0),
        ([(10, " b")], 1.0),
    ]
    assert PS.of_task("a cat AND a dog :0.5", "", 10)[1] == 1.0  # no weight of the whole prompt
    assert not PS.composable("black and white, ANDROID") and PS.composable("BLACK AND WHITE")


@pytest.mark.parametrize("model", MODELS)
async def test_parts_combine_as_sd_webui_combines_them(runtime: DiffusersRuntime, model: str) -> None:
    """Two halves of one prompt are that prompt; a part of weight 0 changes nothing; two
    prompts make neither's image; a batch's images are each the image made alone; editing
    inside parts is each part's own; the infotext gives the prompt as sent."""
    plain = await runtime.run(job(model, "a red cat"), quiet)
    halves = await runtime.run(job(model, "a red cat :0.5 AND a red cat :0.5"), quiet)
    assert differ(halves, plain) <= 1
    assert differ(await runtime.run(job(model, "a red cat AND a blue dog :0"), quiet), plain) <= 1
    both = await runtime.run(job(model, "a red cat AND a blue dog"), quiet)
    dog = await runtime.run(job(model, "a blue dog"), quiet)
    assert differ(both, plain) > 8 and differ(both, dog) > 8
    assert both.info["infotexts"][0].startswith("a red cat AND a blue dog\nSteps: 6")
    batch = await runtime.run(job(model, "a red cat AND a blue dog", batch_size=2), quiet)
    assert differ(batch, both) <= 1 and len(batch.images) == 2  # BLAS rounds by batch size
    edited = await runtime.run(job(model, "a [red:blue:0.5] cat :0.5 AND a [red:blue:0.5] cat :0.5"), quiet)
    assert differ(edited, await runtime.run(job(model, "a [red:blue:0.5] cat"), quiet)) <= 1
    negative = await runtime.run(
        job(model, "a red cat :0.5 AND a red cat :0.5", negative_prompt="ugly"), quiet
    )
    assert differ(negative, await runtime.run(job(model, "a red cat", negative_prompt="ugly"), quiet)) <= 1
    assert runtime.batch_key(job(model, "a red cat AND a blue dog")) is None  # its own UNet: alone


async def test_image_to_image_and_inpainting_take_parts(runtime: DiffusersRuntime) -> None:
    start = (await runtime.run(job("sd1", "a red cat"), quiet)).images[0]
    i2i: dict[str, Any] = {"kind": TaskType.IMAGE_TO_IMAGE, "init": start, "denoising_strength": 0.6}
    plain = await runtime.run(job("sd1", "a red cat", **i2i), quiet)
    assert (
        differ(await runtime.run(job("sd1", "a red cat :0.5 AND a red cat :0.5", **i2i), quiet), plain) <= 1
    )
    square = Image.new("L", (64, 64), 0)
    square.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    square.save(buf, format="PNG")
    masked = Job(
        "m",
        TaskType.IMAGE_TO_IMAGE,
        "sd1",
        job("sd1", "a red cat AND a blue dog", denoising_strength=0.7, extra={"mask": "fetched"}).params,
        init_images=[start],
        mask=buf.getvalue(),
    )
    made = await runtime.run(masked, quiet)
    assert differ(made, plain) > 0


@pytest.mark.parametrize("model", MODELS)
async def test_a_hires_fix_reads_parts_in_each_pass(runtime: DiffusersRuntime, model: str) -> None:
    """Its first pass's parts, then its second pass's (its own ``hr_prompt``, or the first's),
    scheduled over that pass as SD WebUI schedules a second pass's prompts: halves of one prompt
    in either pass are that prompt."""
    hires = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.5, "hr_upscaler": "Latent"}
    plain = await runtime.run(job(model, "a red cat", extra=hires), quiet)
    halves = "a red cat :0.5 AND a red cat :0.5"
    assert differ(await runtime.run(job(model, halves, extra=hires), quiet), plain) <= 1
    own = await runtime.run(job(model, "a red cat", extra=hires | {"hr_prompt": halves}), quiet)
    assert differ(own, plain) <= 1
    other = await runtime.run(
        job(model, "a red cat", extra=hires | {"hr_prompt": "a red cat AND a blue dog"}), quiet
    )
    assert differ(other, plain) > 4 and Image.open(io.BytesIO(other.images[0])).size == (128, 128)


@pytest.mark.parametrize(
    ("asked", "words"),
    [
        ({"extra": {"refiner_checkpoint": "sd1"}}, "with refiner_checkpoint"),
        ({"cfg_scale": 1}, "with cfg_scale 1 or less"),
    ],
)
def test_what_parts_do_not_run_with_is_refused_by_name(asked: dict[str, Any], words: str) -> None:
    params = job("sd1", "a cat AND a dog", **asked).params
    with pytest.raises(Reject) as raised:
        refuse("diffusers", TaskType.TEXT_TO_IMAGE, params)
    assert raised.value.code == "unsupported_option"
    assert f"AND in the prompt (SD WebUI's composable diffusion) {words}" in raised.value.reason
    refuse("a1111", TaskType.TEXT_TO_IMAGE, params)  # SD WebUI runs them
    refuse("diffusers", TaskType.TEXT_TO_IMAGE, job("sd1", "a cat AND a dog").params)


async def test_a_part_of_a_job_that_fails_is_refused_before_the_device(tmp_path: Path) -> None:
    """A refused task never reaches the pipeline: its run fails by name."""
    make_tiny(tmp_path, "sd1", seed=0)
    rt = DiffusersRuntime.from_options(catalog=ModelCatalog(tmp_path), options={"device": "cpu"})
    try:
        with pytest.raises(Reject, match="with cfg_scale 1 or less"):
            await rt.run(job("sd1", "a cat AND a dog", cfg_scale=1), quiet)
    finally:
        await rt.aclose()
