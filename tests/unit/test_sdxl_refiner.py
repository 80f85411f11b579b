"""SDXL's refiner (its OpenCLIP encoder alone, an aesthetic score among its time ids) refining an
SDXL model's task, on tiny random-weight models (CPU, 64x64). Its files were refused. The
reference is diffusers' own SDXL base + refiner ("ensemble of experts": the base to
``denoising_end``, the refiner pipeline from ``denoising_start``), which hands over at the same
timestep as SD WebUI's switch; SD WebUI's SDXL could not be run here (its fp32 SDXL base and
refiner on CPU need more memory than this machine has)."""

from __future__ import annotations

import io
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusers_batching import pixels, quiet

from sdfleet.errors import Reject
from sdfleet.models import ModelCatalog, make_tiny
from sdfleet.runtimes import _diffusers_pipes as P
from sdfleet.runtimes._diffusers_noise import own_vae_draws
from sdfleet.runtimes.base import Job, RuntimeResult
from sdfleet.runtimes.diffusers import DiffusersRuntime
from sdfleet.tasks import TaskParams, TaskType

PROMPT = "a red cat"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> DiffusersRuntime:
    root = tmp_path_factory.mktemp("models")
    make_tiny(root, "xl", seed=0, sdxl=True)
    make_tiny(root, "xl-refiner", seed=1, sdxl_refiner=True)
    make_tiny(root, "refiner-file", seed=1, sdxl_refiner=True, single_file=True, sidecar=False)
    make_tiny(root, "sd1", seed=0)
    make_tiny(root, "unused-refiner", seed=2, sdxl_refiner=True, single_file=True, sidecar=False)
    return DiffusersRuntime.from_options(
        catalog=ModelCatalog(root), options={"device": "cpu"}, default_model="xl", cache_size=6
    )


def job(
    model: str = "xl", kind: TaskType = TaskType.TEXT_TO_IMAGE, init: bytes | None = None, **extra: Any
) -> Job:
    asked: dict[str, Any] = {"prompt": PROMPT, "steps": 8, "width": 64, "height": 64, "seed": 7}
    asked |= {"sampler": "Euler", "cfg_scale": 7}
    if "denoising_strength" in extra:
        asked["denoising_strength"] = extra.pop("denoising_strength")
    params = TaskParams.model_validate({**asked, "extra": extra})
    return Job("x", kind, model, params, init_images=[init] if init else [])


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def differ(a: RuntimeResult, b: bytes) -> int:
    return int(np.abs(pixels(a.images[0]) - pixels(b)).max())


def references(runtime: DiffusersRuntime) -> tuple[Any, Any]:
    """diffusers' SDXL pipeline of the task's model and its refiner pipeline (aesthetic scores
    2.5 and 6, SD WebUI's too), on the runtime's loaded weights and its Euler; their 8-bit pixels
    truncated as the runtime's (SD WebUI's), where diffusers rounds."""
    base, refiner = runtime._cache["xl"].pipe, runtime._cache["xl-refiner"].pipe
    made = diffusers.StableDiffusionXLPipeline(**base.components)
    made.scheduler = P.make_scheduler("Euler", base.scheduler.config)
    parts = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    refines = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{k: v for k, v in refiner.components.items() if k in parts},
        scheduler=P.make_scheduler("Euler", base.scheduler.config),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True,
    )
    return P.as_the_runtime_runs_it(made), P.as_the_runtime_runs_it(refines)


async def test_the_refiner_takes_over_where_diffusers_hands_sdxl_to_it(runtime: DiffusersRuntime) -> None:
    """Half-way (and at 0.3), SDXL's refiner takes over as diffusers' base + refiner does: the
    same image, pixel for pixel, its time ids ending with the aesthetic score; the infotext
    names it as SD WebUI does."""
    plain = await runtime.run(job(), quiet)
    for at in (0.5, 0.3):
        ours = await runtime.run(job(refiner_checkpoint="xl-refiner", refiner_switch_at=at), quiet)
        base, refines = references(runtime)
        generator = torch.Generator("cpu").manual_seed(7)
        kwargs = {"num_inference_steps": 8, "guidance_scale": 7.0, "generator": generator}
        latents = base(PROMPT, height=64, width=64, denoising_end=at, output_type="latent", **kwargs).images
        theirs = refines(PROMPT, image=latents, denoising_start=at, **kwargs).images[0]
        assert differ(ours, png(theirs)) == 0, at
        assert differ(ours, plain.images[0]) > 8
        assert "Model: xl, Refiner: xl-refiner [" in ours.info["infotexts"][0]
        assert f"Refiner switch at: {at}, Version: " in ours.info["infotexts"][0]
    assert runtime.loaded_model == "xl"


async def test_refining_an_image_from_the_start_is_diffusers_refiner_pipeline(
    runtime: DiffusersRuntime,
) -> None:
    """SDXL's refiner's everyday use: an image-to-image task refined from the start (switch 0)
    is diffusers' refiner pipeline refining the image (its VAE encodes it, its noise, its
    aesthetic scores; the noise the seed's first draw, as SD WebUI's, the VAE's sample drawn apart:
    ``own_vae_draws``); a single file of the same weights refines as the folder does."""
    start = (await runtime.run(job(), quiet)).images[0]
    i2i = {"kind": TaskType.IMAGE_TO_IMAGE, "init": start, "denoising_strength": 0.5}
    ours = await runtime.run(job(**i2i, refiner_checkpoint="xl-refiner", refiner_switch_at=0), quiet)
    _, refines = references(runtime)
    generator = torch.Generator("cpu").manual_seed(7)
    image = Image.open(io.BytesIO(start)).convert("RGB")
    with own_vae_draws(refines.vae, [generator], [7]):  # SD WebUI's 0.5: int(0.5 × 8) + 1 of 8 steps
        theirs = refines(
            PROMPT,
            image=image,
            strength=5 / 8,
            num_inference_steps=8,
            guidance_scale=7.0,
            generator=[generator],
        )
    assert differ(ours, png(theirs.images[0])) == 0
    from_file = await runtime.run(job(**i2i, refiner_checkpoint="refiner-file", refiner_switch_at=0), quiet)
    assert differ(from_file, ours.images[0]) <= 1


async def test_a_hires_fix_and_an_edited_prompt_are_refined(runtime: DiffusersRuntime) -> None:
    """The hires pass's image-to-image call makes SDXL's six time ids too: the refiner takes its
    second pass (SD WebUI's default), or both, and reads an edited prompt's texts at each pass."""
    hires = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.5, "hr_upscaler": "Latent"}
    plain = await runtime.run(job(**hires), quiet)
    refined = await runtime.run(job(**hires, refiner_checkpoint="xl-refiner", refiner_switch_at=0.3), quiet)
    both = await runtime.run(
        job(
            **hires,
            refiner_checkpoint="xl-refiner",
            refiner_switch_at=0.3,
            override_settings={"hires_fix_refiner_pass": "both passes"},
        ),
        quiet,
    )
    assert Image.open(io.BytesIO(refined.images[0])).size == (128, 128)
    assert differ(refined, plain.images[0]) > 8 and differ(both, refined.images[0]) > 0
    assert "Hires refiner: both passes, Refiner: xl-refiner [" in both.info["infotexts"][0]
    edited = {"prompt": "a [red cat:blue dog:0.5]"}
    assert (
        differ(
            await runtime.run(job(**edited, refiner_checkpoint="xl-refiner", refiner_switch_at=0.3), quiet),
            (await runtime.run(job(**edited), quiet)).images[0],
        )
        > 8
    )


@pytest.mark.parametrize("model", ["xl-refiner", "refiner-file.safetensors", "unused-refiner.safetensors"])
async def test_the_refiner_runs_no_task_as_its_model(runtime: DiffusersRuntime, model: str) -> None:
    """Its UNet takes SDXL's refiner's time ids, which no text-to-image call makes: named as a
    task's model it is refused by name, loaded as another task's refiner or not (then before it
    is loaded, by its files). SD WebUI loads it and runs it."""
    with pytest.raises(Reject) as raised:
        await runtime.run(job(model), quiet)
    assert raised.value.code == "invalid_params"
    assert f"{model} is SDXL's refiner: it refines an SDXL model's task" in raised.value.reason
    assert "unused-refiner.safetensors" not in runtime.cached_models


async def test_the_refiner_refines_sdxl_models_only(runtime: DiffusersRuntime) -> None:
    """For an SD 1.x model it is refused, before it is loaded where its shape says so."""
    with pytest.raises(Reject) as raised:
        await runtime.run(job("sd1", refiner_checkpoint="refiner-file"), quiet)
    assert raised.value.code == "invalid_params" and "refiner_checkpoint refiner-file" in raised.value.reason
