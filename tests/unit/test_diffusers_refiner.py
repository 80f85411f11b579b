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
from sdfleet.runtimes._diffusers_pipes import make_scheduler
from sdfleet.runtimes._diffusers_refiner import switch_step
from sdfleet.runtimes._diffusers_samplers import img2img_schedule
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
    # UniPC's image-to-image of 8 steps at 0.5: SD WebUI's 4 from 376 (376, 282, 188, 94), not the
    # whole schedule's tail (499.5, 374.6, 249.8, 124.9, where 0.8 is reached at the fourth pass)
    unipc = make_scheduler("UniPC", SD)
    assert switch_step(unipc, 8, 0.5, 0.8) == 2  # (999 - 188) / 1000 = 0.811
    assert switch_step(unipc, 8, 0.5, 0.8, by_steps=True) is None  # passes 0-3 of t_enc + 1 = 5


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


async def test_a_refiner_of_another_shape_is_refused_before_it_is_loaded(tmp_path: Path) -> None:
    """Its UNet's config is read from its folder or its file's header: refused without a load
    (it was loaded, and cached, first), a folder and a single file alike."""
    make_tiny(tmp_path, "tiny-a", seed=0)
    make_tiny(tmp_path, "tiny-xl", seed=0, sdxl=True)
    make_tiny(tmp_path, "xl-file", seed=0, sdxl=True, single_file=True, sidecar=False)
    rt = DiffusersRuntime.from_options(
        catalog=ModelCatalog(tmp_path), options={"device": "cpu"}, cache_size=4
    )
    try:
        for name in ("tiny-xl", "xl-file.safetensors"):
            with pytest.raises(Reject) as raised:
                await rt.run(job(refiner_checkpoint=name), quiet)
            assert raised.value.code == "invalid_params", raised.value.reason
            assert f"refiner_checkpoint {name}: its UNet's cross_attention_dim is 96" in raised.value.reason
            assert rt.cached_models == ["tiny-a"]
    finally:
        await rt.aclose()


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


def test_the_switch_by_sampling_steps_counts_passes_as_sd_webui_does() -> None:
    """SD WebUI's ``refiner_switch_by_sample_steps``: the passes made over its ``total_steps``
    (twice the steps for a second-order sampler, which makes one pass less): the first pass
    where that reaches the switch."""
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    assert [switch_step(euler, 4, None, at, by_steps=True) for at in (None, 0, 0.5, 0.75, 0.76)] == [
        0,
        0,
        2,
        3,
        None,  # 4 / 4 is never reached: SD WebUI's last pass is 3 / 4
    ]
    assert switch_step(euler, 10, 0.5, 0.5, by_steps=True) == 3  # 5 passes: 3 / 5 the first ≥ 0.5
    heun = HeunDiscreteScheduler(**SD, timestep_spacing="linspace")  # 19 passes, counted of 20
    assert [switch_step(heun, 10, None, at, by_steps=True) for at in (0.5, 0.9, 0.96)] == [10, 18, None]
    # DDIM on SD WebUI's timesteps: 8 steps are 7 passes, counted of 8 (at 0.8 the 7th, never made);
    # image-to-image at 0.6 of 8: 3 passes, counted of t_enc + 1 = 5
    ddim = make_scheduler("DDIM", {**SD, "clip_sample": False})
    assert [switch_step(ddim, 8, None, at, by_steps=True) for at in (0.5, 0.75, 0.8)] == [4, 6, None]
    strength = img2img_schedule("DDIM", 8, 0.6)[1]
    assert [switch_step(ddim, 8, strength, at, by_steps=True) for at in (0.2, 0.4, 0.5)] == [1, 2, None]


def overrides(**chosen: Any) -> dict[str, Any]:
    return {"override_settings": chosen}


async def test_the_switch_by_sampling_steps_is_said_with_or_without_a_refiner(
    runtime: DiffusersRuntime,
) -> None:
    """SD WebUI says ``Refiner switch by sampling steps: True`` on every image made with the
    option, a refiner or not (it is said as the first pass through the UNet asks whether to
    switch); the images are the option's: 0.75 reaches the last of 8 passes by steps (6 / 8),
    and 0.99 none, where the ratio by timestep reaches it at the last."""
    by_steps = overrides(refiner_switch_by_sample_steps=True)
    plain = await runtime.run(job(), quiet)
    said = await runtime.run(job(**by_steps), quiet)
    assert differ(said, plain) == 0
    assert ", Refiner switch by sampling steps: True, Version: " in said.info["infotexts"][0]
    never = await runtime.run(job(**by_steps, refiner_checkpoint="tiny-b", refiner_switch_at=0.99), quiet)
    assert differ(never, plain) == 0 and "Refiner:" not in never.info["infotexts"][0]
    at_last = await runtime.run(job(refiner_checkpoint="tiny-b", refiner_switch_at=0.99), quiet)
    assert differ(at_last, plain) > 0 and "Refiner switch at: 0.99" in at_last.info["infotexts"][0]
    six = await runtime.run(job(**by_steps, refiner_checkpoint="tiny-b", refiner_switch_at=0.75), quiet)
    also_six = await runtime.run(job(**by_steps, refiner_checkpoint="tiny-b", refiner_switch_at=0.7), quiet)
    seven = await runtime.run(job(**by_steps, refiner_checkpoint="tiny-b", refiner_switch_at=0.76), quiet)
    assert differ(six, also_six) == 0 and differ(six, seven) > 0 and differ(seven, plain) > 0
    assert (
        "Refiner switch by sampling steps: True, "
        f"Refiner: {title(runtime, 'tiny-b')}, Refiner switch at: 0.75" in six.info["infotexts"][0]
    )


async def test_a_hires_fix_refines_the_passes_its_option_names(runtime: DiffusersRuntime) -> None:
    """SD WebUI's ``hires_fix_refiner_pass``: "first pass" refines the first pass only (its
    images decoded by the refiner's VAE, the second pass on the model again), "both passes"
    each; from the start, the first is the refiner's first pass under the model's second (a
    hires fix of the refiner's model on the task's model), both the refiner's hires fix. Its
    word is said where it is not the default, before the refiner's."""
    hires = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.5}
    from_start = {"refiner_checkpoint": "tiny-b", "refiner_switch_at": 0}
    for upscaler in ("Latent", "Lanczos"):
        asked = hires | {"hr_upscaler": upscaler}
        first = await runtime.run(
            job(**asked, **from_start, **overrides(hires_fix_refiner_pass="first pass")), quiet
        )
        b_then_a = await runtime.run(job("tiny-b", **asked, hr_checkpoint_name="tiny-a"), quiet)
        assert differ(first, b_then_a) == 0, upscaler
        both = await runtime.run(
            job(**asked, **from_start, **overrides(hires_fix_refiner_pass="both passes")), quiet
        )
        assert differ(both, await runtime.run(job("tiny-b", **asked), quiet)) == 0, upscaler
        second = await runtime.run(
            job(**asked, **from_start, **overrides(hires_fix_refiner_pass="second pass")), quiet
        )
        assert differ(second, await runtime.run(job(**asked, **from_start), quiet)) == 0
        assert differ(second, both) > 0 and differ(second, first) > 0
    text = first.info["infotexts"][0]
    refiner_title = title(runtime, "tiny-b")
    assert f"Hires upscaler: Lanczos, Hires refiner: first pass, Refiner: {refiner_title}, " in text
    assert "Hires refiner: both passes, Refiner: " in both.info["infotexts"][0]
    assert "Hires refiner" not in second.info["infotexts"][0]
    assert first.info["refiner_passes"] == [True, False] and both.info["refiner_passes"] == [True, True]
    assert runtime.loaded_model == "tiny-a"


async def test_words_said_while_sampling_keep_sd_webuis_order(runtime: DiffusersRuntime) -> None:
    """A first pass's eta is said as it starts, the switch by steps at its first pass through the
    UNet, the refiner's words as it takes over, the hires pass's eta as that starts: SD WebUI
    1.10.1's infotext of the same request (checked there, ``test_sdwebui_weights_interop.py``)."""
    made = await runtime.run(
        job(
            sampler="DDIM",
            eta=0.5,
            enable_hr=True,
            hr_sampler_name="Euler a",
            hr_second_pass_steps=2,
            denoising_strength=0.5,
            hr_upscaler="Lanczos",
            refiner_checkpoint="tiny-b",
            refiner_switch_at=0.5,
            **overrides(hires_fix_refiner_pass="first pass", refiner_switch_by_sample_steps=True),
        ),
        quiet,
    )
    assert (
        "Hires upscaler: Lanczos, Eta DDIM: 0.5, Refiner switch by sampling steps: True, "
        f"Hires refiner: first pass, Refiner: {title(runtime, 'tiny-b')}, Refiner switch at: 0.5, Eta: 0.5, "
        "Version: "
    ) in made.info["infotexts"][0]


@pytest.mark.parametrize(
    ("chosen", "words"),
    [
        (
            {"hires_fix_refiner_pass": "third pass"},
            "must be one of 'second pass', 'first pass', 'both passes'",
        ),
        ({"hires_fix_refiner_pass": None}, "not None"),
        ({"refiner_switch_by_sample_steps": "yes"}, "must be true or false, not 'yes'"),
    ],
)
async def test_refiner_options_sd_webui_lacks_are_refused(
    runtime: DiffusersRuntime, chosen: dict[str, Any], words: str
) -> None:
    """SD WebUI would take any text as "both passes"; here such a value is refused, with or
    without a refiner, before the device."""
    for extra in ({}, {"refiner_checkpoint": "tiny-b"}):
        with pytest.raises(Reject) as raised:
            await runtime.run(job(**extra, **overrides(**chosen)), quiet)
        assert raised.value.code == "invalid_params" and words in raised.value.reason, raised.value.reason
