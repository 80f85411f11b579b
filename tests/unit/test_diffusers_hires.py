"""SD WebUI's hires fix in the diffusers runtime, on tiny random-weight SD 1.x and SDXL models
(CPU, 64x64 first passes, 2 steps). It was refused as an unsupported option."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_diffusers_batching import assert_same_images, pixels, quiet

from sdfleet.errors import Reject
from sdfleet.hires import second_pass_steps
from sdfleet.infotext import VERSION
from sdfleet.models import ModelCatalog, checkpoint_hash, make_tiny
from sdfleet.runtimes._diffusers_samplers import hires_schedule
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-b", seed=1)
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    options = {"device": "cpu", "max_batch": 4, "generate_max_pixels": 160 * 160}
    return DiffusersRuntime.from_options(catalog=ModelCatalog(root), options=options, default_model="tiny-a")


def job(
    task_id: str = "h", model: str = "tiny-a", *, hires: bool = True, size: int = 64, seed: int = 1,
    batch_size: int = 1, **extra: Any,
) -> Job:  # fmt: skip
    params = {"prompt": "a red cat", "steps": 2, "width": size, "height": size, "seed": seed}
    if "denoising_strength" in extra:  # a parameter of its own, not SD WebUI's extras
        params["denoising_strength"] = extra.pop("denoising_strength")
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
        ({"hr_sampler_name": "DPM++ 3M SDE"}, "unknown_sampler", "DPM++ 3M SDE"),
        (
            {"hr_prompt": "a dog <lora:x:1>"},
            "unsupported_option",
            "hr_prompt or hr_negative_prompt with other LoRAs",
        ),
        ({"hr_negative_prompt": 3}, "invalid_params", "hr_negative_prompt must be a text, not 3"),
        ({"hr_scale": "2"}, "invalid_params", "hr_scale must be a number, not '2'"),
        ({"hr_checkpoint_name": 1}, "invalid_params", "hr_checkpoint_name must be a name, not 1"),
        ({"hr_checkpoint_name": "nope"}, "unknown_model", "hr_checkpoint_name: model 'nope' not found"),
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


async def test_the_second_pass_runs_on_its_own_checkpoint(runtime: DiffusersRuntime) -> None:
    """``hr_checkpoint_name`` was refused. SD WebUI runs the second pass on that checkpoint: the
    first pass's images, upscaled, are an image-to-image task of the other model (the same seed,
    its own encoders and VAE) and the infotext names it by its ``short_title``."""
    base = {"hr_upscaler": "Lanczos", "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    made = await runtime.run(job(seed=7, hr_checkpoint_name="tiny-b.safetensors [0123456789]", **base), quiet)
    assert runtime.loaded_model == "tiny-a" and set(runtime.cached_models) == {"tiny-a", "tiny-b"}
    first = await runtime.run(job(seed=7, hires=False), quiet)
    extras = TaskParams(upscaler="Lanczos", upscaling_resize=2)
    upscaled = await runtime.run(
        Job("u", TaskType.EXTRA_SINGLE_IMAGE, None, extras, [first.images[0]]), quiet
    )
    # the second pass's 2 steps at 0.5 run over a schedule of 4, as an img2img task of 4 steps
    # naming no sampler (the model's own scheduler: diffusers' strength)
    asked = {
        "prompt": "a red cat",
        "steps": 4,
        "width": 128,
        "height": 128,
        "seed": 7,
        "denoising_strength": 0.5,
    }
    on_b = Job("i", TaskType.IMAGE_TO_IMAGE, "tiny-b", TaskParams.model_validate(asked), [upscaled.images[0]])
    assert_same_images(made, await runtime.run(on_b, quiet))
    own = await runtime.run(job(seed=7, **base), quiet)
    assert np.abs(pixels(made.images[0]) - pixels(own.images[0])).max() > 8  # not tiny-a's second pass
    text, b_hash = made.info["infotexts"][0], model_hash(runtime, "tiny-b")
    assert (
        f"Model: tiny-a, Denoising strength: 0.5, Hires checkpoint: tiny-b [{b_hash}], "
        "Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Lanczos" in text
    ), text
    assert made.info["hires_checkpoint"] == f"tiny-b [{b_hash}]"  # for runtime serve
    same = await runtime.run(job(seed=7, hr_checkpoint_name="tiny-a", **base), quiet)
    assert (
        pixels(same.images[0]) == pixels(own.images[0])
    ).all() and f"Hires checkpoint: tiny-a [{model_hash(runtime, 'tiny-a')}]" in (same.info["infotexts"][0])
    assert (
        runtime.batch_key(job(hr_checkpoint_name="tiny-b")) is None
    )  # alone: another model reads its prompts


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
async def test_a_second_pass_on_another_family_makes_its_image(
    runtime: DiffusersRuntime, upscaler: str
) -> None:
    """An SD 1.x first pass and an SDXL second pass, and back: SD WebUI hands the latents over as
    they are (both have 4 channels) or encodes the upscaled image with the second model's VAE."""
    for first, second in (("tiny-a", "tiny-xl"), ("tiny-xl", "tiny-a")):
        made = await runtime.run(job(model=first, hr_checkpoint_name=second, hr_upscaler=upscaler), quiet)
        assert sizes(made) == [(128, 128)] and f"Hires checkpoint: {second} [" in made.info["infotexts"][0]
        assert runtime.loaded_model == first


async def test_a_second_checkpoint_without_room_is_held_for_its_job_alone(tmp_path: Path) -> None:
    """With ``cache_size`` 1 the second pass's model is loaded beside the first pass's for the job
    and let go after it: the cache keeps its bound, and the first pass's model stays."""
    make_tiny(tmp_path, "tiny-a", seed=0)
    make_tiny(tmp_path, "tiny-b", seed=1)
    options = {"device": "cpu"}
    small = DiffusersRuntime.from_options(catalog=ModelCatalog(tmp_path), options=options, cache_size=1)
    roomy = DiffusersRuntime.from_options(catalog=ModelCatalog(tmp_path), options=options, cache_size=2)
    asked = job(hr_checkpoint_name="tiny-b", hr_second_pass_steps=1)
    made = await small.run(asked, quiet)
    assert small.cached_models == ["tiny-a"] and small.loaded_model == "tiny-a" and made.switch_s > 0
    assert made.images == (await roomy.run(asked, quiet)).images
    assert roomy.cached_models == ["tiny-a", "tiny-b"]
    again = await roomy.run(asked, quiet)
    assert again.switch_s == 0.0 and again.images == made.images  # both were cached
    await small.aclose()
    await roomy.aclose()


def test_the_second_pass_schedule_is_sd_webuis() -> None:
    """SD WebUI's k-diffusion samplers run a hires pass's ``n`` steps as the last ``n`` of a
    schedule ``int(n / min(d, 0.999))`` long (``setup_img2img_steps`` given the steps), where this
    runtime's was the shortest schedule diffusers' strength makes ``n`` of (14 for 8 steps at 0.6,
    not 13: 3.8 of 255 apart from SD WebUI's images with a Lanczos upscaler, 1.0 with a latent one;
    0.38 and 0.004 after, the issue note). The strength handed to diffusers makes exactly ``n``
    (``get_timesteps``: int(schedule × strength)); DDIM, PLMS and UniPC too (their own:
    ``test_diffusers_timesteps``), no sampler keeps the old."""
    for steps in range(1, 61):
        for d in (k / 200 for k in range(1, 201)):
            for key in ("Euler", "Euler a", "DPM++ 2M Karras", "Heun"):
                schedule, strength = hires_schedule(key, steps, d)
                assert schedule == int(steps / min(d, 0.999)), (steps, d)
                assert int(schedule * strength) == steps, (steps, d)
    assert hires_schedule("Euler", 8, 0.6) == (13, 8 / 13)
    assert hires_schedule("Euler", 8, 1.0) == (8, 1.0)
    assert hires_schedule(None, 8, 0.6) == (second_pass_steps(8, 0.6), 0.6) == (14, 0.6)
    for key in ("DDIM", "PLMS", "UniPC"):  # SD WebUI's (``test_diffusers_timesteps``)
        assert hires_schedule(key, 8, 0.6)[0] == 13
