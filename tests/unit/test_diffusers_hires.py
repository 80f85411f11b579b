"""SD WebUI's hires fix in the diffusers runtime, on tiny random-weight SD 1.x and SDXL models
(CPU, 64x64 first passes, 2 steps). It was refused as an unsupported option."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_diffusers_batching import assert_same_images, pixels, quiet

from sdfleet.errors import Reject
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, checkpoint_hash, make_tiny
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    options = {"device": "cpu", "max_batch": 4, "generate_max_pixels": 160 * 160}
    return DiffusersRuntime.from_options(catalog=ModelCatalog(root), options=options, default_model="tiny-a")


def job(
    task_id: str = "h", model: str = "tiny-a", *, hires: bool = True, size: int = 64, seed: int = 1,
    batch_size: int = 1, **extra: Any,
) -> Job:  # fmt: skip
    params = {"prompt": "a red cat", "steps": 2, "width": size, "height": size, "seed": seed}
    extra = {"enable_hr": True, **extra} if hires else extra
    asked = TaskParams.model_validate({**params, "batch_size": batch_size, "extra": extra})
    return Job(task_id, TaskType.TEXT_TO_IMAGE, model, asked)


def model_hash(runtime: DiffusersRuntime, model: str) -> str:
    return checkpoint_hash.sha256(runtime.catalog.resolve(model))[:10]


def sizes(result: RuntimeResult) -> list[tuple[int, int]]:
    return [Image.open(io.BytesIO(png)).size for png in result.images]


@pytest.mark.parametrize("model", ["tiny-a", "tiny-xl"])
@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "Lanczos", "None"])
async def test_the_second_pass_makes_the_larger_image(
    runtime: DiffusersRuntime, model: str, upscaler: str
) -> None:
    seen: list[float] = []

    async def progress(value: float) -> None:
        seen.append(value)

    result = await runtime.run(job(model=model, hr_upscaler=upscaler, hr_second_pass_steps=3), progress)
    again = await runtime.run(job(model=model, hr_upscaler=upscaler, hr_second_pass_steps=3), quiet)
    assert sizes(result) == [(128, 128)] and result.images == again.images  # same seed, same bytes
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 5  # 2 + 3 steps, one bar
    text = result.info["infotexts"][0]
    assert text.endswith(
        f"Size: 64x64, Model hash: {model_hash(runtime, model)}, Model: {model}, Denoising strength: 0.75, "
        f"Hires upscale: 2.0, Hires steps: 3, Hires upscaler: {upscaler}, Version: {VERSION}"
    ), text
    plain = await runtime.run(job(model=model, hires=False, size=128), quiet)
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 8  # not a plain 128²


async def test_a_resize_at_another_aspect_ratio_is_cropped(runtime: DiffusersRuntime) -> None:
    result = await runtime.run(job(hr_resize_x=128, hr_resize_y=96), quiet)
    assert sizes(result) == [(128, 96)]
    assert "Hires resize: 128x96" in result.info["infotexts"][0]


async def test_hires_batch_mates_keep_their_images_and_others_do_not_join(runtime: DiffusersRuntime) -> None:
    jobs = [job("a", seed=3), job("b", seed=4, batch_size=2), job("c", seed=5, hr_scale=1.5)]
    assert runtime.batch_key(jobs[0]) == runtime.batch_key(jobs[1])
    assert runtime.batch_key(jobs[0]) != runtime.batch_key(jobs[2])  # another second pass
    assert runtime.batch_key(jobs[0]) != runtime.batch_key(job("d", hires=False))
    batched = await runtime.run_batch(jobs[:2], [quiet, quiet])
    for j, outcome in zip(jobs[:2], batched, strict=True):
        assert isinstance(outcome, RuntimeResult), outcome
        assert_same_images(outcome, await runtime.run(j, quiet))


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        ({"hr_scale": 3}, "too_large", "text-to-image at 192x192, its hires pass (36864 pixels) is more"),
        ({"hr_upscaler": "4x-Nothing"}, "unknown_upscaler", "upscaler '4x-Nothing' is not available"),
        ({"hr_sampler_name": "DPM++ SDE"}, "unknown_sampler", "DPM++ SDE"),
        (
            {"hr_prompt": "a dog <lora:x:1>"},
            "unsupported_option",
            "hr_prompt or hr_negative_prompt with other LoRAs",
        ),
        ({"hr_negative_prompt": 3}, "invalid_params", "hr_negative_prompt must be a text, not 3"),
        ({"hr_scale": "2"}, "invalid_params", "hr_scale must be a number, not '2'"),
    ],
)
async def test_what_the_second_pass_cannot_do_fails_before_it_runs(
    runtime: DiffusersRuntime, extra: dict[str, Any], code: str, words: str
) -> None:
    with pytest.raises(Reject) as raised:
        await runtime.run(job(**extra), quiet)
    assert raised.value.code == code and words in raised.value.reason, raised.value.reason


async def test_the_second_pass_takes_its_own_prompts(runtime: DiffusersRuntime) -> None:
    """``hr_prompt`` / ``hr_negative_prompt`` were refused: SD WebUI denoises the second pass
    with them (the first pass's where empty), read as it reads the first pass's (emphasis, own
    weight; more than 75 tokens: encoded here), and names them in the infotext."""
    plain = await runtime.run(job(hr_second_pass_steps=2), quiet)
    same = await runtime.run(job(hr_second_pass_steps=2, hr_prompt="a red cat", hr_negative_prompt=""), quiet)
    assert same.images == plain.images and "Hires prompt" not in same.info["infotexts"][0]
    own = job("o", hr_second_pass_steps=2, hr_prompt="a blue dog, small", hr_negative_prompt="dark")
    assert runtime.batch_key(own) is None  # alone: its second pass's prompts are its own
    made, again = await runtime.run(own, quiet), await runtime.run(own, quiet)
    assert made.images == again.images and pixels(made.images[0]).shape == pixels(plain.images[0]).shape
    assert np.abs(pixels(made.images[0]) - pixels(plain.images[0])).max() > 8
    assert (
        'Hires prompt: "a blue dog, small", Hires negative prompt: dark, Hires upscale: 2.0'
        in (made.info["infotexts"][0])
    )
    long = ", ".join(["a blue dog"] * 30)  # over 75 tokens: the embeddings are made here
    weighted = await runtime.run(job("w", hr_second_pass_steps=2, hr_prompt=f"({long}:1.2)"), quiet)
    unweighted = await runtime.run(job("u", hr_second_pass_steps=2, hr_prompt=long), quiet)
    assert np.abs(pixels(weighted.images[0]) - pixels(unweighted.images[0])).max() > 0


async def test_prompt_editing_is_scheduled_anew_for_the_second_pass(runtime: DiffusersRuntime) -> None:
    """Editing with a hires fix was refused. SD WebUI schedules the second pass's prompts again,
    its steps offset by the first pass's (``_prompt_schedule.schedule``): ``[cat:dog:0.5]`` is a
    dog all through it, ``[cat:dog:1.5]`` a cat all through the first pass and a dog from halfway
    through the second. The pairs below make the same image on SD WebUI 1.10.1 too
    (``test_a1111_interop.py``)."""

    def hr(task_id: str, prompt: str, **extra: Any) -> Job:
        asked = job(task_id, hr_second_pass_steps=4, hr_scale=1.5, denoising_strength=0.5, **extra)
        return Job(task_id, asked.type, asked.model, asked.params.model_copy(update={"prompt": prompt}))

    half = hr("a", "a [cat:dog:0.5]")
    assert runtime.batch_key(half) is None  # its second pass's prompts are not its first call's
    same = await runtime.run(hr("b", "a [cat:dog:0.5]", hr_prompt="a dog"), quiet)
    assert_same_images(await runtime.run(half, quiet), same)
    later = await runtime.run(hr("c", "a [cat:dog:1.5]"), quiet)
    assert_same_images(later, await runtime.run(hr("d", "a cat", hr_prompt="a [cat:dog:1.5]"), quiet))
    cat = await runtime.run(hr("e", "a cat"), quiet)
    assert np.abs(pixels(later.images[0]) - pixels(cat.images[0])).max() > 0
