"""SD WebUI's refiner (``refiner_checkpoint``, ``refiner_switch_at``) in the diffusers runtime, on
tiny random-weight models (CPU, 64x64). It was refused as an unsupported option. SD WebUI hands
the denoising to the refiner from the UNet pass where its completed ratio reaches the switch; the
words and images next to SD WebUI's: ``tests/interop/test_sdwebui_weights_interop.py``."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from PIL import Image
from test_diffusers_batching import pixels, quiet

from sdfleet.errors import Reject
from sdfleet.models import ModelCatalog, checkpoint_hash, make_tiny
from sdfleet.runtimes._diffusers_refiner import switch_step
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "tiny-a", seed=0)
    make_tiny(root, "tiny-a2", seed=0)  # the same weights under another name
    make_tiny(root, "tiny-b", seed=1)
    make_tiny(root, "tiny-xl", seed=0, sdxl=True)
    make_tiny(root, "tiny-xl2", seed=0, sdxl=True)
    make_tiny(root, "tiny-xl-b", seed=1, sdxl=True)
    options = {"device": "cpu", "max_batch": 4}
    return DiffusersRuntime.from_options(
        catalog=ModelCatalog(root), options=options, default_model="tiny-a", cache_size=6
    )


def job(
    model: str = "tiny-a",
    kind: TaskType = TaskType.TEXT_TO_IMAGE,
    init: bytes | None = None,
    mask: bytes | None = None,
    **extra: Any,
) -> Job:
    asked: dict[str, Any] = {"prompt": "a red cat", "steps": 8, "width": 64, "height": 64, "seed": 7}
    for name in ("sampler", "denoising_strength", "prompt"):
        if name in extra:
            asked[name] = extra.pop(name)
    asked.setdefault("sampler", "Euler")
    if mask is not None:
        extra["mask"] = "fetched"  # its bytes are the job's
    params = TaskParams.model_validate({**asked, "extra": extra})
    return Job("r", kind, model, params, init_images=[init] if init else [], mask=mask)


def title(runtime: DiffusersRuntime, model: str) -> str:
    return f"{model} [{checkpoint_hash.sha256(runtime.catalog.resolve(model))[:10]}]"


def differ(a: RuntimeResult, b: RuntimeResult) -> int:
    return int(np.abs(pixels(a.images[0]) - pixels(b.images[0])).max())


def png(result: RuntimeResult) -> bytes:
    return result.images[0]


def test_the_switch_is_sd_webuis_completed_ratio() -> None:
    """SD WebUI's ``apply_refiner``: (999 - the index of the training sigma nearest the pass's
    sigma) / 1000, or of the timestep for DDIM; counted as the pipeline's loop counts passes."""
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")  # 999, 888, ..., 0
    assert [switch_step(euler, 10, None, at) for at in (None, 0.0, 0.1, 0.5, 0.999, 1.0)] == [
        0,
        0,
        1,
        5,
        9,
        None,
    ]
    assert switch_step(euler, 10, 0.5, 0.5) == 0  # image-to-image: from pass 5, the first it runs
    assert switch_step(euler, 10, 0.5, 0.8) == 3  # 999 - 222 = 777: not yet 0.8; 111: 0.888
    ddim = DDIMScheduler(**SD, steps_offset=1)  # 901, 801, ..., 1: (999 - 401) / 1000 = 0.598
    assert switch_step(ddim, 10, None, 0.5) == 5
    heun = HeunDiscreteScheduler(**SD, timestep_spacing="linspace")  # two passes a step but the first
    assert switch_step(heun, 10, None, 0.5) == 9  # pass 9: the second of step 5, at step 6's sigma


async def test_a_refiner_from_the_start_makes_its_models_image(runtime: DiffusersRuntime) -> None:
    """From the first pass (switch 0, or none given) the refiner denoises with its own text
    encoders and VAE: the refiner model's own image. The task's model stays the current one."""
    alone = await runtime.run(job("tiny-b"), quiet)
    for at in (0.0, None):
        refined = await runtime.run(job(refiner_checkpoint="tiny-b", refiner_switch_at=at), quiet)
        assert differ(refined, alone) == 0
        said = f"Model: tiny-a, Refiner: {title(runtime, 'tiny-b')}"
        assert (
            said + (", Refiner switch at: 0.0, Version" if at == 0 else ", Version")
            in refined.info["infotexts"][0]
        )
        assert refined.info["refiner"] == [title(runtime, "tiny-b"), at]  # for runtime serve
    assert runtime.loaded_model == "tiny-a" and {"tiny-a", "tiny-b"} <= set(runtime.cached_models)


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM", "DPM++ 2M"])
async def test_handing_over_midway_to_the_same_weights_changes_nothing(
    runtime: DiffusersRuntime, sampler: str
) -> None:
    """The hand-over itself (the UNet and VAE swapped between two passes, the embeddings made
    again) leaves the sampling as it was: a refiner of the same weights makes the model's image,
    and says so."""
    plain = await runtime.run(job(sampler=sampler), quiet)
    same = await runtime.run(job(sampler=sampler, refiner_checkpoint="tiny-a2", refiner_switch_at=0.5), quiet)
    assert differ(same, plain) <= 1 and "Refiner: tiny-a2 [" in same.info["infotexts"][0]
    other = await runtime.run(job(sampler=sampler, refiner_checkpoint="tiny-b", refiner_switch_at=0.5), quiet)
    b = await runtime.run(job("tiny-b", sampler=sampler), quiet)
    assert differ(other, plain) > 8 and differ(other, b) > 8  # half of each
    assert differ(await runtime.run(job(sampler=sampler), quiet), plain) == 0  # the model given back


async def test_a_refiner_not_reached_or_the_models_own_says_nothing(runtime: DiffusersRuntime) -> None:
    """SD WebUI switches only where the ratio reaches the switch (never at 1: the ratio stops at
    0.999), and not to the model it runs; then the infotext names no refiner."""
    plain = await runtime.run(job(), quiet)
    for extra in ({"refiner_checkpoint": "tiny-b", "refiner_switch_at": 1}, {"refiner_checkpoint": "tiny-a"}):
        made = await runtime.run(job(**extra), quiet)
        assert (
            differ(made, plain) == 0
            and "Refiner" not in made.info["infotexts"][0]
            and "refiner" not in made.info
        )
    assert runtime.batch_key(job(refiner_checkpoint="tiny-b")) is None  # alone: its callback swaps models
    assert runtime.batch_key(job(refiner_checkpoint="None")) == runtime.batch_key(job())


async def test_image_to_image_and_the_hires_pass_are_refined(runtime: DiffusersRuntime) -> None:
    """Image-to-image counts the passes it runs; with a hires fix the refiner takes the second
    pass only (SD WebUI's default ``hires_fix_refiner_pass``): from its start, the second pass is
    the refiner's, as a hires fix on that checkpoint."""
    start = png(await runtime.run(job(), quiet))
    i2i = {"kind": TaskType.IMAGE_TO_IMAGE, "init": start, "denoising_strength": 0.6}
    alone = await runtime.run(job("tiny-b", **i2i), quiet)
    refined = await runtime.run(job(**i2i, refiner_checkpoint="tiny-b", refiner_switch_at=0), quiet)
    assert differ(refined, alone) == 0
    hires = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.5}
    on_b = await runtime.run(job(**hires, hr_checkpoint_name="tiny-b"), quiet)
    second = await runtime.run(job(**hires, refiner_checkpoint="tiny-b", refiner_switch_at=0), quiet)
    assert differ(second, on_b) == 0 and Image.open(io.BytesIO(png(second))).size == (128, 128)
    text = second.info["infotexts"][0]
    assert text.index("Hires upscale") < text.index("Refiner: tiny-b [") < text.index("Version")


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        ({"refiner_checkpoint": 3}, "invalid_params", "refiner_checkpoint must be a name, not 3"),
        ({"refiner_checkpoint": "tiny-b", "refiner_switch_at": 2}, "invalid_params", "from 0 to 1, not 2"),
        ({"refiner_checkpoint": "tiny-b", "refiner_switch_at": "0.8"}, "invalid_params", "not '0.8'"),
        ({"refiner_checkpoint": "nope"}, "unknown_model", "refiner_checkpoint: model 'nope' not found"),
        ({"refiner_checkpoint": "tiny-xl"}, "invalid_params", "cross_attention_dim is 96, the model's 32"),
    ],
)
async def test_what_makes_no_refiner_fails_by_name(
    runtime: DiffusersRuntime, extra: dict[str, Any], code: str, words: str
) -> None:
    with pytest.raises(Reject) as raised:
        await runtime.run(job(**extra), quiet)
    assert raised.value.code == code and words in raised.value.reason, raised.value.reason


async def test_a_refiner_without_room_is_held_for_its_job_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two cached models at most: the hires pass's model joins the task's, the refiner is
    loaded for the job alone; the same images as with room for the three."""
    for name, seed in (("tiny-a", 0), ("tiny-b", 1), ("tiny-c", 2)):
        make_tiny(tmp_path, name, seed=seed)
    asked = job(
        enable_hr=True, hr_checkpoint_name="tiny-b", refiner_checkpoint="tiny-c", refiner_switch_at=0.5
    )
    made = {}
    for size in (2, 3):
        rt = DiffusersRuntime.from_options(
            catalog=ModelCatalog(tmp_path), options={"device": "cpu"}, cache_size=size
        )
        with caplog.at_level(logging.WARNING):
            made[size] = await rt.run(asked, quiet)
        assert rt.cached_models == (["tiny-a", "tiny-b"] if size == 2 else ["tiny-a", "tiny-b", "tiny-c"])
        assert rt.loaded_model == "tiny-a"
        await rt.aclose()
    assert differ(made[2], made[3]) == 0
    said = [r.getMessage() for r in caplog.records if "no room" in r.getMessage()]
    assert len(said) == 1 and "no room for tiny-c beside tiny-a, tiny-b" in said[0], said


async def test_sdxl_is_refined_as_sd_1_is(runtime: DiffusersRuntime) -> None:
    """SDXL's pooled embeddings go over with the others: from the start, the refiner's image;
    half-way to the same weights, the model's."""
    plain, other = await runtime.run(job("tiny-xl"), quiet), await runtime.run(job("tiny-xl-b"), quiet)
    refined = await runtime.run(job("tiny-xl", refiner_checkpoint="tiny-xl-b", refiner_switch_at=0), quiet)
    assert differ(refined, other) == 0
    same = await runtime.run(job("tiny-xl", refiner_checkpoint="tiny-xl2", refiner_switch_at=0.5), quiet)
    assert differ(same, plain) <= 1 and "Refiner: tiny-xl2 [" in same.info["infotexts"][0]
    half = await runtime.run(job("tiny-xl", refiner_checkpoint="tiny-xl-b", refiner_switch_at=0.5), quiet)
    assert differ(half, plain) > 8 and differ(half, other) > 8


async def test_prompt_editing_and_inpainting_are_refined(runtime: DiffusersRuntime) -> None:
    """The refiner reads an edited prompt's texts at each pass, and inpaints as the model does:
    from the start, the refiner model's own image of the same task."""
    edited = {"prompt": "a [red cat:blue dog:0.5]"}
    refined = await runtime.run(job(**edited, refiner_checkpoint="tiny-b", refiner_switch_at=0), quiet)
    assert differ(refined, await runtime.run(job("tiny-b", **edited), quiet)) == 0
    same = await runtime.run(job(**edited, refiner_checkpoint="tiny-a2", refiner_switch_at=0.3), quiet)
    assert differ(same, await runtime.run(job(**edited), quiet)) <= 1
    square = Image.new("L", (64, 64), 0)
    square.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    square.save(buf, format="PNG")
    start = png(await runtime.run(job(), quiet))
    masked = {
        "kind": TaskType.IMAGE_TO_IMAGE,
        "init": start,
        "mask": buf.getvalue(),
        "denoising_strength": 0.7,
    }
    inpainted = await runtime.run(job(**masked, refiner_checkpoint="tiny-b", refiner_switch_at=0), quiet)
    assert differ(inpainted, await runtime.run(job("tiny-b", **masked), quiet)) == 0
    assert differ(inpainted, await runtime.run(job(**masked), quiet)) > 8
